//! The device registry: per GPU, its [`FastPathConfig`], the counters of the fast operations and the CUDA state
//! ([`GpuState`], created on first use). The registry is the fast path's only process-wide state besides the
//! environment's configuration; devices never leave it.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

use super::{
    config::{FastOps, FastPathConfig, OrderingMode},
    error::FastError,
    gpu::{guarded, Gpu, GpuState},
    CudaDevice,
};
use crate::ops::{FastKindStats, FastPathReport};

/// The kinds of operation, each switched and counted on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Gemm = 0,
    Attention = 1,
    Glue = 2,
    Fp8 = 3,
    Conv = 4,
}

impl Kind {
    const ALL: [Kind; 5] = [Kind::Gemm, Kind::Attention, Kind::Glue, Kind::Fp8, Kind::Conv];

    /// The name in reports and logs.
    fn name(self) -> &'static str {
        match self {
            Kind::Gemm => "gemm",
            Kind::Attention => "attention",
            Kind::Glue => "glue",
            Kind::Fp8 => "fp8",
            Kind::Conv => "conv",
        }
    }

    fn configured(self, ops: FastOps) -> bool {
        match self {
            Kind::Gemm => ops.gemm,
            Kind::Attention => ops.attention,
            Kind::Glue => ops.glue,
            Kind::Fp8 => ops.fp8,
            Kind::Conv => ops.conv,
        }
    }
}

/// What one kind of operation did on one device.
#[derive(Clone, Debug, Default)]
struct KindState {
    calls: u64,
    fallbacks: u64,
    errors: u64,
    /// Set by a CUDA error; cleared by [`configure`].
    switched_off: bool,
    last_error: Option<String>,
}

/// One GPU's entry in the registry.
struct DeviceState {
    config: FastPathConfig,
    kinds: [KindState; 5],
    /// Created on first use ([`with_gpu`]).
    gpu: Option<GpuState>,
}

impl DeviceState {
    fn new() -> Self {
        DeviceState { config: FastPathConfig::from_env(), kinds: Default::default(), gpu: None }
    }

    fn enabled(&self, kind: Kind) -> bool {
        kind.configured(self.config.ops) && !self.kinds[kind as usize].switched_off
    }
}

/// Every device the fast path has seen, by CUDA device index.
static REGISTRY: Mutex<BTreeMap<usize, DeviceState>> = Mutex::new(BTreeMap::new());

/// Runs `f` on device `index`'s entry (made on first use). Whatever runs under the lock either cannot panic or is
/// guarded against panics ([`guarded`]: CUDA initialization and the fast operations), so a poisoned lock still
/// holds consistent data and is used as it is.
fn with_state<R>(index: usize, f: impl FnOnce(&mut DeviceState) -> R) -> R {
    f(registry().entry(index).or_insert_with(DeviceState::new))
}

/// The locked registry (see [`with_state`] on poisoning).
fn registry() -> MutexGuard<'static, BTreeMap<usize, DeviceState>> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `f` with device `index`'s CUDA state (created on first use) and configuration, its context bound to this
/// thread. The registry stays locked meanwhile: operations on the fast path are serialized (they only queue work).
pub(crate) fn with_gpu<R>(
    index: usize,
    f: impl FnOnce(&mut Gpu<'_>) -> Result<R, FastError>,
) -> Result<R, FastError> {
    let mut registry = registry();
    let state = registry.entry(index).or_insert_with(DeviceState::new);
    let DeviceState { config, gpu, .. } = state;
    if gpu.is_none() {
        *gpu = Some(guarded("CUDA initialization", || GpuState::new(index, config.ordering))?);
    }
    let gpu = gpu.as_mut().ok_or_else(|| FastError::cuda("CUDA state missing"))?;
    gpu.bind()?;
    guarded("fast-path operation", || f(&mut Gpu::new(gpu, config)))
}

/// Whether `kind` runs on the fast path of device `index` (configured on, not switched off by an error).
pub(crate) fn enabled(index: usize, kind: Kind) -> bool {
    with_state(index, |s| s.enabled(kind))
}

/// Runs the fast implementation `f` of a `kind` operation on device `index` if that kind is on, and books what
/// happened: `Some(value)` when it ran, `None` when the caller falls back to the portable implementation (the kind
/// is off, the inputs are unsupported, or a CUDA call failed: that switches the kind off on this device, with a
/// `log` warning, until the next [`configure`]).
pub(crate) fn attempt<T: Send + 'static>(
    index: usize,
    kind: Kind,
    f: impl FnOnce() -> Result<T, FastError> + Send,
) -> Option<T> {
    let (on, device_thread) = with_state(index, |s| {
        let on = s.enabled(kind);
        if !on {
            s.kinds[kind as usize].fallbacks += 1;
        }
        (on, s.config.device_thread)
    });
    if !on {
        return None;
    }
    // Not under the registry lock: `f` takes it itself (`with_gpu`), and burn work it triggers may take long.
    let result = if device_thread { on_device_thread(index, f) } else { f() };
    with_state(index, |s| {
        let k = &mut s.kinds[kind as usize];
        match result {
            Ok(value) => {
                k.calls += 1;
                Some(value)
            }
            Err(FastError::Unsupported(why)) => {
                k.fallbacks += 1;
                log::debug!("qwen-image: {} on CUDA device {index} falls back: {why}", kind.name());
                None
            }
            Err(FastError::Cuda(msg)) => {
                k.fallbacks += 1;
                k.errors += 1;
                k.switched_off = true;
                log::warn!(
                    "qwen-image: CUDA fast path for {} switched off on device {index} (until the next \
                     cuda::configure): {msg}",
                    kind.name()
                );
                k.last_error = Some(msg);
                None
            }
        }
    })
}

/// Runs `f` on burn's device thread of device `index` (`ComputeClient::exclusive`), blocking until it returns
/// ([`FastPathConfig::device_thread`]). A fast operation takes the device address of every tensor it touches, and
/// from any other thread each address is a blocking round trip to that thread (module docs of `cuda`, "Ordering");
/// there, the lookups and whatever burn work the operation asks for (allocations, copies) run directly, so the
/// operation costs one round trip instead of one per tensor. Ordering is unchanged: the thread runs what it is asked
/// in order, so everything queued before `f` has been handed to the driver when `f` runs, and everything queued
/// after runs after it. A panic in `f` comes back as an error (burn's thread catches it), which switches the kind
/// off as a CUDA error does.
fn on_device_thread<T: Send + 'static>(
    index: usize,
    f: impl FnOnce() -> Result<T, FastError> + Send,
) -> Result<T, FastError> {
    use cubecl::Runtime;
    let client = cubecl::cuda::CudaRuntime::client(&CudaDevice::new(index));
    client.exclusive(f).map_err(|e| FastError::cuda(format!("burn's device thread: {e:?}")))?
}

/// Sets the fast path's configuration of `device` (which starts from [`FastPathConfig::from_env`]). Kinds switched
/// off by a CUDA error are switched on again (their errors stay in the report). On a device already in use, a new
/// [`OrderingMode`] takes effect at once (everything pending on our stream is waited for first); if context events
/// are not available there, this fails and nothing changes ([`ordering_mode`] tells the mode in effect). On a device not used yet, the ordering is set up at
/// its first operation, falling back to host syncs (with a `log` warning) where context events are missing.
/// Compiled kernels and GEMM algorithms chosen before stay as they are (`kernel_dir`, `gemm_autotune`).
pub fn configure(device: &CudaDevice, config: FastPathConfig) -> Result<(), FastError> {
    let mut registry = registry();
    let state = registry.entry(device.index).or_insert_with(DeviceState::new);
    if let Some(gpu) = state.gpu.as_mut() {
        // A new ordering is switched to unless already in effect (a device that fell back to host syncs stays so
        // while the configured mode does not change).
        if config.ordering != state.config.ordering && config.ordering != gpu.ordering() {
            gpu.bind()?;
            guarded("switching the ordering mode", || gpu.set_ordering(config.ordering))?;
        }
    }
    state.config = config;
    for k in &mut state.kinds {
        k.switched_off = false;
    }
    Ok(())
}

/// The fast path's configuration of `device`.
pub fn config(device: &CudaDevice) -> FastPathConfig {
    with_state(device.index, |s| s.config.clone())
}

/// Zeroes the counters of `device` (calls, fallbacks, errors); the last error of each kind, and whether it is
/// switched off, stay.
pub fn reset_stats(device: &CudaDevice) {
    with_state(device.index, |s| {
        for k in &mut s.kinds {
            (k.calls, k.fallbacks, k.errors) = (0, 0, 0);
        }
    })
}

/// The fast path's statistics on device `index`, per kind of operation (see
/// [`QwenBackend::fast_path_report`](crate::ops::QwenBackend::fast_path_report)).
pub(crate) fn report(index: usize) -> FastPathReport {
    with_state(index, |s| FastPathReport {
        backend: "cuda".into(),
        kinds: Kind::ALL
            .iter()
            .map(|&kind| {
                let k = &s.kinds[kind as usize];
                FastKindStats {
                    kind: kind.name().into(),
                    calls: k.calls,
                    fallbacks: k.fallbacks,
                    errors: k.errors,
                    disabled: !s.enabled(kind),
                    last_error: k.last_error.clone(),
                }
            })
            .collect(),
    })
}

/// The ordering mechanism in use on `device` (initializing its CUDA state if needed): the configured one, or
/// [`OrderingMode::HostSync`] where context events are not available.
pub fn ordering_mode(device: &CudaDevice) -> Result<OrderingMode, FastError> {
    with_gpu(device.index, |g| Ok(g.ordering()))
}

/// Waits until everything submitted to our stream on `device` has finished (benchmarks call it together with
/// burn's `sync` before reading a clock).
pub fn synchronize(device: &CudaDevice) -> Result<(), FastError> {
    with_gpu(device.index, |g| g.synchronize())
}

/// Gives the memory burn's allocator holds on `device` but no tensor uses back to the driver: burn's cleanup of its
/// pool's free pages, the cuDNN workspace's free (held between the convolutions of an exact-allocation stage), a
/// device sync so that their stream-ordered frees complete, then the trim of CUDA's pool
/// ([`GpuState::trim_memory_pool`](super::gpu::GpuState::trim_memory_pool)), which otherwise keeps them.
pub fn release_unused_memory(device: &CudaDevice) -> Result<(), FastError> {
    use cubecl::Runtime;
    let client = cubecl::cuda::CudaRuntime::client(device);
    client.memory_cleanup();
    cubecl::future::block_on(client.sync()).map_err(|e| FastError::cuda(format!("burn sync: {e:?}")))?;
    with_gpu(device.index, |g| {
        let stream = g.stream();
        if let Some(dnn) = g.state().dnn.as_mut() {
            dnn.release_workspace(stream)?;
        }
        g.synchronize()?;
        g.state().trim_memory_pool()
    })
}

/// Switches burn's allocator for `device` on this thread's stream between exact-size allocations (cubecl's persistent
/// mode: each tensor an allocation of its own size, reused only for the same size, freed by an explicit cleanup such
/// as [`release_unused_memory`]) and its pooled pages (the default mode).
pub fn allocate_exactly(device: &CudaDevice, exact: bool) {
    use cubecl::{MemoryAllocationMode, Runtime};
    let client = cubecl::cuda::CudaRuntime::client(device);
    let mode = if exact { MemoryAllocationMode::Persistent } else { MemoryAllocationMode::Auto };
    // SAFETY: the mode is a setting of this thread's stream (the one its tensor operations use), queued in order
    // with them; "not thread safe" refers to other threads' work on the stream, which the pipeline does not share.
    // The "leak" it warns of is exact allocations that outlive their use: the caller frees them with an explicit
    // cleanup (`release_unused_memory`) after the stage.
    unsafe { client.allocation_mode(mode) };
    let recorded = with_gpu(device.index, |g| {
        g.state().exact_allocation = exact;
        Ok(())
    });
    if let Err(e) = recorded {
        log::debug!("qwen-image: allocation mode not recorded for cuDNN's workspace ({e})");
    }
}

#[cfg(test)]
mod tests {
    //! The bookkeeping needs no GPU: these devices are never initialized (each test has its own index).
    use super::*;

    fn device(index: usize) -> CudaDevice {
        let device = CudaDevice::new(index);
        // On the calling thread: burn's device thread would need the (absent) device.
        let config = FastPathConfig { device_thread: false, ..FastPathConfig::default() };
        configure(&device, config).expect("no CUDA state yet: nothing to switch");
        device
    }

    fn kind<'a>(report: &'a FastPathReport, name: &str) -> &'a FastKindStats {
        report.kinds.iter().find(|k| k.kind == name).expect("kind in the report")
    }

    #[test]
    fn a_cuda_error_switches_the_kind_off_until_configure() {
        let d = device(1001);
        assert_eq!(attempt(d.index, Kind::Gemm, || Ok(7)), Some(7));
        assert_eq!(attempt::<()>(d.index, Kind::Gemm, || Err(FastError::unsupported("odd shape"))), None);
        assert!(enabled(d.index, Kind::Gemm), "an unsupported input falls back silently");
        assert_eq!(attempt::<()>(d.index, Kind::Gemm, || Err(FastError::cuda("launch failed"))), None);
        assert!(!enabled(d.index, Kind::Gemm) && enabled(d.index, Kind::Glue));
        let mut ran = false;
        let off = attempt(d.index, Kind::Gemm, || {
            ran = true;
            Ok(())
        });
        assert_eq!(off, None);
        assert!(!ran, "a switched-off kind does not run");
        let r = report(d.index);
        let gemm = kind(&r, "gemm");
        assert_eq!((gemm.calls, gemm.fallbacks, gemm.errors, gemm.disabled), (1, 3, 1, true));
        assert_eq!(gemm.last_error.as_deref(), Some("launch failed"));
        assert_eq!(kind(&r, "glue"), &FastKindStats { kind: "glue".into(), ..Default::default() });
        // Other devices are not affected.
        assert!(enabled(device(1002).index, Kind::Gemm));

        configure(&d, config(&d)).expect("configure");
        assert!(enabled(d.index, Kind::Gemm), "configure switches it on again");
        let r = report(d.index);
        assert!(
            !kind(&r, "gemm").disabled && kind(&r, "gemm").last_error.is_some(),
            "the error stays reported"
        );
        reset_stats(&d);
        let r = report(d.index);
        let gemm = kind(&r, "gemm");
        assert_eq!((gemm.calls, gemm.fallbacks, gemm.errors), (0, 0, 0));
        assert_eq!(gemm.last_error.as_deref(), Some("launch failed"));
    }

    #[test]
    fn kinds_configured_off_fall_back_without_running() {
        let d = device(1003);
        let ops = FastOps { attention: true, ..FastOps::NONE };
        configure(&d, FastPathConfig { ops, ..config(&d) }).expect("configure");
        assert_eq!(config(&d).ops, ops);
        assert_eq!(attempt(d.index, Kind::Glue, || -> Result<(), FastError> { unreachable!() }), None);
        assert_eq!(attempt(d.index, Kind::Attention, || Ok(1)), Some(1));
        let r = report(d.index);
        assert_eq!(r.backend, "cuda");
        let names: Vec<&str> = r.kinds.iter().map(|k| k.kind.as_str()).collect();
        assert_eq!(names, ["gemm", "attention", "glue", "fp8", "conv"]);
        let glue = kind(&r, "glue");
        assert_eq!((glue.calls, glue.fallbacks, glue.errors, glue.disabled), (0, 1, 0, true));
        assert!(glue.last_error.is_none());
        assert!(!kind(&r, "attention").disabled);
    }
}
