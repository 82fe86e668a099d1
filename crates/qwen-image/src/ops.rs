//! [`QwenBackend`]: the operations whose speed decides the models' speed, as a backend extension trait.
//!
//! Every method has a portable default written with burn tensor ops (the functions of [`portable`]), so any burn
//! backend runs the models and every test runs on the CPU. An accelerated backend overrides the methods it can do
//! better (the `cuda` feature: cuBLASLt GEMMs, our flash attention, fused elementwise kernels) and falls back to
//! [`portable`] for what it does not support; the portable functions stay the reference the fast path is tested
//! against.

use burn::tensor::{backend::Backend, Bool, Tensor};

/// Keys and values of one contiguous range of the key sequence, `[batch, keys, kv_heads, head_dim]` each.
#[derive(Clone, Debug)]
pub struct KvSegment<B: Backend> {
    /// Keys (already normalized and rotated), `[batch, keys, kv_heads, head_dim]`.
    pub key: Tensor<B, 4>,
    /// Values, `[batch, keys, kv_heads, head_dim]`.
    pub value: Tensor<B, 4>,
}

/// Options of [`QwenBackend::attend`].
#[derive(Clone, Debug, Default)]
pub struct AttentionOptions<B: Backend> {
    /// Causal masking (query `i` sees keys `0..=i`, aligned at the start; queries and keys must have the same
    /// length).
    pub causal: bool,
    /// Which keys may be attended to, `[batch, total_keys]`, `true` = attend. `None` = all.
    pub key_mask: Option<Tensor<B, 2, Bool>>,
}

/// Backend operations used by the Qwen-Image networks, with portable defaults.
///
/// Layouts follow PyTorch checkpoints: a linear weight is `[out_features, in_features]`; attention tensors are
/// `[batch, sequence, heads, head_dim]` (the layout projections produce, so no transposes are needed).
pub trait QwenBackend: Backend {
    /// `x · weightᵀ + bias`, weight `[out, in]`; `x` is `[batch, tokens, in]`.
    fn dense(
        x: Tensor<Self, 3>,
        weight: &Tensor<Self, 2>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        portable::dense(x, weight, bias)
    }

    /// `gelu_tanh(x · weightᵀ + bias)`: the first half of the DiT's MLP.
    fn dense_gelu_tanh(
        x: Tensor<Self, 3>,
        weight: &Tensor<Self, 2>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        portable::dense_gelu_tanh(x, weight, bias)
    }

    /// Scaled dot-product attention of `query` over the concatenation of `segments` along the key axis.
    ///
    /// `query` is `[batch, queries, heads, head_dim]`; each segment's key/value is
    /// `[batch, keys_i, kv_heads, head_dim]` with `heads` a multiple of `kv_heads` (grouped-query attention: query
    /// head `h` uses key head `h / (heads / kv_heads)`). The scale is `1/√head_dim`. Returns
    /// `[batch, queries, heads, head_dim]`.
    fn attend(
        query: Tensor<Self, 4>,
        segments: &[KvSegment<Self>],
        options: &AttentionOptions<Self>,
    ) -> Tensor<Self, 4> {
        portable::attention(query, segments, options)
    }

    /// Attention restricted to independent blocks of one sequence (vision windows, one image each).
    ///
    /// `q`, `k`, `v` are `[1, tokens, heads, head_dim]`; `cu_seqlens` are the block boundaries
    /// (`0 = c_0 < c_1 < … < c_n = tokens`). Token `i` of block `j` attends to the keys of block `j` only.
    fn attend_blocks(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        cu_seqlens: &[usize],
    ) -> Tensor<Self, 4> {
        portable::attention_blocks(q, k, v, cu_seqlens, Self::attend)
    }

    /// adaLN: `LayerNorm(x) · (1 + scale) + shift`, the modulation row of each token chosen by `runs`.
    ///
    /// `x` is `[batch, tokens, dim]`; `shift` and `scale` are `[rows, batch, dim]`; `runs` lists `(tokens, row)` in
    /// token order (as [`ModRuns`](crate::dit::modulation::ModRuns) holds them; an empty list means row 0 for every
    /// token). The LayerNorm has no affine parameters and takes its statistics in f32; its output is cast back to
    /// `x`'s dtype before the modulation.
    fn layer_norm_modulate(
        x: Tensor<Self, 3>,
        shift: &Tensor<Self, 3>,
        scale: &Tensor<Self, 3>,
        runs: &[(usize, usize)],
        eps: f64,
    ) -> Tensor<Self, 3> {
        portable::layer_norm_modulate(x, shift, scale, runs, eps)
    }

    /// Gated residual: `residual + gate · y`, the gate row of each token chosen by `runs` (see
    /// [`layer_norm_modulate`](Self::layer_norm_modulate)); `gate` is `[rows, batch, dim]`.
    fn gated_residual(
        residual: Tensor<Self, 3>,
        y: Tensor<Self, 3>,
        gate: &Tensor<Self, 3>,
        runs: &[(usize, usize)],
    ) -> Tensor<Self, 3> {
        portable::gated_residual(residual, y, gate, runs)
    }

    /// Per-head RMSNorm followed by the DiT's interleaved-pair RoPE: `rope(rms_norm(x) · weight)`.
    ///
    /// `x` is `[batch, tokens, heads, head_dim]`, `weight` `[head_dim]`; `cos` and `sin` are f32
    /// `[tokens, head_dim / 2]` (see [`RopeTensors`](crate::dit::rope::RopeTensors)).
    fn rms_norm_rope(
        x: Tensor<Self, 4>,
        weight: &Tensor<Self, 1>,
        eps: f64,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
    ) -> Tensor<Self, 4> {
        portable::rms_norm_rope(x, weight, eps, cos, sin)
    }

    /// The gated product of a SwiGLU MLP: `silu(gate) · up`, both `[batch, tokens, dim]`.
    fn silu_mul(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        portable::silu_mul(gate, up)
    }
}

/// The portable implementations of [`QwenBackend`]'s methods, written with burn tensor ops: the defaults, the
/// fallbacks of the accelerated backends, and the references their tests compare with.
pub mod portable {
    use burn::tensor::{
        activation, backend::Backend, module::attention as burn_attention, ops::AttentionModuleOptions,
        Tensor,
    };

    use super::{AttentionOptions, KvSegment};
    use crate::{
        dit::{
            modulation::{per_token, ModRuns},
            rope::RopeTensors,
        },
        nn::{layer_norm, rms_norm},
    };

    /// `x · weightᵀ + bias` (see [`QwenBackend::dense`](super::QwenBackend::dense)).
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

    /// The reference attention: concatenates the segments, repeats K/V heads for GQA and calls burn's attention.
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

    /// `silu(gate) · up`.
    pub fn silu_mul<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
        activation::silu(gate) * up
    }

    /// Repeats each of the `kv_heads` heads `n` times along the head axis (`[b, s, kv_heads, d]` layout).
    pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
        if n == 1 {
            return x;
        }
        let [b, s, h, d] = x.dims();
        x.unsqueeze_dim::<5>(3).expand([b, s, h, n, d]).reshape([b, s, h * n, d])
    }
}

pub use portable::{attention as portable_attention, repeat_kv};

impl QwenBackend for burn::backend::Flex {}
