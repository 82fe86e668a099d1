//! Qwen-Image-Edit networks in Rust, generic over the [burn](https://burn.dev) backend.
//!
//! - [`dit`]: the 20 B MMDiT (`QwenImageTransformer2DModel`), with a forward pass driven by a
//!   [`qwen_image_pruning::PruningSchedule`] plan.
//! - [`vae`]: the Qwen-Image VAE (`AutoencoderKLQwenImage`) on single images, with tiled modes for large ones.
//! - [`processor`]: images and instructions → text-encoder inputs (Pillow/torch-exact resizing, the Qwen2-VL image
//!   processor, the Qwen2 tokenizer, the edit prompt templates), parity-tested against transformers and diffusers.
//! - [`weights`]: memory-mapped safetensors loading (single files and shards) with strict key and shape checks,
//!   or stores without files (random weights; shape-only, to list what a loader reads).
//! - [`synthetic`]: random weights for the full-size networks (no checkpoint needed) and random sharded
//!   checkpoints, for benchmarks.
//! - [`quant`]: FP8 (e4m3) weights with per-channel scales for linear layers, quantized at load time.
//! - [`transfer`]: activations between host and device in the model dtype (converted on the host).
//! - [`ops`]: the [`QwenBackend`](ops::QwenBackend) extension trait: the operations an accelerated backend
//!   overrides (GEMMs, attention), with portable defaults so every test runs on the CPU.
//! - `cuda` (feature `cuda`): the CUDA fast path (cuBLASLt GEMMs, our flash attention, fused kernels) on burn's
//!   CUDA backend.
//!
//! Every component is checked against the diffusers/transformers reference by parity fixtures (see `tests/`).

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dit;
pub mod error;
pub mod nn;
pub mod ops;
pub mod pixels;
pub mod processor;
pub mod published;
pub mod quant;
pub mod synthetic;
pub mod tensor_io;
pub mod text_encoder;
pub mod transfer;
pub mod vae;
pub mod weights;

pub use error::{ModelError, Result};

/// The CPU backend used by tests and the embedded demo.
pub type CpuBackend = burn::backend::Flex;
