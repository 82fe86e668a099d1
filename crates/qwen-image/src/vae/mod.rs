//! The Qwen-Image VAE (`AutoencoderKLQwenImage`) on single images, generic over the burn backend.
//!
//! The checkpoint is a fine-tuned Wan-2.1 causal *video* VAE. On one frame with an empty feature cache every causal
//! 3-D convolution only sees real data through the last temporal slice of its kernel and the resamplers' temporal
//! convolutions are skipped, so the network is exactly a 2-D one: this module loads the 3-D checkpoint as that 2-D
//! network (see [`conv`]).
//!
//! - [`config`](mod@config): `vae/config.json`.
//! - [`conv`]: 2-D convolutions from causal 3-D kernels.
//! - [`norm`]: the channel RMS norm (`x / ‖x‖ · √C · γ`).
//! - [`blocks`]: residual, attention, down/upsampling and middle blocks.
//! - [`encoder`], [`decoder`]: the two halves.
//! - [`autoencoder`]: the model: loading, `encode_mode`, `decode`, latent (de)normalization.
//! - [`tiling`]: tiled encode/decode with blended seams for large images.
//!
//! ```no_run
//! # use qwen_image::{vae::{AutoencoderKLQwenImage, TileConfig}, CpuBackend};
//! # use burn::tensor::{DType, Tensor};
//! # fn main() -> qwen_image::Result<()> {
//! let dev = Default::default();
//! let vae = AutoencoderKLQwenImage::<CpuBackend>::load("vae".as_ref(), DType::F32, &dev)?;
//! let image = Tensor::<CpuBackend, 4>::zeros([1, 3, 64, 96], &dev); // in [-1, 1]
//! let z = vae.normalize_latents(vae.encode_mode(image)?)?; // [1, 16, 8, 12], what the DiT sees
//! let decoded = vae.decode_tiled(vae.denormalize_latents(z)?, &TileConfig::default())?; // [1, 3, 64, 96]
//! # Ok(()) }
//! ```

pub mod autoencoder;
pub mod blocks;
pub mod config;
pub mod conv;
pub mod decoder;
pub mod encoder;
pub mod norm;
pub mod tiling;

pub use autoencoder::AutoencoderKLQwenImage;
pub use config::VaeConfig;
pub use tiling::TileConfig;
