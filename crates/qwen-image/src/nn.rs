//! Small layers shared by the networks: linear, RMSNorm, LayerNorm without affine parameters.
//!
//! The structs are plain parameter holders (tensors loaded by [`WeightPath`]); there is no burn `Module`
//! machinery and no lazily initialized parameter that could silently stay random.

use burn::tensor::{backend::Backend, DType, Tensor};

use crate::{ops::QwenBackend, weights::WeightPath, Result};

/// A linear layer in PyTorch layout: `weight [out, in]`, optional `bias [out]`, and optional runtime low-rank
/// adapters (LoRA) added to its output.
#[derive(Clone, Debug)]
pub struct Linear<B: Backend> {
    /// `[out_features, in_features]`.
    pub weight: Tensor<B, 2>,
    /// `[out_features]`.
    pub bias: Option<Tensor<B, 1>>,
    /// Runtime (unmerged) LoRA adapters: `y = W·x + b + Σ scale·up(down(x))`. Empty for a plain layer.
    pub adapters: Vec<LowRankAdapter<B>>,
}

/// A runtime low-rank adapter of a [`Linear`]: adds `scale · up · down · x` to the layer's output.
#[derive(Clone, Debug)]
pub struct LowRankAdapter<B: Backend> {
    /// Identifies the adapter (the LoRA it came from), so that it can be removed again.
    pub id: u64,
    /// `[rank, in_features]` (`lora_down` / `lora_A`).
    pub down: Tensor<B, 2>,
    /// `[out_features, rank]` (`lora_up` / `lora_B`).
    pub up: Tensor<B, 2>,
    /// `alpha / rank` times the user's multiplier.
    pub scale: f32,
}

impl<B: QwenBackend> Linear<B> {
    /// A layer from its weight `[out, in]` and optional bias `[out]`, without adapters.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Linear { weight, bias, adapters: Vec::new() }
    }

    /// Loads `{path}.weight` (and `{path}.bias` when `bias`).
    pub fn load(
        path: &mut WeightPath<'_>,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Self> {
        let weight = path.tensor("weight", [out_dim, in_dim], device)?;
        let bias = if bias { Some(path.tensor("bias", [out_dim], device)?) } else { None };
        Ok(Linear::new(weight, bias))
    }

    /// `[batch, tokens, in] → [batch, tokens, out]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if self.adapters.is_empty() {
            return B::dense(x, &self.weight, self.bias.as_ref());
        }
        let base = B::dense(x.clone(), &self.weight, self.bias.as_ref());
        self.adapters.iter().fold(base, |y, a| {
            y + B::dense(B::dense(x.clone(), &a.down, None), &a.up, None).mul_scalar(a.scale)
        })
    }

    /// `gelu_tanh(self.forward(x))`, fused where the backend can.
    pub fn forward_gelu_tanh(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if self.adapters.is_empty() {
            B::dense_gelu_tanh(x, &self.weight, self.bias.as_ref())
        } else {
            burn::tensor::activation::gelu_approximate(self.forward(x))
        }
    }

    /// `[batch, in] → [batch, out]`.
    pub fn forward_2d(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [b, _] = x.dims();
        let y = self.forward(x.unsqueeze_dim(0));
        let out = y.dims()[2];
        y.reshape([b, out])
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// RMSNorm with a learned scale, as in diffusers' `RMSNorm` and HF's `Qwen2RMSNorm`: the mean square is taken in
/// f32, the normalized value is cast back to the input dtype and multiplied by the weight.
#[derive(Clone, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[dim]`.
    pub weight: Tensor<B, 1>,
    /// Added to the mean square.
    pub eps: f64,
}

impl<B: QwenBackend> RmsNorm<B> {
    /// Loads `{path}.weight`.
    pub fn load(path: &mut WeightPath<'_>, dim: usize, eps: f64, device: &B::Device) -> Result<Self> {
        Ok(RmsNorm { weight: path.tensor("weight", [dim], device)?, eps })
    }

    /// Normalizes over the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        rms_norm(x, &self.weight, self.eps)
    }
}

/// `x · rsqrt(mean(x²) + eps)` over the last axis in f32, cast back, times `weight`.
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let xf = x.cast(DType::F32);
    let inv = (xf.clone().square().mean_dim(D - 1) + eps).sqrt().recip();
    (xf * inv).cast(dtype) * weight.clone().unsqueeze::<D>()
}

/// LayerNorm over the last axis without affine parameters (`elementwise_affine=False`), statistics in f32.
pub fn layer_norm<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let dtype = x.dtype();
    let xf = x.cast(DType::F32);
    let (var, mean) = xf.clone().var_mean_bias(D - 1);
    ((xf - mean) * (var + eps).sqrt().recip()).cast(dtype)
}

/// Zero-pads axis `dim` with `before` and `after` zeros in `x`'s dtype.
///
/// Written with `cat` because burn 0.21's `Tensor::pad` (also used by asymmetric `conv2d` options) builds its
/// zeros in the device's default dtype and fails on bf16 tensors.
pub fn zero_pad<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    dim: usize,
    before: usize,
    after: usize,
) -> Tensor<B, D> {
    if before == 0 && after == 0 {
        return x;
    }
    let (device, dtype) = (x.device(), x.dtype());
    let zeros = |n: usize| {
        let mut shape = x.dims();
        shape[dim] = n;
        Tensor::<B, D>::zeros(shape, (&device, dtype))
    };
    let mut parts = Vec::with_capacity(3);
    if before > 0 {
        parts.push(zeros(before));
    }
    let tail = (after > 0).then(|| zeros(after));
    parts.push(x);
    parts.extend(tail);
    Tensor::cat(parts, dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn adapters_add_a_scaled_low_rank_product() {
        let dev = Default::default();
        let w = Tensor::<Flex, 2>::from_floats([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], &dev);
        let mut lin = Linear::new(w, Some(Tensor::from_floats([0.5, 0.0, -1.0], &dev)));
        let x = Tensor::<Flex, 3>::from_floats([[[1.0, 3.0]]], &dev);
        let plain: Vec<f32> = lin.forward(x.clone()).into_data().to_vec().unwrap();
        assert_eq!(plain, vec![1.5, 6.0, 3.0]);
        lin.adapters.push(LowRankAdapter {
            id: 7,
            down: Tensor::from_floats([[1.0, 1.0]], &dev),
            up: Tensor::from_floats([[1.0], [0.0], [2.0]], &dev),
            scale: 0.5,
        });
        // down·x = 4; up·4 = [4, 0, 8]; × 0.5 = [2, 0, 4].
        let y: Vec<f32> = lin.forward(x.clone()).into_data().to_vec().unwrap();
        assert_eq!(y, vec![3.5, 6.0, 7.0]);
        let g: Vec<f32> = lin.forward_gelu_tanh(x).into_data().to_vec().unwrap();
        assert!(
            (g[0]
                - 3.5
                    * 0.5
                    * (1.0
                        + ((2.0f32 / std::f32::consts::PI).sqrt() * (3.5 + 0.044715 * 3.5f32.powi(3)))
                            .tanh()))
            .abs()
                < 1e-4
        );
    }

    #[test]
    fn layer_norm_normalizes() {
        let dev = Default::default();
        let x = Tensor::<Flex, 2>::from_floats([[1.0, 2.0, 3.0, 6.0]], &dev);
        let y: Vec<f32> = layer_norm(x, 0.0).into_data().to_vec().unwrap();
        let mean: f32 = y.iter().sum::<f32>() / 4.0;
        let var: f32 = y.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "{y:?}");
    }

    #[test]
    fn rms_norm_scales_by_weight() {
        let dev = Default::default();
        let x = Tensor::<Flex, 2>::from_floats([[3.0, 4.0]], &dev);
        let w = Tensor::<Flex, 1>::from_floats([1.0, 2.0], &dev);
        let y: Vec<f32> = rms_norm(x, &w, 0.0).into_data().to_vec().unwrap();
        let rms = (12.5f32).sqrt();
        assert!((y[0] - 3.0 / rms).abs() < 1e-6 && (y[1] - 8.0 / rms).abs() < 1e-6, "{y:?}");
    }
}
