//! FP8 weights for linear layers: e4m3 with one f32 scale per output channel, quantized at load time, multiplied
//! with per-token dynamic activation scales (see docs/fp8.md).
//!
//! - [`e4m3`]: the format and per-row scaled quantization on the host (the `float8` crate's conversion, checked
//!   against PyTorch's `float8_e4m3fn`).
//! - [`Fp8Weight`] (`weight`): a layer's e4m3 bits and scales on the device, quantized again from the unquantized
//!   weight when a LoRA is merged.
//! - [`Fp8Options`] (`options`): which layers are quantized (every one but a keep list).
//! - [`portable`]: the portable defaults of [`QwenBackend::quantize_fp8`](crate::ops::QwenBackend::quantize_fp8)
//!   and [`QwenBackend::dense_fp8`](crate::ops::QwenBackend::dense_fp8), an exact f32 emulation of the FP8 GEMM.
//! - [`LinearWeightSummary`] (`summary`): what a model's layers hold and the bytes saved.
//! - `prequantized`: reading a checkpoint's already-quantized ("scaled fp8") layers.
//!
//! A [`Linear`](crate::nn::Linear) holds either kind of weight ([`LinearWeight`](crate::nn::LinearWeight)); its
//! loader quantizes the layers a [`WeightStore`](crate::weights::WeightStore)'s FP8 options name
//! ([`WeightStore::quantize_linears`](crate::weights::WeightStore::quantize_linears)).

pub mod e4m3;
mod options;
pub mod portable;
mod summary;
mod weight;

pub use options::{Fp8Options, DEFAULT_KEEP};
pub use summary::LinearWeightSummary;
pub use weight::Fp8Weight;
