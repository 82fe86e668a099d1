//! [`QwenBackend`]: the operations whose speed decides the models' speed, as a backend extension trait.
//!
//! Every method has a portable default written with burn tensor ops, so any burn backend runs the models and every
//! test runs on the CPU. An accelerated backend overrides the methods it can do better (cuBLASLt GEMMs, our flash
//! attention); the default stays the reference the fast path is tested against.

use burn::tensor::{
    activation, backend::Backend, module::attention, ops::AttentionModuleOptions, Bool, Tensor,
};

/// Keys and values of one contiguous range of the key sequence, `[batch, keys, kv_heads, head_dim]` each.
#[derive(Clone, Debug)]
pub struct KvSegment<B: Backend> {
    /// Keys (already normalized and rotated), `[batch, keys, kv_heads, head_dim]`.
    pub key: Tensor<B, 4>,
    /// Values, `[batch, keys, kv_heads, head_dim]`.
    pub value: Tensor<B, 4>,
}

/// Options of [`QwenBackend::attention`].
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
        let y = x.matmul(weight.clone().transpose().unsqueeze::<3>());
        match bias {
            Some(b) => y + b.clone().unsqueeze::<3>(),
            None => y,
        }
    }

    /// `gelu_tanh(x · weightᵀ + bias)`: the first half of the DiT's MLP.
    fn dense_gelu_tanh(
        x: Tensor<Self, 3>,
        weight: &Tensor<Self, 2>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        activation::gelu_approximate(Self::dense(x, weight, bias))
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
        portable_attention(query, segments, options)
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
        let outputs: Vec<Tensor<Self, 4>> = cu_seqlens
            .windows(2)
            .filter(|w| w[1] > w[0])
            .map(|w| {
                let (a, n) = (w[0], w[1] - w[0]);
                let seg = KvSegment { key: k.clone().narrow(1, a, n), value: v.clone().narrow(1, a, n) };
                Self::attend(q.clone().narrow(1, a, n), &[seg], &AttentionOptions::default())
            })
            .collect();
        Tensor::cat(outputs, 1)
    }
}

/// The reference attention: concatenates the segments, repeats K/V heads for GQA and calls burn's attention.
pub fn portable_attention<B: Backend>(
    query: Tensor<B, 4>,
    segments: &[KvSegment<B>],
    options: &AttentionOptions<B>,
) -> Tensor<B, 4> {
    let [batch, queries, heads, _] = query.dims();
    let cat =
        |parts: Vec<Tensor<B, 4>>| if parts.len() == 1 { parts[0].clone() } else { Tensor::cat(parts, 1) };
    let key = cat(segments.iter().map(|s| s.key.clone()).collect());
    let value = cat(segments.iter().map(|s| s.value.clone()).collect());
    let kv_heads = key.dims()[2];
    let keys = key.dims()[1];
    let (key, value) = (repeat_kv(key, heads / kv_heads), repeat_kv(value, heads / kv_heads));
    let mask = options.key_mask.clone().map(|m| {
        // burn: `true` = masked out.
        m.bool_not().reshape([batch, 1, 1, keys]).expand([batch, heads, queries, keys])
    });
    let out = attention(
        query.swap_dims(1, 2),
        key.swap_dims(1, 2),
        value.swap_dims(1, 2),
        mask,
        None,
        AttentionModuleOptions { is_causal: options.causal, ..Default::default() },
    );
    out.swap_dims(1, 2)
}

/// Repeats each of the `kv_heads` heads `n` times along the head axis (`[b, s, kv_heads, d]` layout).
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n: usize) -> Tensor<B, 4> {
    if n == 1 {
        return x;
    }
    let [b, s, h, d] = x.dims();
    x.unsqueeze_dim::<5>(3).expand([b, s, h, n, d]).reshape([b, s, h * n, d])
}

impl QwenBackend for burn::backend::Flex {}
