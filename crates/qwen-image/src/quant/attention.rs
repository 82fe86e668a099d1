//! FP8 attention ([`AttentionOptions::fp8`](crate::ops::AttentionOptions::fp8)): what it computes, and its portable
//! emulation on the host, the reference the CUDA kernel (`kernels/flash_attention_fp8.cu`) is tested against.
//!
//! Q·Kᵀ runs on 8-bit integers and P·V on e4m3 (SageAttention's split on Hopper: INT8 logits are 3–4× more
//! accurate than e4m3 ones at the same speed, docs/fp8.md). For `query [batch, queries, heads, D]` over keys and values
//! `[batch, keys, kv_heads, D]` (the segments concatenated), with `g = heads / kv_heads` and `hk = h / g`:
//!
//! 1. **Quantization.** `int8(x / s)` rounds to nearest even and clamps to ±127, `e4m3(x / s)` as
//!    [`e4m3::quantize_rows`] rounds; every division is in f32, and a scale below `f32::MIN_POSITIVE` is 1.
//!    - `Q` per query row and head: `sq = max|q| / 127` over the row's `D` values, `q8 = int8(q / sq)`;
//!    - `K` smoothed per batch, key head and column (softmax does not change when every key of a row moves by the
//!      same vector, and the keys' common part no longer takes the 8 bits): `mean[c]` = the f32 sum of each
//!      [`MEAN_BLOCK`] consecutive keys' values in key order, those partial sums added in order, divided by the
//!      number of keys; then per key row `sk = max|k − mean| / 127`, `k8 = int8((k − mean) / sk)`;
//!    - `V` per batch, key head and column: `sv = max|v| / 448` over all keys, `v8 = e4m3(v / sv)`.
//! 2. **Logits** `s[i, j] = f32(Σ_d q8 · k8) · sk[j]` (the integer sum is exact); masked keys get `-∞`;
//!    `f[i] = sq[i] · log2(e) / √D`.
//! 3. **Probabilities, online** over tiles of [`KEY_TILE`] keys from key 0 (FlashAttention's rescaling, in the
//!    kernel's order): for tile `T`, `m_T = max(m_{T−1}, (maxⱼ∈T s[i, j]) · f[i])` (`m_{−1} = −∞`),
//!    `p[i, j] = 2^fma(s[i, j], f[i], 8 − m_T)`: at most 256, so that the small ones stay normal in e4m3
//!    (FlashAttention-3's `Max_offset`); `α_T = 2^(m_{T−1} − m_T)`, `l ← l · α_T + Σⱼ∈T p[i, j]` and
//!    `acc ← acc · α_T + Σⱼ∈T e4m3(p[i, j]) · v8[j, ·]`, in f32.
//! 4. **Output** `o[i, d] = (acc[i, d] · sv[d]) · (1 / l[i])`, rounded once to the query's dtype; a row with every
//!    key masked gives zeros.
//!
//! Steps 1 and 2 are deterministic and exact on both sides, and the probabilities are rounded against the running
//! maximum as the kernel does: the emulation and the kernel differ only by `exp2`'s last bits and the order of the
//! P·V sums (what the CPU gives on the proxy is what a GPU gives); `tests/gpu_fp8.rs` bounds the difference.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use rayon::prelude::*;

use super::e4m3;
use crate::ops::AttentionOptions;

/// `log2` of the factor the probabilities are scaled by before their e4m3 rounding (step 3 of the module docs).
pub const P_LOG2_OFFSET: f32 = 8.0;

/// Keys per tile of the online softmax (the kernel's tile).
pub const KEY_TILE: usize = 128;

/// Keys per partial sum of the keys' mean (the kernel's blocks).
pub const MEAN_BLOCK: usize = 64;

/// The largest magnitude of an 8-bit integer operand.
const INT8_MAX: f32 = 127.0;

/// The shape of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch size.
    pub batch: usize,
    /// Queries per batch entry.
    pub queries: usize,
    /// Query heads.
    pub heads: usize,
    /// Keys per batch entry (all segments).
    pub keys: usize,
    /// Key/value heads (`heads` is a multiple).
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// Q, K and V quantized as step 1 of the module docs defines; values in their tensors' `[batch, tokens, heads, D]`
/// order.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8AttentionOperands {
    /// Q as 8-bit integers, `[batch, queries, heads, D]`.
    pub q: Vec<i8>,
    /// Q's scales, `[batch, queries, heads]`.
    pub q_scales: Vec<f32>,
    /// The keys' mean, `[batch, kv_heads, D]`.
    pub k_mean: Vec<f32>,
    /// K minus its mean as 8-bit integers, `[batch, keys, kv_heads, D]`.
    pub k: Vec<i8>,
    /// K's scales, `[batch, keys, kv_heads]`.
    pub k_scales: Vec<f32>,
    /// V's e4m3 bits, `[batch, keys, kv_heads, D]`.
    pub v_bits: Vec<u8>,
    /// V's scales, `[batch, kv_heads, D]`.
    pub v_scales: Vec<f32>,
}

/// The scale of an 8-bit integer row whose largest magnitude is `amax` (1 when not a positive normal f32).
pub fn int8_row_scale(amax: f32) -> f32 {
    let scale = amax / INT8_MAX;
    if scale >= f32::MIN_POSITIVE {
        scale
    } else {
        1.0
    }
}

/// `row` as 8-bit integers with [`int8_row_scale`]: `(values, scale)`.
pub fn int8_row(row: impl Iterator<Item = f32> + Clone) -> (Vec<i8>, f32) {
    let scale = int8_row_scale(row.clone().fold(0f32, |m, v| m.max(v.abs())));
    (row.map(|v| (v / scale).round_ties_even().clamp(-INT8_MAX, INT8_MAX) as i8).collect(), scale)
}

/// Step 1 of the module docs on the host, from f32 values in `[batch, tokens, heads, D]` order.
pub fn quantize_operands(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Fp8AttentionOperands {
    let (hk, d) = (s.kv_heads, s.head_dim);
    let (mut q8, mut q_scales) = (Vec::with_capacity(q.len()), Vec::with_capacity(q.len() / d.max(1)));
    for row in q.chunks_exact(d) {
        let (values, scale) = int8_row(row.iter().copied());
        q8.extend(values);
        q_scales.push(scale);
    }
    let at = |b: usize, j: usize, h: usize| ((b * s.keys + j) * hk + h) * d;
    let mut k_mean = vec![0f32; s.batch * hk * d];
    let mut v_scales = Vec::with_capacity(s.batch * hk * d);
    for b in 0..s.batch {
        for h in 0..hk {
            for c in 0..d {
                // The keys' sum as the kernel adds it: per block of MEAN_BLOCK keys, then the blocks in order.
                let block_sum = |j0: usize| {
                    (j0..(j0 + MEAN_BLOCK).min(s.keys)).fold(0f32, |acc, j| acc + k[at(b, j, h) + c])
                };
                let total = (0..s.keys).step_by(MEAN_BLOCK).fold(0f32, |acc, j0| acc + block_sum(j0));
                k_mean[(b * hk + h) * d + c] = total / s.keys as f32;
                let v_amax = (0..s.keys).fold(0f32, |m, j| m.max(v[at(b, j, h) + c].abs()));
                v_scales.push(e4m3::row_scale(v_amax));
            }
        }
    }
    let (mut k8, mut k_scales) = (Vec::with_capacity(k.len()), Vec::with_capacity(k.len() / d.max(1)));
    for (r, row) in k.chunks_exact(d).enumerate() {
        let (h, b) = (r % hk, r / (hk * s.keys));
        let mean = &k_mean[(b * hk + h) * d..(b * hk + h + 1) * d];
        let (values, scale) = int8_row(row.iter().zip(mean).map(|(x, m)| x - m));
        k8.extend(values);
        k_scales.push(scale);
    }
    let v_bits = v
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let (c, h, b) = (i % d, (i / d) % hk, i / (d * hk * s.keys));
            e4m3::encode(x / v_scales[(b * hk + h) * d + c])
        })
        .collect();
    Fp8AttentionOperands { q: q8, q_scales, k_mean, k: k8, k_scales, v_bits, v_scales }
}

/// Steps 2–4 of the module docs on the host (before the final rounding): `[batch, queries, heads, D]` in f32.
/// `mask` is `[batch, keys]`, `true` = attend; `causal` masks key `j > i` for query `i` too (the CUDA kernel does not
/// take causal calls: they run here).
pub fn attention_host(
    ops: &Fp8AttentionOperands,
    mask: Option<&[bool]>,
    causal: bool,
    s: AttentionShape,
) -> Vec<f32> {
    let (hk, d, g) = (s.kv_heads, s.head_dim, s.heads / s.kv_heads.max(1));
    let table = e4m3::decode_table();
    let v8: Vec<f32> = ops.v_bits.iter().map(|&b| table[b as usize]).collect();
    let softmax_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
    let mut out = vec![0f32; s.batch * s.queries * s.heads * d];
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let (h, i, b) = (row % s.heads, (row / s.heads) % s.queries, row / (s.heads * s.queries));
        let kh = h / g;
        let f = ops.q_scales[row] * softmax_log2;
        let q = &ops.q[row * d..(row + 1) * d];
        let key = |j: usize| (b * s.keys + j) * hk + kh;
        // Logits before the row's factor, masked keys at -∞.
        let logits: Vec<f32> = (0..s.keys)
            .map(|j| match mask.is_some_and(|m| !m[b * s.keys + j]) || (causal && j > i) {
                true => f32::NEG_INFINITY,
                false => {
                    let k = &ops.k[key(j) * d..(key(j) + 1) * d];
                    let dot: i32 = q.iter().zip(k).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
                    dot as f32 * ops.k_scales[key(j)]
                }
            })
            .collect();
        let (mut m_run, mut l) = (f32::NEG_INFINITY, 0f32);
        let mut acc = vec![0f32; d];
        for (tile, logits) in logits.chunks(KEY_TILE).enumerate() {
            let m_new = m_run.max(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) * f);
            let m_use = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
            let alpha = if m_run == f32::NEG_INFINITY { 0.0 } else { (m_run - m_use).exp2() };
            m_run = m_new;
            let bias = P_LOG2_OFFSET - m_use;
            let mut sum = 0f32;
            let mut tile_acc = vec![0f32; d];
            for (jt, &sj) in logits.iter().enumerate() {
                let p = sj.mul_add(f, bias).exp2();
                sum += p;
                let p8 = table[e4m3::encode(p) as usize];
                let v = key(tile * KEY_TILE + jt) * d;
                for (a, v) in tile_acc.iter_mut().zip(&v8[v..v + d]) {
                    *a += p8 * v;
                }
            }
            l = l * alpha + sum;
            for (a, t) in acc.iter_mut().zip(tile_acc) {
                *a = *a * alpha + t;
            }
        }
        if l == 0.0 {
            return; // every key masked: zeros
        }
        let inv = 1.0 / l;
        let sv = &ops.v_scales[(b * hk + kh) * d..(b * hk + kh + 1) * d];
        for ((o, a), s) in o.iter_mut().zip(acc).zip(sv) {
            *o = (a * s) * inv;
        }
    });
    out
}

/// The portable FP8 attention ([`AttentionOptions::fp8`]) of `query` over the concatenated `key` and `value`
/// (`[batch, keys, kv_heads, D]`, as [`portable::attention`](crate::ops::portable::attention) joins the segments):
/// the operands and the key mask read to the host, [`quantize_operands`] and [`attention_host`], the result uploaded
/// in the query's dtype.
pub fn attention_fp8<B: Backend>(
    query: Tensor<B, 4>,
    key: Tensor<B, 4>,
    value: Tensor<B, 4>,
    options: &AttentionOptions<B>,
) -> Tensor<B, 4> {
    let ([batch, queries, heads, head_dim], dtype, device) = (query.dims(), query.dtype(), query.device());
    let [_, keys, kv_heads, _] = key.dims();
    let shape = AttentionShape { batch, queries, heads, keys, kv_heads, head_dim };
    let host = crate::tensor_io::to_f32_vec::<B, 4>;
    let ops = quantize_operands(&host(query), &host(key), &host(value), shape);
    let mask = options
        .key_mask
        .clone()
        .map(|m| m.int().into_data().iter::<i64>().map(|x| x != 0).collect::<Vec<_>>());
    let out = attention_host(&ops, mask.as_deref(), options.causal, shape);
    Tensor::<B, 4>::from_data(TensorData::new(out, [batch, queries, heads, head_dim]), (&device, DType::F32))
        .cast(dtype)
}

#[cfg(test)]
mod tests {
    use burn::{backend::Flex, tensor::Distribution};

    use super::*;
    use crate::{
        ops::{portable, KvSegment},
        tensor_io,
    };

    type B = Flex;

    fn rel_l2(a: &Tensor<B, 4>, b: &Tensor<B, 4>) -> f64 {
        tensor_io::rel_l2(&tensor_io::to_f32_vec(a.clone()), &tensor_io::to_f32_vec(b.clone()))
    }

    fn random(dims: [usize; 4], seed: u64) -> Tensor<B, 4> {
        let device = Default::default();
        <B as Backend>::seed(&device, seed);
        Tensor::random(dims, Distribution::Normal(0.0, 1.0), &device)
    }

    #[test]
    fn fp8_attention_is_close_to_the_exact_attention_and_not_equal_to_it() {
        // Two segments, grouped-query heads, a key mask with one batch row partly masked.
        let q = random([2, 37, 4, 32], 1);
        let segs = vec![
            KvSegment { key: random([2, 20, 2, 32], 2), value: random([2, 20, 2, 32], 3) },
            KvSegment { key: random([2, 29, 2, 32], 4), value: random([2, 29, 2, 32], 5) },
        ];
        let mut keep = vec![true; 2 * 49];
        for j in 40..49 {
            keep[49 + j] = false;
        }
        let device = Default::default();
        let mask = Tensor::<B, 2, burn::tensor::Bool>::from_data(TensorData::new(keep, [2, 49]), &device);
        for key_mask in [None, Some(mask)] {
            let exact = AttentionOptions { key_mask: key_mask.clone(), ..Default::default() };
            let fp8 = AttentionOptions { fp8: true, ..exact.clone() };
            let want = portable::attention(q.clone(), &segs, &exact);
            let got = portable::attention(q.clone(), &segs, &fp8);
            let err = rel_l2(&got, &want);
            println!("FP8 attention against exact attention, mask {}: rel. L2 {err:.3e}", key_mask.is_some());
            // e4m3 keeps 3 mantissa bits: 3.6 % r.m.s. per rounded probability, which on random (diffuse,
            // zero-mean) attention stays in the output (PyTorch's float8_e4m3fn gives 3.6 % on 512 x 2048 random
            // heads the same way); the int8 logits add less (3.3 % here). A wrong scale or key order is far beyond
            // 5 %.
            assert!(err > 1e-3 && err < 5e-2, "rel. L2 {err}");
        }
    }

    #[test]
    fn the_kernels_integer_to_float_trick_is_exact_for_every_logit() {
        // `small_int_to_f32` in kernels/flash_attention_fp8.cu: the bits of 1.5·2^23 plus i, minus 1.5·2^23.
        let convert = |i: i32| f32::from_bits((0x4B40_0000 + i) as u32) - 12_582_912.0;
        let most = 127 * 127 * 128;
        for i in [-most, -most + 1, -4097, -1, 0, 1, 2, 4097, most - 1, most, (1 << 22) - 1, -(1 << 22) + 1] {
            assert_eq!(convert(i), i as f32, "{i}");
        }
    }

    #[test]
    fn the_kernels_fma_exp2_is_within_its_stated_error() {
        // `exp2_fma` in kernels/wgmma.cuh (a tuning switch of the FP8 kernel), step for step.
        let exp2_fma = |x: f32| {
            let x = x.max(-125.0);
            let t = x + 12_582_912.0;
            let f = x - (t - 12_582_912.0);
            let p = 0.054_592_83f32.mul_add(f, 0.242_217_84).mul_add(f, 0.693_368_6).mul_add(f, 1.0);
            let shift = ((t.to_bits() as i32 - 0x4B40_0000) as u32) << 23;
            f32::from_bits(p.to_bits().wrapping_add(shift))
        };
        let worst = (-124_000..8_000)
            .map(|i| i as f32 / 1000.0)
            .map(|x| (exp2_fma(x) / x.exp2() - 1.0).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1.2e-4, "{worst:e}");
        assert!(exp2_fma(f32::NEG_INFINITY) <= 2f32.powi(-125));
    }

    #[test]
    fn causal_fp8_attention_masks_the_later_keys() {
        // Queries aligned with the keys: close to exact causal attention, far from the non-causal result.
        let q = random([1, 40, 2, 32], 6);
        let seg = vec![KvSegment { key: random([1, 40, 2, 32], 7), value: random([1, 40, 2, 32], 8) }];
        let causal = AttentionOptions { causal: true, fp8: true, ..Default::default() };
        let got = portable::attention(q.clone(), &seg, &causal);
        let exact = portable::attention(q.clone(), &seg, &AttentionOptions { fp8: false, ..causal.clone() });
        let err = rel_l2(&got, &exact);
        assert!(err > 1e-3 && err < 5e-2, "rel. L2 {err}");
        let open = portable::attention(q, &seg, &AttentionOptions { causal: false, ..causal });
        assert!(rel_l2(&got, &open) > 0.1);
    }

    #[test]
    fn the_emulation_follows_the_written_out_definition() {
        // One head, two keys, D = 2. The keys' mean (0.125, 0) leaves ±(0.125, 0): int8 ±127 with scales 0.125/127.
        // Logits ±127 · 0.125 = ±15.875 times log2(e)/√2: key 1's probability 2^(8 − 32.4) rounds to 0 in e4m3,
        // and the fused multiply-add keeps key 0's within 2^±1e-6 of 256, so o = v[key 0].
        let s = AttentionShape { batch: 1, queries: 1, heads: 1, keys: 2, kv_heads: 1, head_dim: 2 };
        let (q, k, v) = ([127.0f32, 0.0], [0.25f32, 0.0, 0.0, 0.0], [1.0f32, -2.0, 0.5, 4.0]);
        let ops = quantize_operands(&q, &k, &v, s);
        assert_eq!((ops.q.as_slice(), ops.q_scales.as_slice()), ([127i8, 0].as_slice(), [1.0f32].as_slice()));
        assert_eq!(ops.k_mean, vec![0.125, 0.0]);
        assert_eq!(ops.k, vec![127, 0, -127, 0]);
        assert_eq!(ops.k_scales, vec![0.125 / 127.0; 2]);
        assert_eq!(ops.v_scales, vec![1.0 / 448.0, 4.0 / 448.0]);
        let out = attention_host(&ops, None, false, s);
        for (o, w) in out.iter().zip([1.0f32, -2.0]) {
            assert!((o - w).abs() <= 1e-5 * w.abs(), "{out:?}");
        }
        // Both keys masked: zeros.
        assert_eq!(attention_host(&ops, Some(&[false, false]), false, s), vec![0.0, 0.0]);
        // Equal logits: o is the mean of the values (p = 256 each, exact in e4m3).
        let ops = quantize_operands(&[0.0, 0.0], &k, &v, s);
        let out = attention_host(&ops, None, false, s);
        assert!((out[0] - 0.75).abs() < 1e-6 && (out[1] - 1.0).abs() < 1e-6, "{out:?}");
        // Rounding to int8 is to nearest even, clamped.
        assert_eq!(int8_row([2.5f32, -127.0, 0.5].into_iter()).0, vec![2, -127, 0]);
    }
}
