//! `QwenImageRMS_norm`: L2 normalization over the channel axis, times `√C · γ`.

use burn::tensor::{activation, backend::Backend, DType, Tensor};

use crate::{ops::QwenBackend, weights::WeightPath, Result};

/// `F.normalize` clamps the norm from below by this.
const NORM_EPS: f64 = 1e-12;

/// Channel RMS norm of the VAE (`QwenImageRMS_norm`, `channel_first=True`, no bias):
/// `y = x / max(‖x‖₂ over channels, 1e-12) · √C · γ` at every pixel.
///
/// As in diffusers, the normalization runs in f32 and is cast back to the input dtype before the multiplication by
/// `√C` and `γ`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L85
#[derive(Clone, Debug)]
pub struct ChannelRmsNorm<B: Backend> {
    /// `γ`, `[channels]` (stored as `[C, 1, 1, 1]` in residual blocks, `[C, 1, 1]` in attention blocks).
    pub gamma: Tensor<B, 1>,
}

impl<B: QwenBackend> ChannelRmsNorm<B> {
    /// Loads `{path}.gamma` of shape `[channels, 1, 1, 1]` (the 5-D form used by residual blocks and `norm_out`).
    pub fn load_5d(path: &mut WeightPath<'_>, channels: usize, device: &B::Device) -> Result<Self> {
        let gamma: Tensor<B, 4> = path.tensor("gamma", [channels, 1, 1, 1], device)?;
        Ok(ChannelRmsNorm { gamma: gamma.flatten(0, 3) })
    }

    /// Loads `{path}.gamma` of shape `[channels, 1, 1]` (the image form used by attention blocks).
    pub fn load_4d(path: &mut WeightPath<'_>, channels: usize, device: &B::Device) -> Result<Self> {
        let gamma: Tensor<B, 3> = path.tensor("gamma", [channels, 1, 1], device)?;
        Ok(ChannelRmsNorm { gamma: gamma.flatten(0, 2) })
    }

    /// `[batch, C, h, w] → [batch, C, h, w]` ([`QwenBackend::channel_rms_norm`]).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        B::channel_rms_norm(x, &self.gamma, false)
    }

    /// `silu(self.forward(x))` (in f32, rounded to the input dtype once), fused where the backend can.
    pub fn forward_silu(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        B::channel_rms_norm(x, &self.gamma, true)
    }
}

/// The portable [`QwenBackend::channel_rms_norm`]: burn tensor ops, rounded as diffusers rounds.
pub fn portable_channel_rms_norm<B: Backend>(
    x: Tensor<B, 4>,
    gamma: &Tensor<B, 1>,
    silu: bool,
) -> Tensor<B, 4> {
    let channels = x.dims()[1];
    let dtype = x.dtype();
    let xf = x.cast(DType::F32);
    let norm = xf.clone().square().sum_dim(1).sqrt().clamp_min(NORM_EPS);
    // diffusers: `F.normalize(x.float()).to(dtype) * scale * gamma`, each product rounded to the dtype (a
    // bf16 × Python-float product is computed in f32).
    let normalized = (xf / norm).cast(dtype).cast(DType::F32);
    let scaled = (normalized * (channels as f64).sqrt()).cast(dtype);
    let y = scaled * gamma.clone().reshape([1, channels, 1, 1]);
    if silu {
        portable_silu(y)
    } else {
        y
    }
}

/// SiLU computed in f32 and rounded to the input dtype once (PyTorch's `F.silu` on bf16).
pub fn portable_silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let dtype = x.dtype();
    activation::silu(x.cast(DType::F32)).cast(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn normalizes_each_pixel_over_channels() {
        let dev = Default::default();
        // Two channels at two pixels: (3, 4) and (0, 0).
        let x = Tensor::<Flex, 4>::from_floats([[[[3.0, 0.0]], [[4.0, 0.0]]]], &dev);
        let norm = ChannelRmsNorm { gamma: Tensor::from_floats([1.0, 2.0], &dev) };
        let y: Vec<f32> = norm.forward(x).into_data().to_vec().unwrap();
        let s = 2f32.sqrt();
        let want = [0.6 * s, 0.0, 0.8 * s * 2.0, 0.0];
        assert!(y.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{y:?}");
    }

    #[test]
    fn forward_silu_is_silu_of_the_norm() {
        let dev = Default::default();
        let x = Tensor::<Flex, 4>::from_floats([[[[3.0, -1.0]], [[4.0, 2.0]]]], &dev);
        let norm = ChannelRmsNorm { gamma: Tensor::from_floats([1.0, -2.0], &dev) };
        let plain: Vec<f32> = norm.forward(x.clone()).into_data().to_vec().unwrap();
        let fused: Vec<f32> = norm.forward_silu(x).into_data().to_vec().unwrap();
        for (p, f) in plain.iter().zip(&fused) {
            assert!((p / (1.0 + (-p).exp()) - f).abs() < 1e-6, "{plain:?} -> {fused:?}");
        }
        assert!(fused[2] < 0.0 && fused[0] > 0.0, "{fused:?}");
    }
}
