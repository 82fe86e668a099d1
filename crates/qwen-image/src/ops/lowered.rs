//! Convolution and attention lowered to [`QwenBackend::dense`] GEMMs plus data movement, for backends whose GEMM is
//! fast but whose own convolution or attention kernels are slow to compile, tune or run (burn's CUDA backend on the
//! VAE). Exact reformulations: the tests compare them with [`portable`](super::portable) on the CPU.

use burn::tensor::{activation::softmax, DType, Slice, Tensor};

use super::{portable::repeat_kv, KvSegment, QwenBackend};
use crate::nn::zero_pad;

/// Largest im2col buffer [`conv2d`] builds at once; taller outputs are computed in bands of rows.
pub const CONV_COLUMNS_BYTES: usize = 1 << 30;

/// [`QwenBackend::conv2d_nchw`] as GEMMs: the input goes channels-last and zero-padded, the `k·k` shifted (and
/// strided) windows are concatenated along the channels (im2col, `[batch, rows·w', k·k·in]`) and multiplied by
/// the weight reordered to `[out, ky, kx, in]`, bias in the GEMM's epilogue. Bands of output rows keep the
/// im2col buffer under [`CONV_COLUMNS_BYTES`].
pub fn conv2d<B: QwenBackend>(
    x: Tensor<B, 4>,
    weight: &Tensor<B, 4>,
    bias: &Tensor<B, 1>,
    stride: usize,
    pad: usize,
) -> Tensor<B, 4> {
    conv2d_banded(x, weight, bias, stride, pad, CONV_COLUMNS_BYTES)
}

/// [`conv2d`] with an explicit im2col budget in bytes (at least one output row per band).
pub fn conv2d_banded<B: QwenBackend>(
    x: Tensor<B, 4>,
    weight: &Tensor<B, 4>,
    bias: &Tensor<B, 1>,
    stride: usize,
    pad: usize,
    budget: usize,
) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let [o, _, k, _] = weight.dims();
    let (hp, wp) = (h + 2 * pad, w + 2 * pad);
    let (ho, wo) = ((hp - k) / stride + 1, (wp - k) / stride + 1);
    let dtype = x.dtype();
    let x = zero_pad(zero_pad(x.permute([0, 2, 3, 1]), 2, pad, pad), 1, pad, pad);
    let w2 = weight.clone().permute([0, 2, 3, 1]).reshape([o, k * k * c]);
    let row_bytes = n * wo * k * k * c * dtype.size();
    let band = (budget / row_bytes.max(1)).clamp(1, ho);
    let span = |len: usize| (len - 1) * stride + 1;
    let bands: Vec<Tensor<B, 4>> = (0..ho)
        .step_by(band)
        .map(|r0| {
            let rows = band.min(ho - r0);
            let cols = if k == 1 && stride == 1 {
                x.clone().slice([0..n, r0..r0 + rows, 0..wo, 0..c])
            } else {
                let taps = (0..k * k)
                    .map(|t| {
                        let (y0, x0) = (r0 * stride + t / k, t % k);
                        x.clone().slice([
                            Slice::from(0..n),
                            Slice::new(y0 as isize, Some((y0 + span(rows)) as isize), stride as isize),
                            Slice::new(x0 as isize, Some((x0 + span(wo)) as isize), stride as isize),
                            Slice::from(0..c),
                        ])
                    })
                    .collect();
                Tensor::cat(taps, 3)
            };
            B::dense(cols.reshape([n, rows * wo, k * k * c]), &w2, Some(bias)).reshape([n, rows, wo, o])
        })
        .collect();
    let y =
        if bands.len() == 1 { bands.into_iter().next().expect("one band") } else { Tensor::cat(bands, 1) };
    y.permute([0, 3, 1, 2])
}

/// Largest block of f32 attention scores [`attention`] holds at once (128 MiB); longer query sequences are computed
/// in chunks of query rows. The softmax's temporaries are each this large too, so a chunk holds about four times it
/// (about 0.5 GiB): without chunks the VAE's middle attention at 1024² (16 384 tokens) held 0.5 GiB of bf16 scores
/// and three 1 GiB f32 tensors at once.
pub const ATTENTION_SCORES_BYTES: usize = 128 << 20;

/// [`QwenBackend::attend`] without a key mask or causality as two GEMMs per (batch, head, chunk of queries): the
/// scores `q·kᵀ/√d` (rounded to the tensor dtype), a softmax in f32, then `p·v`. Serves short or single-head cases
/// the flash kernels do not cover (the VAE's 384-wide single head); chunks of query rows keep the f32 scores under
/// [`ATTENTION_SCORES_BYTES`].
pub fn attention<B: QwenBackend>(query: Tensor<B, 4>, segments: &[KvSegment<B>]) -> Tensor<B, 4> {
    attention_chunked(query, segments, ATTENTION_SCORES_BYTES)
}

/// The query rows per chunk that keep `keys` f32 scores per row within `budget` bytes (at least one row).
pub fn attention_rows_per_chunk(keys: usize, budget: usize) -> usize {
    (budget / (keys * DType::F32.size()).max(1)).max(1)
}

/// [`attention`] with an explicit budget in bytes for one chunk's f32 scores (at least one query row per chunk).
pub fn attention_chunked<B: QwenBackend>(
    query: Tensor<B, 4>,
    segments: &[KvSegment<B>],
    budget: usize,
) -> Tensor<B, 4> {
    let [b, nq, h, d] = query.dims();
    let cat = |f: fn(&KvSegment<B>) -> Tensor<B, 4>| Tensor::cat(segments.iter().map(f).collect(), 1);
    let (key, value) = (cat(|s| s.key.clone()), cat(|s| s.value.clone()));
    let [_, nk, hk, _] = key.dims();
    let (key, value) = (repeat_kv(key, h / hk), repeat_kv(value, h / hk));
    let dtype = query.dtype();
    let query = query * (1.0 / (d as f64).sqrt());
    // At least one chunk, also for no queries (one empty chunk, as before chunking).
    let rows = attention_rows_per_chunk(nk, budget).min(nq).max(1);
    let mut heads = Vec::with_capacity(b * h);
    for bi in 0..b {
        for hi in 0..h {
            let pick = |t: &Tensor<B, 4>, span: std::ops::Range<usize>| {
                let len = span.len();
                t.clone().slice([bi..bi + 1, span, hi..hi + 1, 0..d]).reshape([1, len, d])
            };
            let (k, v) = (pick(&key, 0..nk).reshape([nk, d]), pick(&value, 0..nk).reshape([nk, d]));
            let vt = v.transpose();
            let chunks: Vec<Tensor<B, 3>> = (0..nq.max(1))
                .step_by(rows)
                .map(|r0| {
                    let scores = B::dense(pick(&query, r0..(r0 + rows).min(nq)), &k, None);
                    let p = softmax(scores.cast(DType::F32), 2).cast(dtype);
                    B::dense(p, &vt, None)
                })
                .collect();
            let head = if chunks.len() == 1 {
                chunks.into_iter().next().expect("one chunk")
            } else {
                Tensor::cat(chunks, 1)
            };
            heads.push(head.reshape([1, nq, 1, d]));
        }
    }
    let per_batch: Vec<Tensor<B, 4>> = heads.chunks(h).map(|hs| Tensor::cat(hs.to_vec(), 2)).collect();
    Tensor::cat(per_batch, 0)
}
