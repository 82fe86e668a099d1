//! FP8 attention ([`AttentionOptions::fp8`](crate::ops::AttentionOptions::fp8)): what it computes, and its portable
//! emulation on the host, the reference the CUDA kernel (`kernels/flash_attention_fp8.cu`) is tested against.
//!
//! For `query [batch, queries, heads, D]` over keys and values `[batch, keys, kv_heads, D]` (the segments
//! concatenated), with `g = heads / kv_heads` and `hk = h / g`:
//!
//! 1. **Quantization** (each `e4m3(x / s)` as [`e4m3::quantize_rows`] rounds: the division in f32, round to nearest
//!    even, saturating at ±448; `s` = [`e4m3::row_scale`] of the largest magnitude):
//!    - `Q` per query row and head: `sq[b, i, h]` over the row's `D` values;
//!    - `K` per batch and key head: `sk[b, hk]` over all keys and columns of the head (e4m3 keeps 2⁻⁶…448 normal,
//!      so one scale per head loses nothing to range on keys whose norms differ by less than 2¹⁴);
//!    - `V` per batch, key head and column: `sv[b, hk, d]` over all keys.
//! 2. **Logits** `t[i, j] = (Σ_d q8[i, d] · k8[j, d]) · f[i]` with `f[i] = (sq[i] · sk) · log2(e) / √D` (products
//!    exact, sums in f32); masked keys get `-∞`.
//! 3. **Probabilities, online** over tiles of [`KEY_TILE`] keys from key 0 (FlashAttention's rescaling, in the
//!    kernel's order): for tile `T`, `m_T = max(m_{T−1}, (maxⱼ∈T dot[i, j]) · f[i])` (`m_{−1} = −∞`),
//!    `p[i, j] = 2^fma(dot[i, j], f[i], 8 − m_T)`: at most 256, so that the small ones stay normal in e4m3
//!    (FlashAttention-3's `Max_offset`); `α_T = 2^(m_{T−1} − m_T)`, `l ← l · α_T + Σⱼ∈T p[i, j]` and
//!    `acc ← acc · α_T + Σⱼ∈T e4m3(p[i, j]) · v8[j, ·]`, in f32.
//! 4. **Output** `o[i, d] = (acc[i, d] · (1 / l[i])) · sv[d]`, rounded once to the query's dtype; a row with every
//!    key masked gives zeros.
//!
//! The probabilities are rounded to e4m3 against the running maximum, as the kernel does, so that the emulation and
//! the kernel differ only by the order of their f32 sums and the tensor cores' accumulation (and what the CPU gives
//! on the proxy is what a GPU gives); `tests/gpu_fp8.rs` bounds the difference.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use rayon::prelude::*;

use super::e4m3::{self, RowQuantized};
use crate::ops::{AttentionOptions, KvSegment};

/// `log2` of the factor the probabilities are scaled by before their e4m3 rounding (step 3 of the module docs).
pub const P_LOG2_OFFSET: f32 = 8.0;

/// Keys per tile of the online softmax (the kernel's tile).
pub const KEY_TILE: usize = 128;

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

/// Q, K and V quantized as step 1 of the module docs defines; bits in their tensors' `[batch, tokens, heads, D]`
/// order.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8AttentionOperands {
    /// Q per row: `bits [batch, queries, heads, D]`, `scales [batch, queries, heads]`.
    pub q: RowQuantized,
    /// K's bits, `[batch, keys, kv_heads, D]`.
    pub k_bits: Vec<u8>,
    /// K's scales, `[batch, kv_heads]`.
    pub k_scales: Vec<f32>,
    /// V's bits, `[batch, keys, kv_heads, D]`.
    pub v_bits: Vec<u8>,
    /// V's scales, `[batch, kv_heads, D]`.
    pub v_scales: Vec<f32>,
}

/// Step 1 of the module docs on the host, from f32 values in `[batch, tokens, heads, D]` order.
pub fn quantize_operands(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Fp8AttentionOperands {
    let (hk, d) = (s.kv_heads, s.head_dim);
    let q = e4m3::quantize_rows(q, d);
    let at = |b: usize, j: usize, h: usize, c: usize| ((b * s.keys + j) * hk + h) * d + c;
    let mut k_scales = Vec::with_capacity(s.batch * hk);
    let mut v_scales = Vec::with_capacity(s.batch * hk * d);
    for b in 0..s.batch {
        for h in 0..hk {
            let mut k_amax = 0f32;
            let mut v_amax = vec![0f32; d];
            for j in 0..s.keys {
                for (c, va) in v_amax.iter_mut().enumerate() {
                    k_amax = k_amax.max(k[at(b, j, h, c)].abs());
                    *va = va.max(v[at(b, j, h, c)].abs());
                }
            }
            k_scales.push(e4m3::row_scale(k_amax));
            v_scales.extend(v_amax.into_iter().map(e4m3::row_scale));
        }
    }
    let mut k_bits = vec![0u8; k.len()];
    let mut v_bits = vec![0u8; v.len()];
    for (i, (kb, vb)) in k_bits.iter_mut().zip(v_bits.iter_mut()).enumerate() {
        let (c, h, b) = (i % d, (i / d) % hk, i / (d * hk * s.keys));
        *kb = e4m3::encode(k[i] / k_scales[b * hk + h]);
        *vb = e4m3::encode(v[i] / v_scales[(b * hk + h) * d + c]);
    }
    Fp8AttentionOperands { q, k_bits, k_scales, v_bits, v_scales }
}

/// Steps 2–4 of the module docs on the host (before the final rounding): `[batch, queries, heads, D]` in f32.
/// `mask` is `[batch, keys]`, `true` = attend.
pub fn attention_host(ops: &Fp8AttentionOperands, mask: Option<&[bool]>, s: AttentionShape) -> Vec<f32> {
    let (hk, d, g) = (s.kv_heads, s.head_dim, s.heads / s.kv_heads.max(1));
    let table = e4m3::decode_table();
    let decode = |bits: &[u8]| bits.iter().map(|&b| table[b as usize]).collect::<Vec<f32>>();
    let (q8, k8, v8) = (decode(&ops.q.bits), decode(&ops.k_bits), decode(&ops.v_bits));
    let softmax_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
    let mut out = vec![0f32; s.batch * s.queries * s.heads * d];
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let (h, b) = (row % s.heads, row / (s.heads * s.queries));
        let kh = h / g;
        let f = ops.q.scales[row] * ops.k_scales[b * hk + kh] * softmax_log2;
        let q = &q8[row * d..(row + 1) * d];
        let key = |j: usize| ((b * s.keys + j) * hk + kh) * d;
        // Raw dot products of the e4m3 values, masked keys at -∞.
        let dot: Vec<f32> = (0..s.keys)
            .map(|j| match mask.is_some_and(|m| !m[b * s.keys + j]) {
                true => f32::NEG_INFINITY,
                false => q.iter().zip(&k8[key(j)..key(j) + d]).fold(0f32, |acc, (a, b)| acc + a * b),
            })
            .collect();
        let (mut m_run, mut l) = (f32::NEG_INFINITY, 0f32);
        let mut acc = vec![0f32; d];
        for (tile, dots) in dot.chunks(KEY_TILE).enumerate() {
            let m_new = m_run.max(dots.iter().copied().fold(f32::NEG_INFINITY, f32::max) * f);
            let m_use = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
            let alpha = if m_run == f32::NEG_INFINITY { 0.0 } else { (m_run - m_use).exp2() };
            m_run = m_new;
            let bias = P_LOG2_OFFSET - m_use;
            let mut sum = 0f32;
            let mut tile_acc = vec![0f32; d];
            for (jt, &dj) in dots.iter().enumerate() {
                let p = dj.mul_add(f, bias).exp2();
                sum += p;
                let p8 = table[e4m3::encode(p) as usize];
                let j = tile * KEY_TILE + jt;
                for (a, v) in tile_acc.iter_mut().zip(&v8[key(j)..key(j) + d]) {
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
            *o = (a * inv) * s;
        }
    });
    out
}

/// The portable FP8 attention ([`AttentionOptions::fp8`]): the operands and the key mask read to the host,
/// [`quantize_operands`] and [`attention_host`], the result uploaded in the query's dtype.
pub fn attention_fp8<B: Backend>(
    query: Tensor<B, 4>,
    segments: &[KvSegment<B>],
    options: &AttentionOptions<B>,
) -> Tensor<B, 4> {
    let ([batch, queries, heads, head_dim], dtype, device) = (query.dims(), query.dtype(), query.device());
    let cat = |parts: Vec<Tensor<B, 4>>| Tensor::cat(parts, 1);
    let key = cat(segments.iter().map(|s| s.key.clone()).collect());
    let value = cat(segments.iter().map(|s| s.value.clone()).collect());
    let [_, keys, kv_heads, _] = key.dims();
    let shape = AttentionShape { batch, queries, heads, keys, kv_heads, head_dim };
    let host = super::portable::host_f32::<B, 4>;
    let ops = quantize_operands(&host(query), &host(key), &host(value), shape);
    let mask = options
        .key_mask
        .clone()
        .map(|m| m.int().into_data().iter::<i64>().map(|x| x != 0).collect::<Vec<_>>());
    let out = attention_host(&ops, mask.as_deref(), shape);
    Tensor::<B, 4>::from_data(TensorData::new(out, [batch, queries, heads, head_dim]), (&device, DType::F32))
        .cast(dtype)
}

#[cfg(test)]
mod tests {
    use burn::{backend::Flex, tensor::Distribution};

    use super::*;
    use crate::ops::portable;

    type B = Flex;

    fn rel_l2(a: &Tensor<B, 4>, b: &Tensor<B, 4>) -> f32 {
        let d = (a.clone() - b.clone()).powi_scalar(2).sum().into_scalar();
        let n = b.clone().powi_scalar(2).sum().into_scalar();
        (d / n).sqrt()
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
            // e4m3 keeps 3 mantissa bits: 3.6 % r.m.s. per rounded value. On random (diffuse, zero-mean) attention
            // the rounding of Q·Kᵀ and of P each add about that much (PyTorch's float8_e4m3fn gives 5.2 % on
            // 512 x 2048 random heads the same way); a wrong scale or key order is far beyond 8 %.
            assert!(err > 1e-3 && err < 8e-2, "rel. L2 {err}");
        }
    }

    #[test]
    fn the_emulation_follows_the_written_out_definition() {
        // One head, two keys, D = 2, values exact in e4m3. Logits 448·0.125·log2(e)/√2 ≈ 57.1 and 0: key 1's
        // probability 2^(8 − 57.1) rounds to 0 in e4m3, and the fused multiply-add keeps key 0's within 2^±2e-6 of 256.
        let s = AttentionShape { batch: 1, queries: 1, heads: 1, keys: 2, kv_heads: 1, head_dim: 2 };
        let (q, k, v) = ([448.0f32, 0.0], [0.125f32, 0.0, 0.0, 448.0], [1.0f32, -2.0, 0.5, 4.0]);
        let ops = quantize_operands(&q, &k, &v, s);
        assert_eq!(ops.q.scales, vec![1.0]);
        assert_eq!(ops.k_scales, vec![1.0]);
        assert_eq!(ops.v_scales, vec![1.0 / 448.0, 4.0 / 448.0]);
        let out = attention_host(&ops, None, s);
        // o = v[key 0].
        for (o, w) in out.iter().zip([1.0f32, -2.0]) {
            assert!((o - w).abs() <= 1e-5 * w.abs(), "{out:?}");
        }
        // Both keys masked: zeros.
        assert_eq!(attention_host(&ops, Some(&[false, false]), s), vec![0.0, 0.0]);
        // Equal logits: o is the mean of the values (p = 256 each, exact in e4m3).
        let ops = quantize_operands(&[0.0, 0.0], &k, &v, s);
        let out = attention_host(&ops, None, s);
        assert!((out[0] - 0.75).abs() < 1e-6 && (out[1] - 1.0).abs() < 1e-6, "{out:?}");
    }
}
