//! The portable implementations of [`QwenBackend`]'s methods, written with burn tensor ops: the defaults, the
//! fallbacks of the accelerated backends, and the references their tests compare with.

use burn::tensor::{
    activation, backend::Backend, module::attention as burn_attention, ops::AttentionModuleOptions, DType,
    Int, Tensor, TensorData,
};

pub use crate::quant::portable::{
    dense_fp8, dense_fp8_gelu_tanh, dense_fp8_quantized, dequantize_activation, layer_norm_modulate_fp8,
    quantize_activation, quantize_fp8,
};
pub use crate::{
    nn::rms_norm,
    pixels::{read_rgb8, upload_rgb8},
    text_encoder::rotary::portable_rotary_half as rotary_half,
    vae::norm::portable_channel_rms_norm as channel_rms_norm,
};

use super::{AttentionOptions, KvSegment, NormRope, QwenBackend};
use crate::{
    dit::{
        modulation::{per_token, ModRuns},
        rope::RopeTensors,
    },
    nn::layer_norm,
};

/// `x · weightᵀ + bias` (see [`QwenBackend::dense`]).
pub fn dense<B: Backend>(
    x: Tensor<B, 3>,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Tensor<B, 3> {
    let y = x.matmul(weight.clone().transpose().unsqueeze::<3>());
    match bias {
        Some(b) => y + b.clone().unsqueeze::<3>(),
        None => y,
    }
}

/// `gelu_tanh(x · weightᵀ + bias)`.
pub fn dense_gelu_tanh<B: Backend>(
    x: Tensor<B, 3>,
    weight: &Tensor<B, 2>,
    bias: Option<&Tensor<B, 1>>,
) -> Tensor<B, 3> {
    activation::gelu_approximate(dense(x, weight, bias))
}

/// The reference attention: concatenates the segments, repeats K/V heads for GQA and calls burn's attention;
/// with [`AttentionOptions::fp8`], the FP8 attention's host emulation.
pub fn attention<B: Backend>(
    query: Tensor<B, 4>,
    segments: &[KvSegment<B>],
    options: &AttentionOptions<B>,
) -> Tensor<B, 4> {
    let [batch, queries, heads, _] = query.dims();
    let cat = |parts: Vec<Tensor<B, 4>>| {
        if parts.len() == 1 {
            parts[0].clone()
        } else {
            Tensor::cat(parts, 1)
        }
    };
    let key = cat(segments.iter().map(|s| s.key.clone()).collect());
    let value = cat(segments.iter().map(|s| s.value.clone()).collect());
    if options.fp8 {
        return crate::quant::attention::attention_fp8(query, key, value, options);
    }
    let kv_heads = key.dims()[2];
    let keys = key.dims()[1];
    let (key, value) = (repeat_kv(key, heads / kv_heads), repeat_kv(value, heads / kv_heads));
    let mask = options.key_mask.clone().map(|m| {
        // burn: `true` = masked out.
        m.bool_not().reshape([batch, 1, 1, keys]).expand([batch, heads, queries, keys])
    });
    let out = burn_attention(
        query.swap_dims(1, 2),
        key.swap_dims(1, 2),
        value.swap_dims(1, 2),
        mask,
        None,
        AttentionModuleOptions { is_causal: options.causal, ..Default::default() },
    );
    out.swap_dims(1, 2)
}

/// Block-diagonal attention by slicing the blocks and calling `attend` on each.
pub fn attention_blocks<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    cu_seqlens: &[usize],
    attend: impl Fn(Tensor<B, 4>, &[KvSegment<B>], &AttentionOptions<B>) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let outputs: Vec<Tensor<B, 4>> = cu_seqlens
        .windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| {
            let (a, n) = (w[0], w[1] - w[0]);
            let seg = KvSegment { key: k.clone().narrow(1, a, n), value: v.clone().narrow(1, a, n) };
            attend(q.clone().narrow(1, a, n), &[seg], &AttentionOptions::default())
        })
        .collect();
    Tensor::cat(outputs, 1)
}

/// `LayerNorm(x) · (1 + scale) + shift` with per-token rows.
pub fn layer_norm_modulate<B: Backend>(
    x: Tensor<B, 3>,
    shift: &Tensor<B, 3>,
    scale: &Tensor<B, 3>,
    runs: &[(usize, usize)],
    eps: f64,
) -> Tensor<B, 3> {
    let runs = ModRuns::new(runs.iter().copied());
    layer_norm(x, eps) * (per_token(scale, &runs) + 1.0) + per_token(shift, &runs)
}

/// `residual + gate · y` with per-token rows.
pub fn gated_residual<B: Backend>(
    residual: Tensor<B, 3>,
    y: Tensor<B, 3>,
    gate: &Tensor<B, 3>,
    runs: &[(usize, usize)],
) -> Tensor<B, 3> {
    residual + per_token(gate, &ModRuns::new(runs.iter().copied())) * y
}

/// `rope(rms_norm(x) · weight)`.
pub fn rms_norm_rope<B: Backend>(
    x: Tensor<B, 4>,
    weight: &Tensor<B, 1>,
    eps: f64,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
) -> Tensor<B, 4> {
    RopeTensors { cos: cos.clone(), sin: sin.clone() }.apply(rms_norm(x, weight, eps))
}

/// `rms_norm_rope` of each part, concatenated along the tokens.
pub fn rms_norm_rope_cat<B: QwenBackend>(parts: &[NormRope<'_, B>]) -> Tensor<B, 4> {
    let outs = parts.iter().map(|p| B::rms_norm_rope(p.x.clone(), p.weight, p.eps, p.cos, p.sin)).collect();
    Tensor::cat(outs, 1)
}

/// burn's upload of `data`, in its own dtype.
pub fn upload<B: Backend, const D: usize>(data: TensorData, device: &B::Device) -> Tensor<B, D> {
    let dtype = data.dtype;
    Tensor::from_data(data, (device, dtype))
}

/// [`upload`] of a copy of `bytes` (dense row-major values of a `dtype` tensor of `shape`).
pub fn upload_bytes<B: Backend, const D: usize>(
    bytes: &[u8],
    shape: [usize; D],
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, D> {
    upload(TensorData::from_bytes_vec(bytes.to_vec(), shape, dtype), device)
}

/// A `U8` integer tensor holding a copy of `bytes`.
pub fn upload_u8<B: Backend, const D: usize>(
    bytes: &[u8],
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::from_bytes_vec(bytes.to_vec(), shape, DType::U8), (device, DType::U8))
}

/// `silu(gate) · up`.
pub fn silu_mul<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    activation::silu(gate) * up
}

/// burn's `conv2d` (see [`QwenBackend::conv2d_nchw`]).
pub fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: &Tensor<B, 4>,
    bias: &Tensor<B, 1>,
    stride: usize,
    pad: usize,
) -> Tensor<B, 4> {
    burn::tensor::module::conv2d(
        x,
        weight.clone(),
        Some(bias.clone()),
        burn::tensor::ops::ConvOptions::new([stride, stride], [pad, pad], [1, 1], 1),
    )
}

/// Repeats each of the `kv_heads` heads `n` times along the head axis (`[b, s, kv_heads, d]` layout).
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
    if n == 1 {
        return x;
    }
    let [b, s, h, d] = x.dims();
    x.unsqueeze_dim::<5>(3).expand([b, s, h, n, d]).reshape([b, s, h * n, d])
}
