//! 2-D convolutions, loaded from the checkpoint's causal 3-D kernels or from plain `Conv2d` weights.
//!
//! On a single frame with an empty feature cache, `QwenImageCausalConv3d` (kernel `k×k×k`, padding `(k−1)/2`,
//! all temporal padding in front) sees the frames `[0, …, 0, x]`: only the **last** temporal slice of its kernel
//! touches real data, so it is exactly a 2-D convolution with `weight[:, :, -1]`. The slice is taken on the host at
//! load time, straight from the checkpoint's bytes.

use burn::tensor::{backend::Backend, module::conv2d, ops::PaddedConvOptions, Tensor, TensorData};

use crate::{ops::QwenBackend, weights::WeightPath, Result};

/// A 2-D convolution with bias in PyTorch layout (`weight [out, in, k, k]`), stride 1 and "same" zero padding
/// `k / 2` unless called through [`Conv2d::forward_with`].
#[derive(Clone, Debug)]
pub struct Conv2d<B: Backend> {
    /// `[out_channels, in_channels, k, k]`.
    pub weight: Tensor<B, 4>,
    /// `[out_channels]`.
    pub bias: Tensor<B, 1>,
}

impl<B: QwenBackend> Conv2d<B> {
    /// Loads a `QwenImageCausalConv3d` (`{path}.weight [out, in, k, k, k]`, `{path}.bias [out]`) as the 2-D
    /// convolution it computes on one frame: the last temporal slice of the kernel.
    // https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L40
    pub fn load_causal(
        path: &mut WeightPath<'_>,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        device: &B::Device,
    ) -> Result<Self> {
        let key = path.key("weight");
        let store = path.store();
        let data = store.data(&key, Some(&[out_channels, in_channels, kernel, kernel, kernel]))?;
        let weight: Tensor<B, 4> = B::upload(last_temporal_slice(&data), device);
        let size = store.dtype().size();
        let planned = (out_channels * in_channels * kernel * kernel * size) as u64;
        store.count_placed(0, planned, weight.shape().num_elements() * size);
        Ok(Conv2d { weight, bias: path.tensor("bias", [out_channels], device)? })
    }

    /// Loads an `nn.Conv2d` (`{path}.weight [out, in, k, k]`, `{path}.bias [out]`).
    pub fn load_2d(
        path: &mut WeightPath<'_>,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(Conv2d {
            weight: path.tensor("weight", [out_channels, in_channels, kernel, kernel], device)?,
            bias: path.tensor("bias", [out_channels], device)?,
        })
    }

    /// Kernel size.
    pub fn kernel(&self) -> usize {
        self.weight.dims()[2]
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The convolution with explicit options (stride, asymmetric padding), always through burn's `conv2d`.
    pub fn forward_with(&self, x: Tensor<B, 4>, options: impl Into<PaddedConvOptions<2>>) -> Tensor<B, 4> {
        conv2d(x, self.weight.clone(), Some(self.bias.clone()), options)
    }
}

impl<B: QwenBackend> Conv2d<B> {
    /// `[batch, in, h, w] → [batch, out, h, w]`: stride 1, zero padding `k / 2` on every side
    /// ([`QwenBackend::conv2d_nchw`]).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        B::conv2d_nchw(x, &self.weight, &self.bias, 1, self.kernel() / 2)
    }

    /// Stride `stride` without padding ([`QwenBackend::conv2d_nchw`]).
    pub fn forward_strided(&self, x: Tensor<B, 4>, stride: usize) -> Tensor<B, 4> {
        B::conv2d_nchw(x, &self.weight, &self.bias, stride, 0)
    }
}

/// `weight[:, :, -1]` of a 5-D kernel `[out, in, kt, kh, kw]`, as a 4-D kernel `[out, in, kh, kw]` in the same dtype.
pub fn last_temporal_slice(data: &TensorData) -> TensorData {
    temporal_slice(data, data.shape[2] - 1)
}

/// `weight[:, :, t]` of a 5-D kernel `[out, in, kt, kh, kw]`, as a 4-D kernel `[out, in, kh, kw]` in the same dtype.
pub fn temporal_slice(data: &TensorData, t: usize) -> TensorData {
    let shape: [usize; 5] = data.shape.to_vec().try_into().expect("a 5-D convolution kernel");
    let [out, inp, kt, kh, kw] = shape;
    assert!(t < kt, "temporal slice {t} of a kernel with {kt} slices");
    let plane = kh * kw * data.dtype.size();
    let bytes = data.as_bytes();
    let mut sliced = Vec::with_capacity(out * inp * plane);
    for pair in 0..out * inp {
        let start = (pair * kt + t) * plane;
        sliced.extend_from_slice(&bytes[start..start + plane]);
    }
    TensorData::from_bytes_vec(sliced, [out, inp, kh, kw], data.dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::DType;

    #[test]
    fn slices_the_requested_temporal_plane() {
        // [1, 2, 3, 1, 2]: value = 100·in + 10·t + w.
        let mut values = Vec::new();
        for i in 0..2 {
            for t in 0..3 {
                for w in 0..2 {
                    values.push((100 * i + 10 * t + w) as f32);
                }
            }
        }
        let data = TensorData::new(values, [1, 2, 3, 1, 2]);
        let last = last_temporal_slice(&data);
        assert_eq!(last.shape.to_vec(), vec![1, 2, 1, 2]);
        assert_eq!(last.to_vec::<f32>().unwrap(), vec![20.0, 21.0, 120.0, 121.0]);
        let first = temporal_slice(&data.convert_dtype(DType::BF16), 0);
        assert_eq!(first.dtype, DType::BF16);
        assert_eq!(first.convert_dtype(DType::F32).to_vec::<f32>().unwrap(), vec![0.0, 1.0, 100.0, 101.0]);
    }
}
