//! Per-device state of the fast path: our CUDA stream, its ordering against burn's queue, compiled kernels, the
//! cuBLASLt handle, and the switches and counters of the fast operations.

use std::{
    collections::{HashMap, HashSet},
    ffi::{c_void, CStr, CString},
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        Arc, Mutex, OnceLock,
    },
};

use cudarc::driver::{result, sys, CudaContext};

use super::{error::FastError, gemm::Blas, tensor::Prim};

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

/// Which operation kinds use the CUDA fast path (the rest use [`crate::ops::portable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastOps {
    /// `dense` / `dense_gelu_tanh` through cuBLASLt.
    pub gemm: bool,
    /// `attend` / `attend_blocks` through our flash-attention kernel.
    pub attention: bool,
    /// The fused elementwise kernels (`layer_norm_modulate`, `gated_residual`, `rms_norm_rope`,
    /// `rms_norm_rope_cat`, `silu_mul`) and the direct weight `upload` (off: burn's upload, which stages through a
    /// pinned host pool the size of the model).
    pub glue: bool,
}

impl FastOps {
    /// Everything on (the default).
    pub const ALL: FastOps = FastOps { gemm: true, attention: true, glue: true };
    /// Everything off: burn's own kernels only.
    pub const NONE: FastOps = FastOps { gemm: false, attention: false, glue: false };

    /// Parses a comma-separated list of `gemm`, `attention`, `glue`, or `all` / `none`.
    pub fn parse(s: &str) -> Option<FastOps> {
        let mut ops = FastOps::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => ops = FastOps::ALL,
                "none" => ops = FastOps::NONE,
                "gemm" => ops.gemm = true,
                "attention" | "attn" => ops.attention = true,
                "glue" => ops.glue = true,
                _ => return None,
            }
        }
        Some(ops)
    }

    fn bits(self) -> u8 {
        u8::from(self.gemm) | u8::from(self.attention) << 1 | u8::from(self.glue) << 2
    }

    fn from_bits(b: u8) -> FastOps {
        FastOps { gemm: b & 1 != 0, attention: b & 2 != 0, glue: b & 4 != 0 }
    }
}

const UNSET: u8 = 0xff;
static FAST: AtomicU8 = AtomicU8::new(UNSET);

/// The operation kinds currently on: [`set_fast_ops`], else `QWEN_CUDA_FAST` (e.g. `gemm,attention`, `none`),
/// else all. A kind whose CUDA call failed is switched off for the rest of the process.
pub fn fast_ops() -> FastOps {
    match FAST.load(Ordering::Relaxed) {
        UNSET => {
            let ops =
                std::env::var("QWEN_CUDA_FAST").ok().and_then(|s| FastOps::parse(&s)).unwrap_or(FastOps::ALL);
            FAST.store(ops.bits(), Ordering::Relaxed);
            ops
        }
        b => FastOps::from_bits(b),
    }
}

/// Chooses the operation kinds that use the fast path (benchmarks compare with burn's kernels this way).
pub fn set_fast_ops(ops: FastOps) {
    FAST.store(ops.bits(), Ordering::Relaxed);
}

/// The operation kinds, for counters and switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Gemm = 0,
    Attention = 1,
    Glue = 2,
}

impl Kind {
    pub(crate) fn enabled(self) -> bool {
        let ops = fast_ops();
        match self {
            Kind::Gemm => ops.gemm,
            Kind::Attention => ops.attention,
            Kind::Glue => ops.glue,
        }
    }

    fn disable(self) {
        let mut ops = fast_ops();
        match self {
            Kind::Gemm => ops.gemm = false,
            Kind::Attention => ops.attention = false,
            Kind::Glue => ops.glue = false,
        }
        set_fast_ops(ops);
    }
}

static CALLS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
static FALLBACKS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
static ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Counts of fast-path calls and of fallbacks to the portable implementation, per operation kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPathStats {
    /// `[gemm, attention, glue]` operations that ran on the fast path.
    pub calls: [u64; 3],
    /// `[gemm, attention, glue]` operations that fell back (unsupported input or a failed CUDA call).
    pub fallbacks: [u64; 3],
}

/// The counters since the start of the process (or the last [`reset_stats`]).
pub fn stats() -> FastPathStats {
    let get = |a: &[AtomicU64; 3]| [0, 1, 2].map(|i| a[i].load(Ordering::Relaxed));
    FastPathStats { calls: get(&CALLS), fallbacks: get(&FALLBACKS) }
}

/// Resets the counters.
pub fn reset_stats() {
    for a in CALLS.iter().chain(FALLBACKS.iter()) {
        a.store(0, Ordering::Relaxed);
    }
}

/// The CUDA failures that switched operation kinds off, oldest first.
pub fn errors() -> Vec<String> {
    ERRORS.lock().map(|e| e.clone()).unwrap_or_default()
}

/// Books the outcome of a fast-path attempt: `Some(value)` when it ran, `None` when the caller must fall back.
pub(crate) fn outcome<T>(kind: Kind, r: Result<T, FastError>) -> Option<T> {
    match r {
        Ok(v) => {
            CALLS[kind as usize].fetch_add(1, Ordering::Relaxed);
            Some(v)
        }
        Err(e) => {
            FALLBACKS[kind as usize].fetch_add(1, Ordering::Relaxed);
            if let FastError::Cuda(msg) = &e {
                kind.disable();
                let line = format!("{kind:?}: {msg}");
                eprintln!("qwen-image: CUDA fast path for {kind:?} switched off: {msg}");
                if let Ok(mut errs) = ERRORS.lock() {
                    errs.push(line);
                }
            }
            None
        }
    }
}

pub(crate) fn drv<T>(what: &str, r: Result<T, result::DriverError>) -> Result<T, FastError> {
    r.map_err(|e| FastError::cuda(format!("{what}: {e:?}")))
}

/// Runs `f`, turning a panic inside the CUDA bindings (a missing library or symbol) into an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, FastError>) -> Result<T, FastError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(FastError::cuda(format!("{what} panicked: {msg}")))
        }
    }
}

/// One GPU's fast-path state.
pub(crate) struct Device {
    ctx: Arc<CudaContext>,
    /// Our stream: every fast-path kernel and GEMM runs on it.
    pub stream: sys::CUstream,
    ev_in: sys::CUevent,
    ev_out: sys::CUevent,
    ordering: OrderingMode,
    /// Compute capability.
    pub cc: (i32, i32),
    modules: HashMap<&'static str, sys::CUmodule>,
    functions: HashMap<(&'static str, &'static str), sys::CUfunction>,
    smem_set: HashSet<(&'static str, &'static str, u32)>,
    /// cuBLASLt, created on first use.
    pub blas: Option<Blas>,
}

// SAFETY: the raw CUDA handles are only used while the owning mutex is held, with the context bound to the
// calling thread.
unsafe impl Send for Device {}

static POISON: AtomicBool = AtomicBool::new(false);

/// Test support: when on, every fast-path output is filled with NaN before the kernel that computes it runs, so a
/// kernel that leaves elements unwritten is caught.
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

static DEVICES: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();

/// Runs `f` with device `index`'s state (created on first use), its context bound to this thread.
pub(crate) fn with_device<R>(
    index: usize,
    f: impl FnOnce(&mut Device) -> Result<R, FastError>,
) -> Result<R, FastError> {
    let map = DEVICES.get_or_init(Default::default);
    let mut guard = map.lock().map_err(|_| FastError::cuda("fast-path device state poisoned"))?;
    let dev = match guard.entry(index) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(guarded("CUDA initialization", || Device::new(index))?)
        }
    };
    drv("bind context", dev.ctx.bind_to_thread())?;
    guarded("fast-path operation", || f(dev))
}

/// The ordering mechanism in use on device `index` (initializing the device state if needed).
pub fn ordering_mode(index: usize) -> Result<OrderingMode, FastError> {
    with_device(index, |d| Ok(d.ordering))
}

/// Switches the ordering mechanism of device `index` (benchmarks compare both); fails if context events are not
/// available on this driver.
pub fn set_ordering_mode(index: usize, mode: OrderingMode) -> Result<(), FastError> {
    with_device(index, |d| {
        if mode == OrderingMode::ContextEvents {
            drv("cuCtxRecordEvent", unsafe { sys::cuCtxRecordEvent(d.ctx.cu_ctx(), d.ev_in).result() })?;
        }
        // Leave nothing of the old mode pending.
        drv("stream synchronize", unsafe { result::stream::synchronize(d.stream) })?;
        d.ordering = mode;
        Ok(())
    })
}

/// Waits until everything submitted to our stream on device `index` has finished (benchmarks call it together
/// with burn's `sync` before reading a clock).
pub fn synchronize(index: usize) -> Result<(), FastError> {
    with_device(index, |d| drv("stream synchronize", unsafe { result::stream::synchronize(d.stream) }))
}

impl Device {
    fn new(index: usize) -> Result<Self, FastError> {
        if !unsafe { sys::is_culib_present() } {
            return Err(FastError::cuda("libcuda not found"));
        }
        let ctx = drv("CUDA context", CudaContext::new(index))?;
        drv("bind context", ctx.bind_to_thread())?;
        let stream = drv("create stream", result::stream::create(result::stream::StreamKind::NonBlocking))?;
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let ev_in = drv("create event", result::event::create(flags))?;
        let ev_out = drv("create event", result::event::create(flags))?;
        let cc = drv("compute capability", ctx.compute_capability())?;
        let wanted = match std::env::var("QWEN_CUDA_ORDERING").as_deref() {
            Ok("sync") | Ok("host") => OrderingMode::HostSync,
            _ => OrderingMode::ContextEvents,
        };
        let mut dev = Device {
            ctx,
            stream,
            ev_in,
            ev_out,
            ordering: wanted,
            cc,
            modules: HashMap::new(),
            functions: HashMap::new(),
            smem_set: HashSet::new(),
            blas: None,
        };
        if wanted == OrderingMode::ContextEvents {
            // Context-wide events need a recent driver (CUDA 12.5+); probe once and fall back to host syncs.
            let probe = guarded("cuCtxRecordEvent", || {
                drv("cuCtxRecordEvent", unsafe {
                    sys::cuCtxRecordEvent(dev.ctx.cu_ctx(), dev.ev_in).result()
                })
            });
            if let Err(e) = probe {
                eprintln!(
                    "qwen-image: context events unavailable ({e}); ordering the CUDA fast path by host syncs"
                );
                dev.ordering = OrderingMode::HostSync;
            }
        }
        Ok(dev)
    }

    /// Orders our stream after everything submitted so far (call after taking every pointer the operation needs:
    /// taking a pointer is a blocking round trip to burn's server thread, so its queue has been submitted).
    pub fn begin(&mut self, any: &Prim) -> Result<(), FastError> {
        match self.ordering {
            OrderingMode::ContextEvents => unsafe {
                drv("cuCtxRecordEvent", sys::cuCtxRecordEvent(self.ctx.cu_ctx(), self.ev_in).result())?;
                drv(
                    "cuStreamWaitEvent",
                    result::stream::wait_event(
                        self.stream,
                        self.ev_in,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    ),
                )
            },
            OrderingMode::HostSync => cubecl::future::block_on(any.client.sync())
                .map_err(|e| FastError::cuda(format!("burn sync: {e:?}"))),
        }
    }

    /// Orders everything submitted later (burn's kernels included) after the work just put on our stream.
    pub fn end(&mut self) -> Result<(), FastError> {
        match self.ordering {
            OrderingMode::ContextEvents => unsafe {
                drv("cuEventRecord", result::event::record(self.ev_out, self.stream))?;
                drv("cuCtxWaitEvent", sys::cuCtxWaitEvent(self.ctx.cu_ctx(), self.ev_out).result())
            },
            OrderingMode::HostSync => {
                drv("stream synchronize", unsafe { result::stream::synchronize(self.stream) })
            }
        }
    }

    /// NVRTC architecture flag for this device.
    fn arch(&self) -> String {
        match self.cc {
            (9, 0) => "sm_90a".to_string(),
            (major, minor) => format!("sm_{major}{minor}"),
        }
    }

    /// The kernel `name` of module `module` (compiled from `source` with NVRTC on first use, for this device's
    /// architecture, and cached).
    pub fn function(
        &mut self,
        module: &'static str,
        source: &'static str,
        name: &'static str,
    ) -> Result<sys::CUfunction, FastError> {
        if let Some(&f) = self.functions.get(&(module, name)) {
            return Ok(f);
        }
        let m = match self.modules.get(module) {
            Some(&m) => m,
            None => {
                let m = self.compile(module, source)?;
                self.modules.insert(module, m);
                m
            }
        };
        let cname = CString::new(name).map_err(|e| FastError::cuda(e.to_string()))?;
        let f = drv("cuModuleGetFunction", unsafe { result::module::get_function(m, cname) })?;
        self.functions.insert((module, name), f);
        Ok(f)
    }

    fn compile(&mut self, module: &str, source: &str) -> Result<sys::CUmodule, FastError> {
        use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
        if !unsafe { nvrtc_sys::is_culib_present() } {
            return Err(FastError::cuda(
                "libnvrtc not found (put the CUDA lib64 directory on LD_LIBRARY_PATH)",
            ));
        }
        // Kernel development: `QWEN_CUDA_KERNEL_DIR/<module>.cu`, when present, replaces the built-in source.
        let dev_src = std::env::var_os("QWEN_CUDA_KERNEL_DIR").and_then(|d| {
            std::fs::read_to_string(std::path::Path::new(&d).join(format!("{module}.cu"))).ok()
        });
        let source = dev_src.as_deref().unwrap_or(source);
        let src = CString::new(format!("{}\n{}", super::kernels::PRELUDE, source))
            .map_err(|e| FastError::cuda(e.to_string()))?;
        let name = CString::new(module).map_err(|e| FastError::cuda(e.to_string()))?;
        let nv =
            |what: &str, e: nvrtc::NvrtcError| FastError::cuda(format!("NVRTC {what} ({module}): {e:?}"));
        let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| nv("create", e))?;
        let arch = format!("--gpu-architecture={}", self.arch());
        let opts = [arch.as_str(), "-std=c++17", "-lineinfo"];
        let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
        let log = unsafe { nvrtc::get_program_log(prog) }
            .ok()
            .map(|l| unsafe { CStr::from_ptr(l.as_ptr()) }.to_string_lossy().into_owned());
        if let Err(e) = compiled {
            unsafe { nvrtc::destroy_program(prog) }.ok();
            return Err(FastError::cuda(format!(
                "NVRTC compile of {module} failed: {e:?}\n{}",
                log.unwrap_or_default()
            )));
        }
        let ptx = unsafe { nvrtc::get_ptx(prog) }.map_err(|e| nv("get PTX", e))?;
        unsafe { nvrtc::destroy_program(prog) }.ok();
        drv("cuModuleLoadData", unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) })
    }

    /// Allows `bytes` of dynamic shared memory for `f` (once per function and size).
    pub fn set_smem(
        &mut self,
        key: (&'static str, &'static str),
        f: sys::CUfunction,
        bytes: u32,
    ) -> Result<(), FastError> {
        if bytes > 48 * 1024 && self.smem_set.insert((key.0, key.1, bytes)) {
            drv("cuFuncSetAttribute", unsafe {
                result::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            })?;
        }
        Ok(())
    }

    /// With [`set_poison_outputs`] on, fills `elems` bf16 values at `ptr` with NaN on our stream.
    pub fn poison(&self, ptr: u64, elems: usize) -> Result<(), FastError> {
        if POISON.load(Ordering::Relaxed) {
            drv("cuMemsetD16Async", unsafe {
                sys::cuMemsetD16Async(ptr, 0x7fc0, elems, self.stream).result()
            })?;
        }
        Ok(())
    }

    /// Launches `f` on our stream with the given argument pointers.
    ///
    /// # Safety
    /// `args` must point to values whose types and order match the kernel's parameters, and every device pointer
    /// they hold must be valid for the accesses the kernel makes.
    pub unsafe fn launch(
        &self,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), FastError> {
        drv("cuLaunchKernel", unsafe { result::launch_kernel(f, grid, block, smem, self.stream, args) })
    }
}
