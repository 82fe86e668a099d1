//! The fast path's configuration ([`FastPathConfig`]) and the one place that reads its `QWEN_*` environment
//! variables (see the table in the [`crate::cuda`] module docs).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// How the fast path of one device is set up: which kinds of operation run on it, which flash-attention kernel,
/// how our stream is ordered against burn's queue, GEMM autotuning, where kernel sources come from, and output
/// poisoning for tests.
///
/// Each device starts from [`FastPathConfig::from_env`] (the `QWEN_*` variables, read once per process) and can be
/// given another one with [`configure`](super::configure):
///
/// ```no_run
/// use qwen_image::cuda::{self, CudaDevice, FastOps, FastPathConfig};
///
/// let device = CudaDevice::new(0);
/// // Only the GEMMs on cuBLASLt, everything else on burn's kernels.
/// let config = FastPathConfig { ops: FastOps { gemm: true, ..FastOps::NONE }, ..cuda::config(&device) };
/// cuda::configure(&device, config).expect("ordering mode available");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastPathConfig {
    /// The kinds of operation that use the fast path (`QWEN_CUDA_FAST`; default all).
    pub ops: FastOps,
    /// The flash-attention kernel for head dimension 128 on Hopper (`QWEN_FLASH`; default [`FlashKernel::Auto`]).
    pub flash_kernel: FlashKernel,
    /// How our stream is ordered against burn's queue (`QWEN_CUDA_ORDERING`; default
    /// [`OrderingMode::ContextEvents`], which falls back to host syncs on drivers without context events).
    pub ordering: OrderingMode,
    /// cuBLASLt algorithm autotuning (`QWEN_GEMM_AUTOTUNE`; default [`GemmAutotune::On`]). A shape keeps the
    /// algorithm chosen at its first call.
    pub gemm_autotune: GemmAutotune,
    /// Kernel development (`QWEN_CUDA_KERNEL_DIR`): `<dir>/<module>.cu`, when present, replaces the built-in source
    /// of that module. Read when a module is compiled (its first use on the device).
    pub kernel_dir: Option<PathBuf>,
    /// FP8 GEMMs with cuBLASLt's fast accumulation (`QWEN_FP8_FAST_ACCUM`; default on): the tensor cores'
    /// accumulators are not promoted to full f32 every few K-steps, which is faster and less exact (XLA and many
    /// inference engines use it for forward passes). Measured (docs/fp8.md): 1.12–1.29× per DiT GEMM, rel. L2
    /// 2–3.4e-3 against the promoted sums, and on the proxy benchmark in bf16 on an H100 no edit of 120 changed
    /// against bf16 (plain FP8: one). `QWEN_FP8_FAST_ACCUM=0` promotes.
    pub fp8_fast_accum: bool,
    /// Run each fast-path operation on burn's device thread (`QWEN_CUDA_DEVICE_THREAD`; default on): one blocking
    /// round trip to that thread per operation instead of one per tensor whose device address it takes (3–5 for a
    /// GEMM). Same work in the same order either way; `QWEN_CUDA_DEVICE_THREAD=0` runs them on the calling thread.
    pub device_thread: bool,
    /// Upload the activations an edit makes on the host (the vision tower's patches, the prompt's token embeddings
    /// under FP8) from page-locked staging buffers (`QWEN_CUDA_STAGED_UPLOADS`; default off until measured on a
    /// GPU): a copy from pageable memory makes the host wait until the device reaches it, which stops the host
    /// queueing ahead while earlier work (the queued VAE encode) runs. Weights are never staged.
    pub staged_uploads: bool,
    /// Test support (no variable): every fast-path output is filled with NaN before the kernel that computes it
    /// runs, so a kernel that leaves elements unwritten is caught.
    pub poison_outputs: bool,
}

impl Default for FastPathConfig {
    /// Everything on: all kinds, [`FlashKernel::Auto`], context events, autotuning, built-in kernels, no poisoning.
    fn default() -> Self {
        FastPathConfig {
            ops: FastOps::ALL,
            flash_kernel: FlashKernel::Auto,
            ordering: OrderingMode::ContextEvents,
            gemm_autotune: GemmAutotune::On,
            kernel_dir: None,
            fp8_fast_accum: true,
            device_thread: true,
            staged_uploads: false,
            poison_outputs: false,
        }
    }
}

impl FastPathConfig {
    /// The configuration the process's environment asks for: the `QWEN_*` variables of the [`crate::cuda`] table
    /// over [`FastPathConfig::default`]. The variables are read on the first call only; a value that does not
    /// parse is ignored with a `log` warning.
    pub fn from_env() -> FastPathConfig {
        environment().fast_path.clone()
    }
}

/// What the `QWEN_*` variables ask for.
struct Environment {
    fast_path: FastPathConfig,
    /// `QWEN_CUDA_CACHE_DIR`: process-wide (burn's kernel caches are), so not part of the per-device config.
    cache_dir: Option<PathBuf>,
}

/// The environment, read once per process: the only place of this crate that reads a `QWEN_*` variable.
fn environment() -> &'static Environment {
    static ENV: OnceLock<Environment> = OnceLock::new();
    ENV.get_or_init(|| Environment::parse(|name| std::env::var_os(name)))
}

/// `QWEN_CUDA_CACHE_DIR`, if set and not empty (see [`super::default_cache_dir`]).
pub(crate) fn cache_dir_from_env() -> Option<&'static Path> {
    environment().cache_dir.as_deref()
}

impl Environment {
    /// Parses the variables that `var` returns (unset: `None`).
    fn parse(var: impl Fn(&str) -> Option<OsString>) -> Environment {
        let d = FastPathConfig::default();
        let dir = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let fast_path = FastPathConfig {
            ops: parsed(&var, "QWEN_CUDA_FAST", FastOps::parse).unwrap_or(d.ops),
            flash_kernel: parsed(&var, "QWEN_FLASH", FlashKernel::parse).unwrap_or(d.flash_kernel),
            ordering: parsed(&var, "QWEN_CUDA_ORDERING", OrderingMode::parse).unwrap_or(d.ordering),
            gemm_autotune: parsed(&var, "QWEN_GEMM_AUTOTUNE", GemmAutotune::parse).unwrap_or(d.gemm_autotune),
            kernel_dir: dir("QWEN_CUDA_KERNEL_DIR"),
            fp8_fast_accum: parsed(&var, "QWEN_FP8_FAST_ACCUM", parse_switch).unwrap_or(d.fp8_fast_accum),
            device_thread: parsed(&var, "QWEN_CUDA_DEVICE_THREAD", parse_switch).unwrap_or(d.device_thread),
            staged_uploads: parsed(&var, "QWEN_CUDA_STAGED_UPLOADS", parse_switch)
                .unwrap_or(d.staged_uploads),
            poison_outputs: d.poison_outputs,
        };
        Environment { fast_path, cache_dir: dir("QWEN_CUDA_CACHE_DIR") }
    }
}

/// The value of variable `name` through `parse`; `None` when unset, or (with a warning) when it does not parse.
fn parsed<T>(var: &impl Fn(&str) -> Option<OsString>, name: &str, parse: fn(&str) -> Option<T>) -> Option<T> {
    let raw = var(name)?;
    let value = parse(raw.to_string_lossy().trim());
    if value.is_none() {
        log::warn!("qwen-image: ignoring {name}={raw:?} (the qwen_image::cuda docs list its values)");
    }
    value
}

/// Parses an on/off variable: `1`/`on`, `0`/`off`.
fn parse_switch(s: &str) -> Option<bool> {
    match s {
        "1" | "on" => Some(true),
        "0" | "off" => Some(false),
        _ => None,
    }
}

/// Which operation kinds use the CUDA fast path (the rest use [`crate::ops::portable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastOps {
    /// `dense` / `dense_gelu_tanh` through cuBLASLt (and the convolutions and wide-head attention lowered to them).
    pub gemm: bool,
    /// `attend` / `attend_blocks` through our flash-attention kernels.
    pub attention: bool,
    /// The fused elementwise kernels (`layer_norm_modulate`, `gated_residual`, `rms_norm_rope`,
    /// `rms_norm_rope_cat`, `silu_mul`) and the direct weight `upload` (off: burn's upload, which stages through a
    /// pinned host pool the size of the model).
    pub glue: bool,
    /// FP8: the e4m3 quantization kernel (`quantize_fp8`) and cuBLASLt FP8 GEMMs with per-row/column scales
    /// (`dense_fp8`, `dense_fp8_gelu_tanh`; cuBLASLt 12.9+, sm_89+).
    pub fp8: bool,
    /// The VAE's convolutions (`conv2d_nchw`) through cuDNN; when cuDNN is missing or this is off they are lowered
    /// to cuBLASLt GEMMs over an im2col copy (with `gemm` on), else burn's own convolution.
    pub conv: bool,
}

impl FastOps {
    /// Everything on (the default).
    pub const ALL: FastOps = FastOps { gemm: true, attention: true, glue: true, fp8: true, conv: true };
    /// Everything off: burn's own kernels only.
    pub const NONE: FastOps = FastOps { gemm: false, attention: false, glue: false, fp8: false, conv: false };

    /// Parses a comma-separated list of `gemm`, `attention` (or `attn`), `glue`, `fp8`, `conv`, or `all` / `none`.
    pub fn parse(s: &str) -> Option<FastOps> {
        let mut ops = FastOps::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => ops = FastOps::ALL,
                "none" => ops = FastOps::NONE,
                "gemm" => ops.gemm = true,
                "attention" | "attn" => ops.attention = true,
                "glue" => ops.glue = true,
                "fp8" => ops.fp8 = true,
                "conv" => ops.conv = true,
                _ => return None,
            }
        }
        Some(ops)
    }
}

/// Which flash-attention kernel serves head dimension 128 on Hopper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashKernel {
    /// On sm_90 the warp-specialized TMA kernel (`flash_fwd_tma_d128`), the mma.sync kernel elsewhere (the default).
    Auto,
    /// On sm_90 the TMA kernel without intra-warpgroup overlap (`flash_fwd_tma_d128_serial`), for comparison.
    TmaSerial,
    /// On sm_90 the earlier warpgroup-MMA kernel that loads with `cp.async` (`flash_fwd_wgmma_d128`).
    Wgmma,
    /// Always the mma.sync (FlashAttention-2 style) kernel.
    Mma,
}

impl FlashKernel {
    /// Parses `QWEN_FLASH` values: `auto`/`tma`, `tma-serial`, `wgmma`, `mma`.
    pub fn parse(s: &str) -> Option<FlashKernel> {
        Some(match s {
            "auto" | "tma" => FlashKernel::Auto,
            "tma-serial" => FlashKernel::TmaSerial,
            "wgmma" => FlashKernel::Wgmma,
            "mma" => FlashKernel::Mma,
            _ => return None,
        })
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            FlashKernel::Auto => "tma",
            FlashKernel::TmaSerial => "tma-serial",
            FlashKernel::Wgmma => "wgmma",
            FlashKernel::Mma => "mma.sync",
        }
    }
}

/// How work on our stream is ordered against burn's queue (see the module docs of [`crate::cuda`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderingMode {
    /// Device-side: before an operation our stream waits on an event capturing everything submitted to the CUDA
    /// context (`cuCtxRecordEvent`); after it, all later work of the context waits on our stream's event
    /// (`cuCtxWaitEvent`). Nothing blocks the host.
    ContextEvents,
    /// Host-side: burn's queue is drained before the operation and our stream is synchronized after it.
    HostSync,
}

impl OrderingMode {
    /// Parses `QWEN_CUDA_ORDERING` values: `events` (or `context`), `sync` (or `host`).
    pub fn parse(s: &str) -> Option<OrderingMode> {
        match s {
            "events" | "context" => Some(OrderingMode::ContextEvents),
            "sync" | "host" => Some(OrderingMode::HostSync),
            _ => None,
        }
    }
}

/// cuBLASLt algorithm selection per GEMM shape (see `cuda/gemm.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmAutotune {
    /// The heuristic's first choice (reproducible across processes).
    Off,
    /// The fastest of the heuristic's top candidates, timed at a large shape's first call (the default).
    On,
    /// As [`GemmAutotune::On`], and each autotuned shape's candidate timings are logged (`log::info!`).
    Verbose,
}

impl GemmAutotune {
    /// Parses `QWEN_GEMM_AUTOTUNE` values: `0`/`off`, `1`/`on`, `verbose`.
    pub fn parse(s: &str) -> Option<GemmAutotune> {
        match s {
            "0" | "off" => Some(GemmAutotune::Off),
            "1" | "on" => Some(GemmAutotune::On),
            "verbose" => Some(GemmAutotune::Verbose),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Environment {
        Environment::parse(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v)))
    }

    #[test]
    fn no_variables_give_the_default() {
        let e = env(&[]);
        assert_eq!(e.fast_path, FastPathConfig::default());
        assert_eq!(e.cache_dir, None);
    }

    #[test]
    fn every_variable_is_read() {
        let e = env(&[
            ("QWEN_CUDA_FAST", "gemm, attn"),
            ("QWEN_FLASH", "wgmma"),
            ("QWEN_CUDA_ORDERING", "sync"),
            ("QWEN_GEMM_AUTOTUNE", "verbose"),
            ("QWEN_CUDA_KERNEL_DIR", "/k"),
            ("QWEN_CUDA_CACHE_DIR", "/c"),
            ("QWEN_FP8_FAST_ACCUM", "off"),
            ("QWEN_CUDA_DEVICE_THREAD", "0"),
            ("QWEN_CUDA_STAGED_UPLOADS", "1"),
        ]);
        let want = FastPathConfig {
            ops: FastOps { gemm: true, attention: true, glue: false, fp8: false, conv: false },
            flash_kernel: FlashKernel::Wgmma,
            ordering: OrderingMode::HostSync,
            gemm_autotune: GemmAutotune::Verbose,
            kernel_dir: Some("/k".into()),
            fp8_fast_accum: false,
            device_thread: false,
            staged_uploads: true,
            poison_outputs: false,
        };
        assert_eq!(e.fast_path, want);
        assert_eq!(e.cache_dir, Some(PathBuf::from("/c")));
    }

    #[test]
    fn values_keep_their_meaning() {
        assert_eq!(env(&[("QWEN_CUDA_FAST", "none")]).fast_path.ops, FastOps::NONE);
        assert_eq!(env(&[("QWEN_CUDA_FAST", "conv")]).fast_path.ops, FastOps { conv: true, ..FastOps::NONE });
        assert_eq!(env(&[("QWEN_GEMM_AUTOTUNE", "0")]).fast_path.gemm_autotune, GemmAutotune::Off);
        assert_eq!(env(&[("QWEN_GEMM_AUTOTUNE", "off")]).fast_path.gemm_autotune, GemmAutotune::Off);
        assert_eq!(env(&[("QWEN_CUDA_ORDERING", "host")]).fast_path.ordering, OrderingMode::HostSync);
        assert_eq!(env(&[("QWEN_FLASH", "tma")]).fast_path.flash_kernel, FlashKernel::Auto);
        assert_eq!(env(&[("QWEN_CUDA_KERNEL_DIR", "")]).fast_path.kernel_dir, None);
        assert!(!env(&[("QWEN_FP8_FAST_ACCUM", "0")]).fast_path.fp8_fast_accum);
        assert!(env(&[("QWEN_FP8_FAST_ACCUM", "1")]).fast_path.fp8_fast_accum);
    }

    #[test]
    fn unparsable_values_keep_the_default() {
        let e = env(&[
            ("QWEN_CUDA_FAST", "gemm,bogus"),
            ("QWEN_FLASH", "fast"),
            ("QWEN_GEMM_AUTOTUNE", "yes"),
            ("QWEN_FP8_FAST_ACCUM", "yes"),
            ("QWEN_CUDA_DEVICE_THREAD", "maybe"),
            ("QWEN_CUDA_STAGED_UPLOADS", "later"),
        ]);
        assert_eq!(e.fast_path, FastPathConfig::default());
    }
}
