//! FP8 weights for linear layers: e4m3 with one f32 scale per output channel, quantized at load time, multiplied
//! with per-token dynamic activation scales (see docs/fp8.md).
//!
//! - [`e4m3`]: the format and per-row scaled quantization on the host (the `float8` crate's conversion, checked
//!   against PyTorch's `float8_e4m3fn`).
//! - [`Fp8Weight`] (`weight`): a layer's e4m3 bits and scales on the device, quantized again from the unquantized
//!   weight when a LoRA is merged.
//! - [`Fp8Activation`] (`activation`): an activation quantized per token once for every FP8 layer reading it, or by
//!   the kernel that produces it; the portable defaults of the seam's quantized-activation methods.
//! - [`attention`]: FP8 attention (int8 Q·Kᵀ with smoothed keys, e4m3 P·V), its definition and host emulation.
//! - [`Fp8Options`] (`options`): which layers are quantized (every one but a keep list).
//! - [`portable`]: the portable defaults of [`QwenBackend::quantize_fp8`](crate::ops::QwenBackend::quantize_fp8)
//!   and [`QwenBackend::dense_fp8`](crate::ops::QwenBackend::dense_fp8), an exact f32 emulation of the FP8 GEMM.
//! - [`LinearWeightSummary`] (`summary`): what a model's layers hold and the bytes saved.
//! - `prequantized`: reading a checkpoint's already-quantized ("scaled fp8") layers.
//!
//! A [`Linear`](crate::nn::Linear) holds either kind of weight ([`LinearWeight`](crate::nn::LinearWeight)); its
//! loader quantizes the layers a [`WeightStore`](crate::weights::WeightStore)'s FP8 options name
//! ([`WeightStore::quantize_linears`](crate::weights::WeightStore::quantize_linears)).

mod activation;
pub mod attention;
pub mod e4m3;
mod options;
pub mod portable;
mod summary;
mod weight;

pub use activation::Fp8Activation;
pub use options::{Fp8Options, DEFAULT_KEEP, LOW_MEMORY_QUANTIZES};
pub use summary::LinearWeightSummary;
pub use weight::Fp8Weight;

/// Whether a linear layer of `shape` (`[out, in]`) is quantized when its options ask for it: the FP8 GEMM of the CUDA
/// fast path (cuBLASLt) needs 16-byte aligned leading dimensions, `in` e4m3 bytes and `out` bf16 outputs. A layer of
/// another shape (the Qwen2.5-VL vision MLP's 3420 features) stays in the model's dtype on every backend: on a GPU it
/// would otherwise run the portable emulation, which quantizes every activation on the host (the first full-size
/// `--low-memory` edit did not finish in 80 s on an H100), and on the CPU the numbers stay those a GPU gives.
pub fn fits_fp8_gemm([out, inp]: [usize; 2]) -> bool {
    out > 0 && inp > 0 && out % 8 == 0 && inp % 16 == 0
}

#[cfg(test)]
mod tests {
    use super::fits_fp8_gemm;

    #[test]
    fn only_gemm_aligned_shapes_are_quantized() {
        // The DiT's and the language model's layers fit; the vision MLP's 3420 features do not, either way round.
        for fits in [[3072, 3072], [12288, 3072], [3072, 12288], [18944, 3584], [3840, 1280], [8, 16]] {
            assert!(fits_fp8_gemm(fits), "{fits:?}");
        }
        for unfit in [[3420, 1280], [1280, 3420], [32, 24], [12, 16], [0, 16], [8, 0]] {
            assert!(!fits_fp8_gemm(unfit), "{unfit:?}");
        }
    }
}
