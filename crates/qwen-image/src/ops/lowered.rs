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

/// [`QwenBackend::attend`] without a key mask or causality as two GEMMs per (batch, head): the scores
/// `q·kᵀ/√d` (rounded to the tensor dtype), a softmax in f32, then `p·v`. Memory grows with queries × keys, so
/// this serves short or single-head cases the flash kernels do not cover (the VAE's 384-wide single head).
pub fn attention<B: QwenBackend>(query: Tensor<B, 4>, segments: &[KvSegment<B>]) -> Tensor<B, 4> {
    let [b, nq, h, d] = query.dims();
    let cat = |f: fn(&KvSegment<B>) -> Tensor<B, 4>| Tensor::cat(segments.iter().map(f).collect(), 1);
    let (key, value) = (cat(|s| s.key.clone()), cat(|s| s.value.clone()));
    let [_, nk, hk, _] = key.dims();
    let (key, value) = (repeat_kv(key, h / hk), repeat_kv(value, h / hk));
    let dtype = query.dtype();
    let query = query * (1.0 / (d as f64).sqrt());
    let mut heads = Vec::with_capacity(b * h);
    for bi in 0..b {
        for hi in 0..h {
            let pick = |t: &Tensor<B, 4>, len: usize| {
                t.clone().slice([bi..bi + 1, 0..len, hi..hi + 1, 0..d]).reshape([1, len, d])
            };
            let (q, k, v) = (pick(&query, nq), pick(&key, nk), pick(&value, nk));
            let scores = B::dense(q, &k.reshape([nk, d]), None);
            let p = softmax(scores.cast(DType::F32), 2).cast(dtype);
            let vt = v.reshape([nk, d]).transpose();
            heads.push(B::dense(p, &vt, None).reshape([1, nq, 1, d]));
        }
    }
    let per_batch: Vec<Tensor<B, 4>> = heads.chunks(h).map(|hs| Tensor::cat(hs.to_vec(), 2)).collect();
    Tensor::cat(per_batch, 0)
}
