//! The CUDA fast path: [`QwenBackend`] for burn's CUDA backend, with cuBLASLt GEMMs, our own flash attention and
//! fused elementwise kernels (feature `cuda`).
//!
//! # Backend type: burn's CUDA backend without `fusion`
//!
//! [`CudaBackend`] is `CubeBackend<CudaRuntime, bf16, i32, u8>`, burn's CUDA backend *without* its `fusion` layer.
//! Its tensors are [`CubeTensor`](burn_cubecl::tensor::CubeTensor)s, so the fast path reads their device
//! addresses and strides directly. With `fusion` every tensor is a lazy node of a graph: each fast operation would
//! need a `CustomOpIr` wrapper, would be a fusion barrier anyway, and the elementwise glue that fusion would merge
//! is exactly what our fused kernels replace (LayerNorm + modulation, QK-RMSNorm + RoPE, gated residuals, the
//! GEMM epilogues). What burn still runs itself (reshapes, concatenations, the timestep MLP…) is a few percent of a
//! DiT step. The `cuda` cargo feature therefore enables `burn/cuda` and `burn/autotune` but not `burn/fusion`.
//!
//! # Ordering between burn's queue and our kernels
//!
//! cubecl-cuda 0.10 keeps its CUDA streams private (one per thread stream id, owned by its server thread, no
//! accessor), so our kernels run on a stream of our own in the same primary context. Taking a tensor's device
//! address (`tensor::ptr`) goes through burn's server thread, which runs what it is asked in order, so once an
//! operation holds its pointers every burn operation this thread issued before has been handed to the driver (by
//! default the whole operation runs on that thread: [`FastPathConfig::device_thread`]). Then
//! ([`OrderingMode::ContextEvents`], the default):
//!
//! - before the operation, `cuCtxRecordEvent` captures all work submitted to the context and our stream waits on
//!   it (`cuStreamWaitEvent`);
//! - after it, `cuEventRecord` on our stream and `cuCtxWaitEvent` make all work submitted to the context later
//!   (burn's kernels, copies, its allocator's reuse of freed memory) wait for it.
//!
//! Both are device-side: the host never blocks, so the CPU keeps queueing ahead of the GPU. Without context events
//! (drivers before CUDA 12.5, or `QWEN_CUDA_ORDERING=sync`), [`OrderingMode::HostSync`] drains burn's queue before
//! and synchronizes our stream after each operation. The benchmark measures the per-step cost of both.
//!
//! # Configuration
//!
//! Each device's fast path follows a [`FastPathConfig`]: it starts from the process's environment
//! ([`FastPathConfig::from_env`], the variables below, read once) and [`configure`] replaces it. The device registry
//! (one entry per GPU, for the life of the process) holds that configuration, the counters and the CUDA state; it
//! and the environment's configuration are the fast path's only process-wide state.
//!
//! | variable | values (default first) | [`FastPathConfig`] field |
//! |---|---|---|
//! | `QWEN_CUDA_FAST` | `all`, `none`, or a comma list of `gemm`, `attention` (`attn`), `glue`, `fp8`, `conv` | [`ops`](FastPathConfig::ops): the kinds of operation on the fast path |
//! | `QWEN_FLASH` | `auto` (`tma`), `tma-serial`, `wgmma`, `mma` | [`flash_kernel`](FastPathConfig::flash_kernel): the head-dim-128 attention kernel on Hopper |
//! | `QWEN_CUDA_ORDERING` | `events` (`context`), `sync` (`host`) | [`ordering`](FastPathConfig::ordering): ordering against burn's queue |
//! | `QWEN_FP8_FAST_ACCUM` | `on` (`1`), `off` (`0`) | [`fp8_fast_accum`](FastPathConfig::fp8_fast_accum): cuBLASLt's fast accumulation in the FP8 GEMMs (on by default: faster, less exact; judged on the proxy benchmark, docs/fp8.md) |
//! | `QWEN_GEMM_AUTOTUNE` | `on` (`1`), `off` (`0`), `verbose` | [`gemm_autotune`](FastPathConfig::gemm_autotune): time the heuristic's top 8 cuBLASLt algorithms per large shape, and cuDNN's convolution algorithms per shape (`verbose`: and log the timings at `info` level) |
//! | `QWEN_CUDA_KERNEL_DIR` | unset, or a folder | [`kernel_dir`](FastPathConfig::kernel_dir): `<dir>/<module>.cu` replaces a built-in kernel source (tuning without a rebuild) |
//! | `QWEN_CUDA_STAGED_UPLOADS` | `off` (`0`), `on` (`1`) | [`staged_uploads`](FastPathConfig::staged_uploads): activations made during an edit are uploaded from page-locked staging buffers, so the host does not wait for the device to reach the copy |
//! | `QWEN_CUDA_DEVICE_THREAD` | `on` (`1`), `off` (`0`) | [`device_thread`](FastPathConfig::device_thread): each fast operation runs on burn's device thread (one blocking round trip per operation, not one per device pointer) |
//! | `QWEN_CUDA_CACHE_DIR` | unset, or a folder | none (process-wide): where [`configure_runtime_caches`]`(None)` keeps burn's compiled kernels and autotune results ([`default_cache_dir`]) |
//!
//! Test support without a variable: [`FastPathConfig::poison_outputs`] fills every output with NaN before its
//! kernel runs. A value that does not parse is ignored with a `log` warning.
//!
//! # Fallbacks and errors
//!
//! Every operation checks its inputs (bf16, layouts, head dimension, …) and falls back to
//! [`crate::ops::portable`] when the fast kernels do not cover them; it never panics. A failed CUDA, NVRTC or
//! cuBLASLt call switches that kind of operation off on that device until the next [`configure`]: the errors
//! possible there (a missing library, a kernel that does not compile, memory exhaustion, a sticky launch failure)
//! would recur on every call, each costing a compile or an allocation attempt. The switch is logged with
//! `log::warn!` and reported, with the counters of calls, fallbacks and errors per kind, by
//! [`QwenBackend::fast_path_report`]. Kernels are compiled with NVRTC on first use for the device's architecture
//! (`sm_90a` on Hopper) and cached. At run time the fast path needs `libcuda`, `libnvrtc` and `libcublasLt` on the
//! loader path (no CUDA headers), and cuDNN 9 (`libcudnn.so.9`) for the `conv` kind: without it the VAE's
//! convolutions run as im2col + cuBLASLt GEMMs ([`lowered::conv2d`](crate::ops::lowered::conv2d)) after one logged
//! error (see `conv.rs`).
//!
//! # Unsafe code
//!
//! Every `unsafe` block says why it is sound (`clippy::undocumented_unsafe_blocks` is denied here). The
//! `#[repr(C)]` structs handed to kernels are checked against their C++ definitions at compile time on both sides:
//! `assert_layout!` here and `QI_ASSERT_LAYOUT`/`QI_ASSERT_OFFSET` (`kernels/prelude.cuh`) assert the same sizes,
//! alignments and field offsets.

#![deny(clippy::undocumented_unsafe_blocks)]

/// Compile-time check that a `#[repr(C)]` struct handed to a kernel has the layout of its C++ mirror: size,
/// alignment and the offset of every field, the numbers the `.cu`/`.cuh` side asserts with `static_assert`.
macro_rules! assert_layout {
    ($t:ty: size $size:literal, align $align:literal { $($field:ident @ $offset:literal),* $(,)? }) => {
        const _: () = {
            assert!(size_of::<$t>() == $size, concat!(stringify!($t), ": size differs from the C++ struct"));
            assert!(align_of::<$t>() == $align, concat!(stringify!($t), ": alignment differs from the C++ struct"));
            $(assert!(
                std::mem::offset_of!($t, $field) == $offset,
                concat!(stringify!($t), ".", stringify!($field), ": offset differs from the C++ struct")
            );)*
        };
    };
}

mod attention;
mod config;
mod conv;
mod error;
mod fp8;
mod gemm;
mod glue;
mod gpu;
mod kernels;
mod nvrtc;
mod pinned;
mod pixels;
mod registry;
mod rotary;
mod runtime_cache;
mod staging;
mod tensor;

use burn::tensor::{DType, Int, Tensor, TensorData};
use burn_cubecl::CubeBackend;
use cubecl::cuda::CudaRuntime;

pub use config::{FastOps, FastPathConfig, FlashKernel, GemmAutotune, OrderingMode};
pub use error::FastError;
pub use registry::{config, configure, ordering_mode, release_unused_memory, reset_stats, synchronize};
pub use runtime_cache::{configure_runtime_caches, default_cache_dir, CacheSetup};

use crate::ops::{lowered, portable, AttentionOptions, FastPathReport, KvSegment, NormRope, QwenBackend};
use crate::quant::{Fp8Activation, Fp8Weight};
use crate::weights::HostMemory;
use error::require;
use registry::{attempt, enabled, Kind};
use tensor::{prim, wrap};

/// burn's CUDA backend (no fusion), bf16 by default: the backend the fast path accelerates.
pub type CudaBackend = CubeBackend<CudaRuntime, burn::tensor::bf16, i32, u8>;

/// A CUDA device (`CudaDevice::new(index)`).
pub type CudaDevice = cubecl::cuda::CudaDevice;

/// `fast(&inputs)` on the fast path of `device` when `kind` is on there and it succeeds, else `portable(inputs)`
/// (the outcome is booked in the device's counters; see [`registry::attempt`]). The fast closure borrows the
/// inputs, so it clones only what it hands to a kernel, and only when it runs (on burn's device thread unless
/// configured otherwise: [`FastPathConfig::device_thread`]).
fn fast_or<I: Sync, O: Send + 'static>(
    device: &CudaDevice,
    kind: Kind,
    inputs: I,
    fast: impl FnOnce(&I) -> Result<O, FastError> + Send,
    portable: impl FnOnce(I) -> O,
) -> O {
    match attempt(device.index, kind, || fast(&inputs)) {
        Some(out) => out,
        None => portable(inputs),
    }
}

impl QwenBackend for CudaBackend {
    fn dense(
        x: Tensor<Self, 3>,
        weight: &Tensor<Self, 2>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        let fast = |x: &Tensor<Self, 3>| {
            gemm::dense_prim(prim(x.clone()), prim(weight.clone()), bias.map(|b| prim(b.clone())), false)
                .map(wrap)
        };
        fast_or(&x.device(), Kind::Gemm, x, fast, |x| portable::dense(x, weight, bias))
    }

    fn dense_width_multiple() -> usize {
        // 16 bytes of bf16: below that cuBLASLt leaves its Hopper kernels (nn/pad.rs has the measurement).
        8
    }

    fn dense_gelu_tanh(
        x: Tensor<Self, 3>,
        weight: &Tensor<Self, 2>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        let fast = |x: &Tensor<Self, 3>| {
            gemm::dense_prim(prim(x.clone()), prim(weight.clone()), bias.map(|b| prim(b.clone())), true)
                .map(wrap)
        };
        fast_or(&x.device(), Kind::Gemm, x, fast, |x| portable::dense_gelu_tanh(x, weight, bias))
    }

    fn quantize_fp8(weight: Tensor<Self, 2>) -> Fp8Weight<Self> {
        let dtype = weight.dtype();
        let fast = |w: &Tensor<Self, 2>| {
            fp8::quantize_rows_prim(prim(w.clone())).map(|(bits, scales)| {
                Fp8Weight::from_fitting_parts(
                    Tensor::<Self, 2, Int>::from_primitive(bits),
                    wrap(scales),
                    dtype,
                )
            })
        };
        fast_or(&weight.device(), Kind::Fp8, weight, fast, portable::quantize_fp8)
    }

    fn dense_fp8(
        x: Tensor<Self, 3>,
        weight: &Fp8Weight<Self>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        let fast = |x: &Tensor<Self, 3>| fp8_gemm(x, weight, bias, false);
        fast_or(&x.device(), Kind::Fp8, x, fast, |x| portable::dense_fp8(x, weight, bias))
    }

    fn dense_fp8_gelu_tanh(
        x: Tensor<Self, 3>,
        weight: &Fp8Weight<Self>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        let fast = |x: &Tensor<Self, 3>| fp8_gemm(x, weight, bias, true);
        fast_or(&x.device(), Kind::Fp8, x, fast, |x| portable::dense_fp8_gelu_tanh(x, weight, bias))
    }

    fn quantize_activation_fp8(x: Tensor<Self, 3>) -> Fp8Activation<Self> {
        let dtype = x.dtype();
        let fast = |x: &Tensor<Self, 3>| {
            fp8::quantize_rows_prim(prim(x.clone())).map(|(bits, scales)| fp8_activation(bits, scales, dtype))
        };
        fast_or(&x.device(), Kind::Fp8, x, fast, portable::quantize_activation)
    }

    fn dequantize_activation_fp8(x: &Fp8Activation<Self>) -> Tensor<Self, 3> {
        let fast = |x: &&Fp8Activation<Self>| {
            require(x.dtype == DType::BF16, || format!("output dtype {:?}", x.dtype))?;
            fp8::dequantize_rows_prim(x.bits.clone().into_primitive(), prim(x.scales.clone())).map(wrap)
        };
        fast_or(&x.bits.device(), Kind::Fp8, x, fast, portable::dequantize_activation)
    }

    fn dense_fp8_quantized(
        x: &Fp8Activation<Self>,
        weight: &Fp8Weight<Self>,
        bias: Option<&Tensor<Self, 1>>,
        gelu_tanh: bool,
    ) -> Tensor<Self, 3> {
        let fast = |x: &&Fp8Activation<Self>| {
            require(x.dtype == DType::BF16, || format!("output dtype {:?}", x.dtype))?;
            let (bits, scales) = (weight.bits.clone().into_primitive(), prim(weight.scales.clone()));
            let (qx, sx) = (x.bits.clone().into_primitive(), prim(x.scales.clone()));
            fp8::dense_fp8_quantized_prim(qx, sx, bits, scales, bias.map(|b| prim(b.clone())), gelu_tanh)
                .map(wrap)
        };
        fast_or(&x.bits.device(), Kind::Fp8, x, fast, |x| {
            portable::dense_fp8_quantized(x, weight, bias, gelu_tanh)
        })
    }

    fn layer_norm_modulate_fp8(
        x: Tensor<Self, 3>,
        shift: &Tensor<Self, 3>,
        scale: &Tensor<Self, 3>,
        runs: &[(usize, usize)],
        eps: f64,
        dense: bool,
    ) -> (Option<Tensor<Self, 3>>, Fp8Activation<Self>) {
        let dtype = x.dtype();
        let fast = |x: &Tensor<Self, 3>| {
            let (shift, scale) = (prim(shift.clone()), prim(scale.clone()));
            glue::layer_norm_modulate_fp8_prim(prim(x.clone()), &shift, &scale, runs, eps, dense)
                .map(|(out, bits, scales)| (out.map(wrap), fp8_activation(bits, scales, dtype)))
        };
        // Booked under `fp8` (it needs the e4m3 conversion); its fallback runs the two calls, each on its own path.
        fast_or(&x.device(), Kind::Fp8, x, fast, |x| {
            portable::layer_norm_modulate_fp8(x, shift, scale, runs, eps, dense)
        })
    }

    fn attend(
        query: Tensor<Self, 4>,
        segments: &[KvSegment<Self>],
        options: &AttentionOptions<Self>,
    ) -> Tensor<Self, 4> {
        attention::attend(query, segments, options)
    }

    fn attend_blocks(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        cu_seqlens: &[usize],
    ) -> Tensor<Self, 4> {
        let fast = |(q, k, v): &(Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>)| {
            attention::attend_blocks_prim(prim(q.clone()), prim(k.clone()), prim(v.clone()), cu_seqlens)
                .map(wrap)
        };
        fast_or(&q.device(), Kind::Attention, (q, k, v), fast, |(q, k, v)| {
            portable::attention_blocks(q, k, v, cu_seqlens, Self::attend)
        })
    }

    fn layer_norm_modulate(
        x: Tensor<Self, 3>,
        shift: &Tensor<Self, 3>,
        scale: &Tensor<Self, 3>,
        runs: &[(usize, usize)],
        eps: f64,
    ) -> Tensor<Self, 3> {
        let fast = |x: &Tensor<Self, 3>| {
            let (shift, scale) = (prim(shift.clone()), prim(scale.clone()));
            glue::layer_norm_modulate_prim(prim(x.clone()), &shift, &scale, runs, eps).map(wrap)
        };
        fast_or(&x.device(), Kind::Glue, x, fast, |x| {
            portable::layer_norm_modulate(x, shift, scale, runs, eps)
        })
    }

    fn gated_residual(
        residual: Tensor<Self, 3>,
        y: Tensor<Self, 3>,
        gate: &Tensor<Self, 3>,
        runs: &[(usize, usize)],
    ) -> Tensor<Self, 3> {
        let fast = |(residual, y): &(Tensor<Self, 3>, Tensor<Self, 3>)| {
            glue::gated_residual_prim(prim(residual.clone()), prim(y.clone()), &prim(gate.clone()), runs)
                .map(wrap)
        };
        fast_or(&residual.device(), Kind::Glue, (residual, y), fast, |(residual, y)| {
            portable::gated_residual(residual, y, gate, runs)
        })
    }

    fn rms_norm_rope(
        x: Tensor<Self, 4>,
        weight: &Tensor<Self, 1>,
        eps: f64,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
    ) -> Tensor<Self, 4> {
        let fast = |x: &Tensor<Self, 4>| {
            let (weight, cos, sin) = (prim(weight.clone()), prim(cos.clone()), prim(sin.clone()));
            glue::rms_norm_rope_prim(prim(x.clone()), &weight, eps, &cos, &sin).map(wrap)
        };
        fast_or(&x.device(), Kind::Glue, x, fast, |x| portable::rms_norm_rope(x, weight, eps, cos, sin))
    }

    fn conv2d_nchw(
        x: Tensor<Self, 4>,
        weight: &Tensor<Self, 4>,
        bias: &Tensor<Self, 1>,
        stride: usize,
        pad: usize,
    ) -> Tensor<Self, 4> {
        // cuDNN, with the bias added afterwards (as PyTorch does); else one cuBLASLt GEMM over an im2col copy instead
        // of burn's convolution kernels, which compile and autotune per shape on first use (minutes for the VAE at
        // 1024²).
        let device = x.device();
        let fast = |x: &Tensor<Self, 4>| {
            let (xp, wp, bp) = (prim(x.clone()), prim(weight.clone()), prim(bias.clone()));
            let (y, biased) = conv::conv2d_prim(xp, wp, bp, stride, pad)?;
            let y: Tensor<Self, 4> = wrap(y);
            Ok(if biased { y } else { y + bias.clone().reshape([1, bias.dims()[0], 1, 1]) })
        };
        fast_or(&device, Kind::Conv, x, fast, |x| {
            if enabled(device.index, Kind::Gemm) {
                lowered::conv2d(x, weight, bias, stride, pad)
            } else {
                portable::conv2d(x, weight, bias, stride, pad)
            }
        })
    }

    fn rms_norm_rope_cat(parts: &[NormRope<'_, Self>]) -> Tensor<Self, 4> {
        let Some(first) = parts.first() else {
            return portable::rms_norm_rope_cat(parts);
        };
        let fast = |parts: &&[NormRope<'_, Self>]| {
            // The weights and tables as primitives, kept here: the parts borrow them.
            let tables: Vec<_> = parts
                .iter()
                .map(|p| (prim(p.weight.clone()), prim(p.cos.clone()), prim(p.sin.clone())))
                .collect();
            let prims = parts
                .iter()
                .zip(&tables)
                .map(|(p, (weight, cos, sin))| glue::NormRopePart {
                    x: prim(p.x.clone()),
                    weight,
                    eps: p.eps,
                    cos,
                    sin,
                })
                .collect();
            glue::rms_norm_rope_cat_prim(prims).map(wrap)
        };
        fast_or(&first.x.device(), Kind::Glue, parts, fast, portable::rms_norm_rope_cat)
    }

    fn silu_mul(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let fast = |(gate, up): &(Tensor<Self, 3>, Tensor<Self, 3>)| {
            glue::silu_mul_prim(prim(gate.clone()), prim(up.clone())).map(wrap)
        };
        fast_or(&gate.device(), Kind::Glue, (gate, up), fast, |(gate, up)| portable::silu_mul(gate, up))
    }

    fn rms_norm(x: Tensor<Self, 3>, weight: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        let fast =
            |x: &Tensor<Self, 3>| glue::rms_norm_prim(prim(x.clone()), &prim(weight.clone()), eps).map(wrap);
        fast_or(&x.device(), Kind::Glue, x, fast, |x| portable::rms_norm(x, weight, eps))
    }

    fn rotary_half(x: Tensor<Self, 4>, cos: &Tensor<Self, 2>, sin: &Tensor<Self, 2>) -> Tensor<Self, 4> {
        let fast = |x: &Tensor<Self, 4>| {
            rotary::rotary_half_prim(prim(x.clone()), &prim(cos.clone()), &prim(sin.clone())).map(wrap)
        };
        fast_or(&x.device(), Kind::Glue, x, fast, |x| portable::rotary_half(x, cos, sin))
    }

    fn channel_rms_norm(x: Tensor<Self, 4>, gamma: &Tensor<Self, 1>, silu: bool) -> Tensor<Self, 4> {
        let fast = |x: &Tensor<Self, 4>| {
            glue::channel_rms_norm_prim(prim(x.clone()), &prim(gamma.clone()), silu).map(wrap)
        };
        fast_or(&x.device(), Kind::Glue, x, fast, |x| portable::channel_rms_norm(x, gamma, silu))
    }

    fn upload<const D: usize>(data: TensorData, device: &Self::Device) -> Tensor<Self, D> {
        let fast = |data: &TensorData| tensor::upload_prim(data, device).map(wrap);
        fast_or(device, Kind::Glue, data, fast, |data| portable::upload(data, device))
    }

    fn host_memory(bytes: &[u8], device: &Self::Device) -> HostMemory {
        if !enabled(device.index, Kind::Glue) {
            return HostMemory::ordinary(bytes);
        }
        match pinned::PinnedBytes::copy_of(bytes, device.index) {
            Ok(pinned) => HostMemory::from_backend(pinned),
            Err(e) => {
                log::warn!(
                    "qwen-image: page-locked host memory unavailable ({e}); streamed weights stay pageable"
                );
                HostMemory::ordinary(bytes)
            }
        }
    }

    fn upload_activation<const D: usize>(data: TensorData, device: &Self::Device) -> Tensor<Self, D> {
        let fast = |data: &TensorData| {
            tensor::upload_activation_prim(data.as_bytes(), data.shape.to_vec(), data.dtype, device).map(wrap)
        };
        fast_or(device, Kind::Glue, data, fast, |data| portable::upload(data, device))
    }

    fn upload_bytes<const D: usize>(
        bytes: &[u8],
        shape: [usize; D],
        dtype: DType,
        device: &Self::Device,
    ) -> Tensor<Self, D> {
        let fast = |_: &()| tensor::upload_bytes_prim(bytes, shape.to_vec(), dtype, device).map(wrap);
        fast_or(device, Kind::Glue, (), fast, |_| portable::upload_bytes(bytes, shape, dtype, device))
    }

    fn upload_u8<const D: usize>(
        bytes: &[u8],
        shape: [usize; D],
        device: &Self::Device,
    ) -> Tensor<Self, D, Int> {
        let fast = |_: &()| {
            tensor::upload_bytes_prim(bytes, shape.to_vec(), DType::U8, device).map(Tensor::from_primitive)
        };
        fast_or(device, Kind::Glue, (), fast, |_| portable::upload_u8(bytes, shape, device))
    }

    fn upload_rgb8(
        rgb: &[u8],
        height: usize,
        width: usize,
        dtype: DType,
        device: &Self::Device,
    ) -> crate::Result<Tensor<Self, 4>> {
        crate::pixels::check_rgb8(rgb, height, width)?;
        if dtype != DType::BF16 || height * width == 0 {
            return crate::pixels::upload_rgb8(rgb, height, width, dtype, device);
        }
        let fast = |rgb: &&[u8]| pixels::upload_rgb8_prim(rgb, height, width, device).map(|t| Ok(wrap(t)));
        fast_or(device, Kind::Glue, rgb, fast, |rgb| {
            crate::pixels::upload_rgb8(rgb, height, width, dtype, device)
        })
    }

    fn read_rgb8(x: Tensor<Self, 4>) -> crate::Result<Vec<u8>> {
        let [batch, c, h, w] = x.dims();
        if batch == 0 || c != 3 || h * w == 0 || x.dtype() != DType::BF16 {
            return crate::pixels::read_rgb8(x);
        }
        let first = x.narrow(0, 0, 1);
        let fast = |x: &Tensor<Self, 4>| pixels::read_rgb8_prim(prim(x.clone())).map(Ok);
        fast_or(&first.device(), Kind::Glue, first, fast, crate::pixels::read_rgb8)
    }

    fn allocate_exactly(device: &Self::Device, exact: bool) {
        registry::allocate_exactly(device, exact);
    }

    fn release_unused_memory(device: &Self::Device) {
        if let Err(e) = registry::release_unused_memory(device) {
            log::warn!("qwen-image: could not give unused device memory back: {e}");
        }
    }

    fn fast_path_report(device: &Self::Device) -> Option<FastPathReport> {
        Some(registry::report(device.index))
    }
}

/// An [`Fp8Activation`] from a kernel's e4m3 rows (u8 `[batch, tokens, K]`) and their f32 scales, quantized from
/// an activation of `dtype`.
fn fp8_activation(bits: tensor::Prim, scales: tensor::Prim, dtype: DType) -> Fp8Activation<CudaBackend> {
    Fp8Activation { bits: Tensor::from_primitive(bits), scales: wrap(scales), dtype }
}

/// The FP8 GEMM of `x` and `weight` on cuBLASLt (see `fp8.rs`).
fn fp8_gemm(
    x: &Tensor<CudaBackend, 3>,
    weight: &Fp8Weight<CudaBackend>,
    bias: Option<&Tensor<CudaBackend, 1>>,
    gelu: bool,
) -> Result<Tensor<CudaBackend, 3>, FastError> {
    let (bits, scales) = (weight.bits.clone().into_primitive(), prim(weight.scales.clone()));
    fp8::dense_fp8_prim(prim(x.clone()), bits, scales, bias.map(|b| prim(b.clone())), gelu).map(wrap)
}

/// burn's CUDA backend in f32 (`burn::backend::Cuda` with its default element): the portable path only, so that
/// generic code also runs there (the fast kernels are bf16).
impl QwenBackend for CubeBackend<CudaRuntime, f32, i32, u8> {}

/// burn's device-memory pool usage on `device` (bytes in use, bytes reserved), for benchmarks.
pub fn pool_usage(device: &CudaDevice) -> Option<(u64, u64)> {
    use cubecl::Runtime;
    let client = CudaRuntime::client(device);
    client.memory_usage().ok().map(|u| (u.bytes_in_use, u.bytes_reserved))
}

/// Device memory in use on the whole GPU (`total − free` from the driver), for benchmarks.
pub fn device_memory_used(index: usize) -> Option<u64> {
    device_memory_info(index).map(|(free, total)| total - free)
}

/// `(free, total)` bytes of GPU `index` (`cuMemGetInfo`).
pub fn device_memory_info(index: usize) -> Option<(u64, u64)> {
    registry::with_gpu(index, |_| {
        let (free, total) = cudarc::driver::result::mem_get_info()
            .map_err(|e| FastError::cuda(format!("cuMemGetInfo: {e:?}")))?;
        Ok((free as u64, total as u64))
    })
    .ok()
}
