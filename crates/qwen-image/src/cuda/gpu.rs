//! One GPU's CUDA state ([`GpuState`]: context, our stream and its ordering events, compiled kernels, cuBLASLt) and
//! the view of it a fast operation works with ([`Gpu`]: that state plus the device's configuration).

use std::{
    ffi::c_void,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Arc,
};

use cudarc::driver::{result, sys, CudaContext};

use super::{
    config::{FastPathConfig, OrderingMode},
    conv::Dnn,
    error::FastError,
    gemm::Blas,
    nvrtc::KernelCache,
    staging::StagingBuffers,
    tensor::Prim,
};

/// A driver call's error as a [`FastError::Cuda`] naming the call.
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

/// One GPU's CUDA state. It lives in the device registry until the process exits, so the handles it creates (the
/// stream, the events, the loaded modules, cuBLASLt's handle, workspace and plans) are never destroyed: one set per
/// device and process, bounded in number, and released by the driver when the process exits.
pub(crate) struct GpuState {
    /// The device's primary context (the one burn uses too), retained by cudarc.
    ctx: Arc<CudaContext>,
    /// Our stream: every fast-path kernel, GEMM and upload runs on it.
    stream: sys::CUstream,
    /// Captures all work submitted to the context before an operation ([`Gpu::begin`]).
    ev_in: sys::CUevent,
    /// Marks the end of an operation on our stream ([`Gpu::end`]).
    ev_out: sys::CUevent,
    /// The ordering in effect (the configured one, unless context events are missing).
    ordering: OrderingMode,
    /// Compute capability.
    cc: (i32, i32),
    kernels: KernelCache,
    /// cuBLASLt, created on first use.
    pub(crate) blas: Option<Blas>,
    /// cuDNN (the VAE's convolutions), created on first use.
    pub(crate) dnn: Option<Dnn>,
    /// Whether burn allocates exactly for the current stage ([`super::registry::allocate_exactly`]): cuDNN's
    /// workspace is then a buffer of its own (`conv.rs`).
    pub(crate) exact_allocation: bool,
    /// Page-locked buffers for staged uploads of activations (`staging.rs`).
    pub(crate) staging: StagingBuffers,
}

// SAFETY: the raw CUDA handles (stream, events, modules, functions, cuBLASLt and cuDNN handles and descriptors) are plain
// driver handles, valid in any thread once the context is bound there, and the staging buffers plain page-locked host
// allocations owned by this state alone. The state is only reached through the
// registry's mutex, and `with_gpu` binds the context to the calling thread before handing it out, so it is used by
// one thread at a time with its context current.
unsafe impl Send for GpuState {}

impl GpuState {
    /// Creates the state of device `index`: its primary context, our stream and events, with `ordering` (context
    /// events fall back to host syncs where the driver lacks them, with a `log` warning).
    pub(crate) fn new(index: usize, ordering: OrderingMode) -> Result<Self, FastError> {
        // SAFETY: only checks whether libcuda could be loaded (no driver call is made).
        if !unsafe { sys::is_culib_present() } {
            return Err(FastError::cuda("libcuda not found"));
        }
        let ctx = drv("CUDA context", CudaContext::new(index))?;
        drv("bind context", ctx.bind_to_thread())?;
        // Never destroyed (see the type's docs); if a later step fails, the ones made before leak too (once, as
        // the device is then not used by the fast path).
        let stream = drv("create stream", result::stream::create(result::stream::StreamKind::NonBlocking))?;
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        let ev_in = drv("create event", result::event::create(flags))?;
        let ev_out = drv("create event", result::event::create(flags))?;
        let cc = drv("compute capability", ctx.compute_capability())?;
        let mut gpu = GpuState {
            ctx,
            stream,
            ev_in,
            ev_out,
            ordering: OrderingMode::HostSync,
            cc,
            kernels: KernelCache::default(),
            blas: None,
            dnn: None,
            exact_allocation: false,
            staging: StagingBuffers::default(),
        };
        if let Err(e) = gpu.set_ordering(ordering) {
            log::warn!(
                "qwen-image: context events unavailable ({e}); ordering the CUDA fast path by host syncs"
            );
        }
        Ok(gpu)
    }

    /// Makes the context current on this thread.
    pub(crate) fn bind(&self) -> Result<(), FastError> {
        drv("bind context", self.ctx.bind_to_thread())
    }

    /// The ordering in effect.
    pub(crate) fn ordering(&self) -> OrderingMode {
        self.ordering
    }

    /// Switches the ordering mechanism (context bound): waits for our stream first, so nothing of the old mode is
    /// pending. Context events need a recent driver (CUDA 12.5+): they are probed once, and on failure the mode
    /// stays as it was.
    pub(crate) fn set_ordering(&mut self, mode: OrderingMode) -> Result<(), FastError> {
        if mode == OrderingMode::ContextEvents {
            guarded("cuCtxRecordEvent", || {
                // SAFETY: the context is this device's primary context (retained by `self.ctx`, current on this
                // thread) and `ev_in` is a live event of it.
                drv("cuCtxRecordEvent", unsafe {
                    sys::cuCtxRecordEvent(self.ctx.cu_ctx(), self.ev_in).result()
                })
            })?;
        }
        self.synchronize()?;
        self.ordering = mode;
        Ok(())
    }

    /// Gives the device's stream-ordered memory pool (the one `cuMemAllocAsync` draws from: burn's allocations)
    /// back to the driver down to what is allocated (`cuMemPoolTrimTo(pool, 0)`): the pages burn freed stay in that
    /// pool otherwise. Call after the frees have completed (a device sync).
    pub(crate) fn trim_memory_pool(&self) -> Result<(), FastError> {
        let device = self.ctx.cu_device();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `device` is the device of the bound context; `pool` receives a handle owned by the driver.
        drv("cuDeviceGetMemPool", unsafe { sys::cuDeviceGetMemPool(&mut pool, device).result() })?;
        // SAFETY: `pool` is the device's current pool (just queried); trimming only releases unallocated memory.
        drv("cuMemPoolTrimTo", unsafe { sys::cuMemPoolTrimTo(pool, 0).result() })
    }

    /// Waits until everything submitted to our stream has finished.
    pub(crate) fn synchronize(&self) -> Result<(), FastError> {
        // SAFETY: `stream` is a live stream of the bound context (never destroyed).
        drv("stream synchronize", unsafe { result::stream::synchronize(self.stream) })
    }
}

/// A device's CUDA state and configuration, as a fast operation sees them (from [`super::registry::with_gpu`],
/// with the context bound to the calling thread).
pub(crate) struct Gpu<'a> {
    state: &'a mut GpuState,
    config: &'a FastPathConfig,
}

impl<'a> Gpu<'a> {
    pub(crate) fn new(state: &'a mut GpuState, config: &'a FastPathConfig) -> Self {
        Gpu { state, config }
    }

    /// The device's fast-path configuration.
    pub(crate) fn config(&self) -> &FastPathConfig {
        self.config
    }

    /// Compute capability.
    pub(crate) fn cc(&self) -> (i32, i32) {
        self.state.cc
    }

    /// Our stream.
    pub(crate) fn stream(&self) -> sys::CUstream {
        self.state.stream
    }

    /// The ordering in effect.
    pub(crate) fn ordering(&self) -> OrderingMode {
        self.state.ordering
    }

    /// See [`GpuState::synchronize`].
    pub(crate) fn synchronize(&self) -> Result<(), FastError> {
        self.state.synchronize()
    }

    /// The state, for the GEMM module's cuBLASLt handle.
    pub(crate) fn state(&mut self) -> &mut GpuState {
        self.state
    }

    /// Orders our stream after everything submitted so far (call after taking every pointer the operation needs:
    /// taking a pointer goes through burn's device thread, which runs its queue in order, so everything burn was
    /// asked before has been handed to the driver).
    pub(crate) fn begin(&mut self, any: &Prim) -> Result<(), FastError> {
        let s = &*self.state;
        match s.ordering {
            OrderingMode::ContextEvents => {
                // SAFETY: the context is current on this thread (`with_gpu`), and `ev_in` and `stream` are live
                // handles of it (never destroyed).
                drv("cuCtxRecordEvent", unsafe { sys::cuCtxRecordEvent(s.ctx.cu_ctx(), s.ev_in).result() })?;
                // SAFETY: as above; the wait is queued on our stream, after the record in stream order.
                drv("cuStreamWaitEvent", unsafe {
                    result::stream::wait_event(
                        s.stream,
                        s.ev_in,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                })
            }
            OrderingMode::HostSync => cubecl::future::block_on(any.client.sync())
                .map_err(|e| FastError::cuda(format!("burn sync: {e:?}"))),
        }
    }

    /// Orders everything submitted later (burn's kernels included) after the work just put on our stream.
    pub(crate) fn end(&mut self) -> Result<(), FastError> {
        let s = &*self.state;
        match s.ordering {
            OrderingMode::ContextEvents => {
                // SAFETY: the context is current on this thread, and `ev_out` and `stream` are live handles of it.
                drv("cuEventRecord", unsafe { result::event::record(s.ev_out, s.stream) })?;
                // SAFETY: as above; `ev_out` was just recorded on our stream.
                drv("cuCtxWaitEvent", unsafe { sys::cuCtxWaitEvent(s.ctx.cu_ctx(), s.ev_out).result() })
            }
            OrderingMode::HostSync => s.synchronize(),
        }
    }

    /// The kernel `name` of module `module` (compiled from `source`, or from the configured kernel directory, with
    /// NVRTC on first use for this device's architecture, and cached), allowed `smem` bytes of dynamic shared
    /// memory.
    pub(crate) fn function(
        &mut self,
        module: &'static str,
        source: &'static str,
        name: &'static str,
        smem: u32,
    ) -> Result<sys::CUfunction, FastError> {
        let dir = self.config.kernel_dir.as_deref();
        self.state.kernels.function(self.state.cc, dir, (module, source, name), smem)
    }

    /// With [`FastPathConfig::poison_outputs`] on, fills the `elems` bf16 values at `ptr` with NaN on our stream.
    ///
    /// # Safety
    /// `ptr .. ptr + 2·elems` must be device memory of this device that the caller holds (an output it allocated)
    /// until the operation's kernels are queued.
    pub(crate) unsafe fn poison(&self, ptr: u64, elems: usize) -> Result<(), FastError> {
        if self.config.poison_outputs {
            // SAFETY: forwarded from this function's contract; the memset is queued on our stream before the
            // kernels that write the output.
            drv("cuMemsetD16Async", unsafe {
                sys::cuMemsetD16Async(ptr, 0x7fc0, elems, self.state.stream).result()
            })?;
        }
        Ok(())
    }

    /// Zeroes the `words` 4-byte words at `ptr` on our stream.
    ///
    /// # Safety
    /// `ptr .. ptr + 4·words` must be device memory of this device that the caller holds until the operation's
    /// kernels are queued.
    pub(crate) unsafe fn zero_words(&self, ptr: u64, words: usize) -> Result<(), FastError> {
        // SAFETY: forwarded from this function's contract; the memset is queued on our stream before the kernels
        // that read the words.
        drv("cuMemsetD32Async", unsafe { sys::cuMemsetD32Async(ptr, 0, words, self.state.stream).result() })
    }

    /// Launches `f` on our stream with the given argument pointers.
    ///
    /// # Safety
    /// `args` must point to values whose types and order match the kernel's parameters (the `#[repr(C)]` structs
    /// are checked against their C++ definitions at compile time on both sides), and every device pointer they hold
    /// must be valid for the accesses the kernel makes until it has run: the buffers must be held by the caller
    /// until the launch is queued, after which burn's allocator only reuses them for work ordered after ours
    /// ([`Gpu::end`]).
    pub(crate) unsafe fn launch(
        &self,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), FastError> {
        // SAFETY: forwarded from this function's contract; `f` was loaded in the bound context and our stream
        // belongs to it. The driver copies the argument values at launch, so `args` need not outlive the call.
        drv("cuLaunchKernel", unsafe { result::launch_kernel(f, grid, block, smem, self.state.stream, args) })
    }
}
