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
//! address ([`tensor::ptr`]) is a blocking round trip to burn's server thread, so once an operation holds its
//! pointers every burn operation this thread issued before has been handed to the driver. Then
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
//! # Fallbacks
//!
//! Every operation checks its inputs (bf16, layouts, head dimension, …) and falls back to
//! [`crate::ops::portable`] when the fast kernels do not cover them; it never panics. A failed CUDA, NVRTC or
//! cuBLASLt call switches that kind of operation off for the rest of the process (see [`errors`]). Kernels are
//! compiled with NVRTC on first use for the device's architecture (`sm_90a` on Hopper) and cached. At run time the
//! fast path needs `libcuda`, `libnvrtc` and `libcublasLt` on the loader path (no CUDA headers).

mod attention;
mod device;
mod error;
mod gemm;
mod glue;
mod kernels;
mod runtime_cache;
mod tensor;

use burn::tensor::{Tensor, TensorData};
use burn_cubecl::CubeBackend;
use cubecl::cuda::CudaRuntime;

pub use attention::{flash_kernel, set_flash_kernel, FlashKernel};
pub use device::{
    errors, fast_ops, ordering_mode, reset_stats, set_fast_ops, set_ordering_mode, set_poison_outputs, stats,
    synchronize, FastOps, FastPathStats, OrderingMode,
};
pub use error::FastError;
pub use runtime_cache::{configure_runtime_caches, default_cache_dir, CacheSetup};

use crate::ops::{lowered, portable, AttentionOptions, KvSegment, NormRope, QwenBackend};
use device::{outcome, Kind};
use tensor::{prim, prim_bool, wrap};

/// burn's CUDA backend (no fusion), bf16 by default: the backend the fast path accelerates.
pub type CudaBackend = CubeBackend<CudaRuntime, burn::tensor::bf16, i32, u8>;

/// A CUDA device (`CudaDevice::new(index)`).
pub type CudaDevice = cubecl::cuda::CudaDevice;

fn run<T>(kind: Kind, f: impl FnOnce() -> Result<T, FastError>) -> Option<T> {
    if !kind.enabled() {
        return None;
    }
    outcome(kind, f())
}

impl QwenBackend for CudaBackend {
    fn dense(
        x: Tensor<Self, 3>,
        weight: &Tensor<Self, 2>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        let fast = run(Kind::Gemm, || {
            gemm::dense_prim(prim(x.clone()), prim(weight.clone()), bias.map(|b| prim(b.clone())), false)
        });
        match fast {
            Some(y) => wrap(y),
            None => portable::dense(x, weight, bias),
        }
    }

    fn dense_gelu_tanh(
        x: Tensor<Self, 3>,
        weight: &Tensor<Self, 2>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        let fast = run(Kind::Gemm, || {
            gemm::dense_prim(prim(x.clone()), prim(weight.clone()), bias.map(|b| prim(b.clone())), true)
        });
        match fast {
            Some(y) => wrap(y),
            None => portable::dense_gelu_tanh(x, weight, bias),
        }
    }

    fn attend(
        query: Tensor<Self, 4>,
        segments: &[KvSegment<Self>],
        options: &AttentionOptions<Self>,
    ) -> Tensor<Self, 4> {
        // Head dims our flash kernels do not cover (the VAE's single 384-wide head): two cuBLASLt GEMMs and a
        // softmax instead of burn's attention, whose autotuning takes minutes per shape (and can panic, burn#5187).
        let head_dim = query.dims()[3];
        if attention::kernel_name(head_dim).is_none()
            && options.key_mask.is_none()
            && !options.causal
            && Kind::Gemm.enabled()
        {
            return lowered::attention(query, segments);
        }
        let fast = run(Kind::Attention, || {
            let mut segs: Vec<(tensor::Prim, tensor::Prim)> =
                segments.iter().map(|s| (prim(s.key.clone()), prim(s.value.clone()))).collect();
            if segs.len() > attention::MAX_SEGS {
                // Merge the tail so the kernel sees at most MAX_SEGS segments.
                let cut = attention::MAX_SEGS - 1;
                let k = Tensor::cat(segments[cut..].iter().map(|s| s.key.clone()).collect(), 1);
                let v = Tensor::cat(segments[cut..].iter().map(|s| s.value.clone()).collect(), 1);
                segs.truncate(cut);
                segs.push((prim(k), prim(v)));
            }
            let mask = options.key_mask.clone().map(prim_bool);
            attention::attend_prim(prim(query.clone()), segs, mask, options.causal)
        });
        match fast {
            Some(o) => wrap(o),
            None => portable::attention(query, segments, options),
        }
    }

    fn attend_blocks(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        cu_seqlens: &[usize],
    ) -> Tensor<Self, 4> {
        let fast = run(Kind::Attention, || {
            attention::attend_blocks_prim(prim(q.clone()), prim(k.clone()), prim(v.clone()), cu_seqlens)
        });
        match fast {
            Some(o) => wrap(o),
            None => portable::attention_blocks(q, k, v, cu_seqlens, Self::attend),
        }
    }

    fn layer_norm_modulate(
        x: Tensor<Self, 3>,
        shift: &Tensor<Self, 3>,
        scale: &Tensor<Self, 3>,
        runs: &[(usize, usize)],
        eps: f64,
    ) -> Tensor<Self, 3> {
        let fast = run(Kind::Glue, || {
            glue::layer_norm_modulate_prim(
                prim(x.clone()),
                &prim(shift.clone()),
                &prim(scale.clone()),
                runs,
                eps,
            )
        });
        match fast {
            Some(y) => wrap(y),
            None => portable::layer_norm_modulate(x, shift, scale, runs, eps),
        }
    }

    fn gated_residual(
        residual: Tensor<Self, 3>,
        y: Tensor<Self, 3>,
        gate: &Tensor<Self, 3>,
        runs: &[(usize, usize)],
    ) -> Tensor<Self, 3> {
        let fast = run(Kind::Glue, || {
            glue::gated_residual_prim(prim(residual.clone()), prim(y.clone()), &prim(gate.clone()), runs)
        });
        match fast {
            Some(o) => wrap(o),
            None => portable::gated_residual(residual, y, gate, runs),
        }
    }

    fn rms_norm_rope(
        x: Tensor<Self, 4>,
        weight: &Tensor<Self, 1>,
        eps: f64,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
    ) -> Tensor<Self, 4> {
        let fast = run(Kind::Glue, || {
            glue::rms_norm_rope_prim(
                prim(x.clone()),
                &prim(weight.clone()),
                eps,
                &prim(cos.clone()),
                &prim(sin.clone()),
            )
        });
        match fast {
            Some(y) => wrap(y),
            None => portable::rms_norm_rope(x, weight, eps, cos, sin),
        }
    }

    fn conv2d_nchw(
        x: Tensor<Self, 4>,
        weight: &Tensor<Self, 4>,
        bias: &Tensor<Self, 1>,
        stride: usize,
        pad: usize,
    ) -> Tensor<Self, 4> {
        // One cuBLASLt GEMM over an im2col copy instead of burn's convolution kernels, which compile and autotune
        // per shape on first use (minutes for the VAE at 1024²).
        if Kind::Gemm.enabled() {
            lowered::conv2d(x, weight, bias, stride, pad)
        } else {
            portable::conv2d(x, weight, bias, stride, pad)
        }
    }

    fn rms_norm_rope_cat(parts: &[NormRope<'_, Self>]) -> Tensor<Self, 4> {
        let fast = run(Kind::Glue, || {
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
            glue::rms_norm_rope_cat_prim(prims)
        });
        match fast {
            Some(y) => wrap(y),
            None => portable::rms_norm_rope_cat(parts),
        }
    }

    fn silu_mul(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let fast = run(Kind::Glue, || glue::silu_mul_prim(prim(gate.clone()), prim(up.clone())));
        match fast {
            Some(y) => wrap(y),
            None => portable::silu_mul(gate, up),
        }
    }

    fn upload<const D: usize>(data: TensorData, device: &Self::Device) -> Tensor<Self, D> {
        match run(Kind::Glue, || tensor::upload_prim(&data, device)) {
            Some(t) => wrap(t),
            None => portable::upload(data, device),
        }
    }
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
    device::with_device(index, |_| {
        let (free, total) = cudarc::driver::result::mem_get_info()
            .map_err(|e| FastError::cuda(format!("cuMemGetInfo: {e:?}")))?;
        Ok((total - free) as u64)
    })
    .ok()
}
