//! Rotate-half rotary application, shared by the vision tower and the language model.
//!
//! `x·cos + rotate_half(x)·sin` with `rotate_half(x) = [−x₂, x₁]` (the two halves of the head). This pairs channel
//! `i` with `i + head_dim/2`, unlike the DiT's interleaved pairs `(2k, 2k+1)`.

use burn::tensor::{backend::Backend, Tensor};

/// `[−x₂, x₁]` of the last axis' halves.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L201
pub fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.narrow(3, d / 2, d - d / 2);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

/// Rotates `x` (`[batch, tokens, heads, head_dim]`) by the angles whose `cos`/`sin` are `[tokens, head_dim]`.
///
/// The arithmetic runs in `x`'s dtype; `cos` and `sin` must have that dtype too (callers choose: the vision tower
/// rotates in f32, the language model in the activation dtype, as transformers does).
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L567
pub fn apply_rotary<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 4> {
    let [_, s, _, d] = x.dims();
    let cos = cos.clone().reshape([1, s, 1, d]);
    let sin = sin.clone().reshape([1, s, 1, d]);
    x.clone() * cos + rotate_half(x) * sin
}

/// [`apply_rotary`] in the dtype of `cos`/`sin`, the result cast back to `x`'s: the portable
/// [`QwenBackend::rotary_half`](crate::ops::QwenBackend::rotary_half).
pub fn portable_rotary_half<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
) -> Tensor<B, 4> {
    let (dtype, table) = (x.dtype(), cos.dtype());
    if dtype == table {
        apply_rotary(x, cos, sin)
    } else {
        apply_rotary(x.cast(table), cos, sin).cast(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn pairs_channel_i_with_i_plus_half() {
        let dev = Default::default();
        let x = Tensor::<Flex, 4>::from_floats([[[[1.0, 2.0, 3.0, 4.0]]]], &dev);
        // Rotate pair (0, 2) by 90° and leave pair (1, 3) alone.
        let cos = Tensor::<Flex, 2>::from_floats([[0.0, 1.0, 0.0, 1.0]], &dev);
        let sin = Tensor::<Flex, 2>::from_floats([[1.0, 0.0, 1.0, 0.0]], &dev);
        let y: Vec<f32> = apply_rotary(x, &cos, &sin).into_data().to_vec().unwrap();
        // (x0, x2) = (1, 3) → (−3, 1); (x1, x3) unchanged.
        assert_eq!(y, vec![-3.0, 2.0, 1.0, 4.0]);
    }
}
