//! `AutoencoderKLQwenImage` on single images: loading, posterior-mode encoding, decoding and the latent
//! normalization of the Qwen-Image pipelines.

use std::path::Path;

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use super::{config::VaeConfig, conv::Conv2d, decoder::Decoder, encoder::Encoder};
use crate::{ops::QwenBackend, weights::WeightStore, ModelError, Result};

/// The Qwen-Image VAE (a Wan-2.1 causal video VAE run on one frame, where it is exactly a 2-D network).
///
/// Images are `[batch, 3, H, W]` in `[-1, 1]` with `H` and `W` multiples of 8; latents are `[batch, z_dim, H/8, W/8]`
/// ("raw": not normalized; see [`normalize_latents`](Self::normalize_latents)). Weights and activations use the load
/// dtype; inputs are cast to it.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L673
#[derive(Clone, Debug)]
pub struct AutoencoderKLQwenImage<B: Backend> {
    /// The checkpoint's config.
    pub config: VaeConfig,
    /// `encoder`.
    pub encoder: Encoder<B>,
    /// `quant_conv`, 1×1, `2·z_dim → 2·z_dim` (mean channels first, then log-variance).
    pub quant_conv: Conv2d<B>,
    /// `post_quant_conv`, 1×1, `z_dim → z_dim`.
    pub post_quant_conv: Conv2d<B>,
    /// `decoder`.
    pub decoder: Decoder<B>,
    dtype: DType,
    device: B::Device,
}

impl<B: QwenBackend> AutoencoderKLQwenImage<B> {
    /// Loads a diffusers `vae/` folder: `config.json` and `diffusion_pytorch_model.safetensors` (or its shards with
    /// the index), converting weights to `dtype`.
    ///
    /// Keys are the checkpoint's own; 3-D kernels are reduced to their last temporal slice and the resamplers'
    /// `time_conv` weights (unused on one frame) are checked and skipped. Any other missing, misshapen or leftover
    /// tensor is an error.
    pub fn load(dir: &Path, dtype: DType, device: &B::Device) -> Result<Self> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let mut store = WeightStore::open_dir(dir, "diffusion_pytorch_model", dtype)?;
        let model = Self::from_store(config, &mut store, device)?;
        store.finish()?;
        Ok(model)
    }

    /// Builds the model from an open store (keys exactly as diffusers names them). Does not check for leftover keys.
    pub fn from_store(config: VaeConfig, store: &mut WeightStore, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let z = config.z_dim;
        let mut root = store.root();
        let encoder = Encoder::load(&mut root.pp("encoder"), &config, device)?;
        let quant_conv = Conv2d::load_causal(&mut root.pp("quant_conv"), 2 * z, 2 * z, 1, device)?;
        let post_quant_conv = Conv2d::load_causal(&mut root.pp("post_quant_conv"), z, z, 1, device)?;
        let decoder = Decoder::load(&mut root.pp("decoder"), &config, device)?;
        Ok(AutoencoderKLQwenImage {
            encoder,
            quant_conv,
            post_quant_conv,
            decoder,
            dtype: store.dtype(),
            device: device.clone(),
            config,
        })
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Latent channels.
    pub fn z_dim(&self) -> usize {
        self.config.z_dim
    }

    /// Pixels per latent along each axis (8).
    pub fn spatial_compression(&self) -> usize {
        self.config.spatial_compression()
    }

    pub(crate) fn check_image(&self, image: &Tensor<B, 4>) -> Result<()> {
        let [b, c, h, w] = image.dims();
        let f = self.spatial_compression();
        if b == 0 || c != self.config.input_channels {
            return Err(ModelError::invalid(format!(
                "the image is {:?}; expected [batch ≥ 1, {}, height, width]",
                image.dims(),
                self.config.input_channels
            )));
        }
        if h == 0 || w == 0 || h % f != 0 || w % f != 0 {
            return Err(ModelError::invalid(format!(
                "the image is {h}×{w} pixels; the VAE needs a positive height and width that are multiples of {f}"
            )));
        }
        Ok(())
    }

    pub(crate) fn check_latents(&self, z: &Tensor<B, 4>) -> Result<()> {
        let [b, c, h, w] = z.dims();
        if b == 0 || c != self.config.z_dim || h == 0 || w == 0 {
            return Err(ModelError::invalid(format!(
                "the latents are {:?}; expected [batch ≥ 1, {}, height ≥ 1, width ≥ 1]",
                z.dims(),
                self.config.z_dim
            )));
        }
        Ok(())
    }

    /// The posterior mean without checks: `quant_conv(encoder(x))[:, :z_dim]`.
    pub(crate) fn encode_mode_unchecked(&self, image: Tensor<B, 4>) -> Tensor<B, 4> {
        let moments = self.quant_conv.forward(self.encoder.forward(image.cast(self.dtype)));
        moments.narrow(1, 0, self.config.z_dim)
    }

    /// The decoder output without checks and without clamping: `decoder(post_quant_conv(z))`.
    pub(crate) fn decode_unclamped(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        self.decoder.forward(self.post_quant_conv.forward(z.cast(self.dtype)))
    }

    /// The posterior mode (its mean) of `image` `[batch, 3, H, W]` in `[-1, 1]`: raw latents
    /// `[batch, z_dim, H/8, W/8]`, as diffusers' `vae.encode(x).latent_dist.mode()` (not normalized).
    pub fn encode_mode(&self, image: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        self.check_image(&image)?;
        Ok(self.encode_mode_unchecked(image))
    }

    /// Decodes raw latents `[batch, z_dim, h, w]` to an image `[batch, 3, 8h, 8w]` clamped to `[-1, 1]`, as
    /// diffusers' `vae.decode(z).sample`.
    pub fn decode(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        self.check_latents(&z)?;
        Ok(self.decode_unclamped(z).clamp(-1.0, 1.0))
    }

    /// Per-channel `[1, z_dim, 1, 1]` tensor of `values` in `dtype` (rounded from f32, as `torch.tensor(..).to(dtype)`).
    fn channel_vector(&self, values: &[f32], dtype: DType, device: &B::Device) -> Tensor<B, 4> {
        let data = TensorData::new(values.to_vec(), [1, values.len(), 1, 1]);
        Tensor::<B, 4>::from_data(data, (device, DType::F32)).cast(dtype)
    }

    /// The pipeline's normalization of encoded latents: `(z − latents_mean) / latents_std` per channel, in `z`'s
    /// dtype (the mean and std are rounded to it first, as diffusers does).
    pub fn normalize_latents(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        self.check_latents(&z)?;
        let (dtype, device) = (z.dtype(), z.device());
        let mean = self.channel_vector(&self.config.latents_mean, dtype, &device);
        let std = self.channel_vector(&self.config.latents_std, dtype, &device);
        Ok((z - mean) / std)
    }

    /// The pipeline's de-normalization before decoding: `z · latents_std + latents_mean` per channel, computed as
    /// diffusers does (`z / (1 / std) + mean` with `1 / std` rounded to `z`'s dtype).
    pub fn denormalize_latents(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        self.check_latents(&z)?;
        let (dtype, device) = (z.dtype(), z.device());
        let mean = self.channel_vector(&self.config.latents_mean, dtype, &device);
        let inv_std = self.channel_vector(&self.config.latents_std, dtype, &device).recip();
        Ok(z / inv_std + mean)
    }
}
