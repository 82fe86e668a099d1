//! Reference checks: run a network, or a denoising loop, on inputs dumped to a safetensors file (by the fixture
//! scripts or by a user from diffusers/transformers), so that outputs can be compared with the reference
//! implementation. Test support for the parity tests and the reference examples, one module per network.
//!
//! - [`dit`]: [`dit_forward`], [`denoise_file`] and the DiT input readers.
//! - [`vae`](mod@vae): [`vae_file`].
//! - [`text_encoder`]: [`text_encode`] and its input readers.

pub mod dit;
pub mod text_encoder;
pub mod vae;

pub use dit::{denoise_file, dit_forward, read_dit_input, read_img_shapes, DenoiseOutput};
pub use text_encoder::{read_image_grid_thw, read_text_encoder_input, text_encode};
pub use vae::{vae_file, NamedTensors};
