//! CUDA C++ sources of the fast-path kernels, compiled at run time with NVRTC for the device's architecture.
//!
//! The sources are header-free (bf16 values are raw 16-bit patterns converted with PTX), so NVRTC needs no CUDA
//! include directory. `tools/bench/nvrtc_check.py` compiles them on a machine without a GPU.

/// Helpers shared by every module (prepended to each source).
pub(crate) const PRELUDE: &str = include_str!("prelude.cuh");
/// Flash attention (`flash_fwd_d{16,32,64,80,128}`) and its mask pre-pass (`flash_mask_tiles`).
pub(crate) const FLASH_ATTENTION: &str =
    concat!(include_str!("flash_params.cuh"), include_str!("flash_attention.cu"));
/// Hopper flash attention with warpgroup MMA (`flash_fwd_wgmma_d128`) and its V transpose (`flash_vt_transpose`).
pub(crate) const FLASH_WGMMA: &str = concat!(
    include_str!("flash_params.cuh"),
    include_str!("wgmma.cuh"),
    include_str!("flash_attention_wgmma.cu")
);
/// Fused elementwise kernels (`ln_modulate`, `gated_residual`, `rms_norm_rope`, `silu_mul`).
pub(crate) const ELEMENTWISE: &str = include_str!("elementwise.cu");
/// Hopper flash attention, warp-specialized with TMA copies (`flash_fwd_tma_d128`, `flash_fwd_tma_d128_serial`).
pub(crate) const FLASH_TMA: &str = concat!(
    include_str!("flash_params.cuh"),
    include_str!("wgmma.cuh"),
    include_str!("tma.cuh"),
    include_str!("flash_attention_tma.cu")
);
/// Hopper FP8 flash attention (`flash_fwd_fp8_d128`) and the passes that quantize its operands (`fp8_attn_*`).
pub(crate) const FLASH_FP8: &str = concat!(
    include_str!("flash_params.cuh"),
    include_str!("wgmma.cuh"),
    include_str!("tma.cuh"),
    include_str!("flash_attention_fp8.cu")
);
/// Row-wise e4m3 quantization (`fp8_quantize_rows`) for the FP8 GEMMs.
pub(crate) const FP8: &str = include_str!("fp8.cu");
