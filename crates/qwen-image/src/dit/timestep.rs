//! Timestep embedding: a 256-wide sinusoid of `1000·σ` (cos first), then `linear_2(silu(linear_1(·)))`.

use burn::tensor::{activation::silu, backend::Backend, DType, Tensor, TensorData};

use crate::{nn::Linear, ops::QwenBackend, weights::WeightPath, Result};

/// Channels of the sinusoidal projection.
pub const TIME_PROJ_DIM: usize = 256;

/// `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)` in f32 on the host.
///
/// Returns `[cos(1000·t·ω_0..127), sin(1000·t·ω_0..127)]` per timestep, row-major `[t.len(), 256]`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/transformers/transformer_qwenimage.py#L42
pub fn timestep_sinusoid(timesteps: &[f32]) -> Vec<f32> {
    let half = TIME_PROJ_DIM / 2;
    let ln_period = (10000f64).ln() as f32;
    let freqs: Vec<f32> = (0..half).map(|k| (-ln_period * k as f32 / half as f32).exp()).collect();
    let mut out = Vec::with_capacity(timesteps.len() * TIME_PROJ_DIM);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| 1000.0 * (t * f)).collect();
        out.extend(args.iter().map(|a| a.cos()));
        out.extend(args.iter().map(|a| a.sin()));
    }
    out
}

/// `time_text_embed.timestep_embedder`: `linear_1 (256 → D) → SiLU → linear_2 (D → D)`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/transformers/transformer_qwenimage.py#L174
#[derive(Clone, Debug)]
pub struct TimestepEmbedder<B: Backend> {
    /// `linear_1`.
    pub linear_1: Linear<B>,
    /// `linear_2`.
    pub linear_2: Linear<B>,
}

super::linears::linear_layers!(TimestepEmbedder { linear_1 => "linear_1", linear_2 => "linear_2" } without {});

impl<B: QwenBackend> TimestepEmbedder<B> {
    /// Loads `time_text_embed.timestep_embedder.*` (the path given points at `timestep_embedder`).
    pub fn load(path: &mut WeightPath<'_>, dim: usize, device: &B::Device) -> Result<Self> {
        Ok(TimestepEmbedder {
            linear_1: Linear::load(&mut path.pp("linear_1"), TIME_PROJ_DIM, dim, true, device)?,
            linear_2: Linear::load(&mut path.pp("linear_2"), dim, dim, true, device)?,
        })
    }

    /// Embeds the timesteps (σ values as the DiT receives them) into `[timesteps.len(), D]` in `dtype`.
    pub fn forward(&self, timesteps: &[f32], dtype: DType, device: &B::Device) -> Tensor<B, 2> {
        let proj = timestep_sinusoid(timesteps);
        let proj: Tensor<B, 2> =
            Tensor::from_data(TensorData::new(proj, [timesteps.len(), TIME_PROJ_DIM]), (device, DType::F32));
        let h = self.linear_1.forward_2d(proj.cast(dtype));
        self.linear_2.forward_2d(silu(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoid_is_cos_then_sin_of_scaled_time() {
        let e = timestep_sinusoid(&[0.5]);
        assert_eq!(e.len(), 256);
        assert!((e[0] - (500f32).cos()).abs() < 1e-6);
        assert!((e[128] - (500f32).sin()).abs() < 1e-6);
        let last = 500.0 * (-(10000f32).ln() * 127.0 / 128.0).exp();
        assert!((e[127] - last.cos()).abs() < 1e-5);
    }
}
