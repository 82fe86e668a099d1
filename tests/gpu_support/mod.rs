//! Helpers shared by the GPU test files (`gpu_fast_ops.rs`: the fast operations; `gpu_fp8.rs`: the FP8 ones;
//! `gpu_models.rs`: whole networks and weight loading): the device, the per-test setup, the fast path's counters and portable references.
//!
//! Each test file uses a part of them.
#![allow(dead_code)]

use std::sync::Mutex;

use burn::tensor::{DType, Distribution, Tensor};
use qwen_image::{
    cuda::{self, CudaBackend, CudaDevice, FastOps, FastPathConfig, FlashKernel},
    ops::{FastKindStats, QwenBackend},
    tensor_io::{rel_l2, to_f32_vec},
};

/// The backend under test.
pub type G = CudaBackend;

/// Every test runs on GPU 0 and changes its fast-path configuration (flash kernel, fast path off for references)
/// and reads and resets its counters, which are per device: run one test at a time.
static LOCK: Mutex<()> = Mutex::new(());

/// Calls the references of the current test made with the fast path off, per kind: booked as fallbacks, they are
/// not the fast path's (see [`portable_run`] and [`assert_fast`]).
static REFERENCE_FALLBACKS: Mutex<[u64; 5]> = Mutex::new([0; 5]);

/// Kinds of operation in the order of the fast-path report.
pub const GEMM: usize = 0;
pub const ATTENTION: usize = 1;
pub const GLUE: usize = 2;
pub const FP8: usize = 3;
pub const CONV: usize = 4;

/// GPU 0, where every test runs.
pub fn dev() -> CudaDevice {
    CudaDevice::new(0)
}

/// Every test runs with everything on and outputs poisoned with NaN before each kernel.
pub fn setup() -> std::sync::MutexGuard<'static, ()> {
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    cuda::configure_runtime_caches(None).expect("kernel cache folder");
    let (ops, flash_kernel) = (FastOps::ALL, FlashKernel::Auto);
    let config = FastPathConfig { ops, flash_kernel, poison_outputs: true, ..cuda::config(&dev()) };
    cuda::configure(&dev(), config).expect("fast-path configuration");
    reset_stats();
    guard
}

/// Zeroes the device's counters (and this test's reference fallbacks).
pub fn reset_stats() {
    cuda::reset_stats(&dev());
    *REFERENCE_FALLBACKS.lock().unwrap_or_else(|e| e.into_inner()) = [0; 5];
}

/// The fast path's counters of GPU 0, per kind.
pub fn stats() -> Vec<FastKindStats> {
    G::fast_path_report(&dev()).expect("the CUDA backend reports its fast path").kinds
}

/// Chooses the flash kernel of GPU 0.
pub fn set_flash_kernel(flash_kernel: FlashKernel) {
    cuda::configure(&dev(), FastPathConfig { flash_kernel, ..cuda::config(&dev()) }).expect("configuration");
}

/// A bf16 tensor of `shape` on GPU 0, normally distributed with standard deviation `std`.
pub fn randn<const D: usize>(shape: [usize; D], std: f64) -> Tensor<G, D> {
    Tensor::<G, D>::random(shape, Distribution::Normal(0.0, std), &dev()).cast(DType::BF16)
}

/// Runs `f` on the portable path (burn's own kernels), for a reference.
pub fn portable_run<T>(f: impl FnOnce() -> T) -> T {
    let before = stats();
    let config = cuda::config(&dev());
    cuda::configure(&dev(), FastPathConfig { ops: FastOps::NONE, ..config.clone() }).expect("configuration");
    let out = f();
    cuda::configure(&dev(), config).expect("configuration");
    // Calls made while a kind is off count as its fallbacks: remember them as the reference's.
    let mut reference = REFERENCE_FALLBACKS.lock().unwrap_or_else(|e| e.into_inner());
    for ((b, a), counter) in before.iter().zip(stats()).zip(reference.iter_mut()) {
        *counter += a.fallbacks - b.fallbacks;
    }
    out
}

/// Asserts that operations of `kind` ran on the fast path since [`setup`] (or the last [`reset_stats`]) and none
/// of them fell back or failed.
pub fn assert_fast(kind: usize, what: &str) {
    let s = &stats()[kind];
    let reference = REFERENCE_FALLBACKS.lock().unwrap_or_else(|e| e.into_inner())[kind];
    assert!(s.calls > 0, "{what}: the fast path did not run ({s:?})");
    assert_eq!(s.errors, 0, "{what}: CUDA errors ({s:?})");
    assert_eq!(s.fallbacks, reference, "{what}: fell back ({s:?}; {reference} were the references')");
}

/// Relative L2 error of `got` against `want` on the host; fails on NaN/∞ in `got`.
pub fn check<const D: usize>(what: &str, got: Tensor<G, D>, want: Tensor<G, D>, tol: f64) -> f64 {
    match try_check(what, got, want, tol) {
        Ok(err) => err,
        Err(msg) => panic!("{msg}"),
    }
}

/// [`check`] that reports a failure instead of panicking (so that every kernel of a case gets checked).
pub fn try_check<const D: usize>(
    what: &str,
    got: Tensor<G, D>,
    want: Tensor<G, D>,
    tol: f64,
) -> Result<f64, String> {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let (g, w) = (to_f32_vec(got), to_f32_vec(want));
    let bad = g.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        let msg = format!("{what}: {bad} non-finite outputs (unwritten elements stay NaN-poisoned)");
        println!("{msg}");
        return Err(msg);
    }
    let err = rel_l2(&g, &w);
    println!("{what:60} rel L2 {err:.2e}");
    if err > tol {
        return Err(format!("{what}: relative L2 error {err:.3e} > {tol:.1e}"));
    }
    Ok(err)
}
