//! Helpers shared by the CUDA benchmarks (`dit_bench`, `pipeline_bench`).

use burn::tensor::backend::Backend;
use qwen_image::{
    cuda::{self, CudaBackend, CudaDevice},
    ops::QwenBackend,
};
use serde_json::{json, Value};

/// The backend every benchmark measures.
pub type G = CudaBackend;

/// The benchmarked GPU.
pub fn dev() -> CudaDevice {
    CudaDevice::new(0)
}

/// Waits for burn's queue and the fast path's stream.
pub fn sync() {
    G::sync(&dev()).expect("burn sync");
    cuda::synchronize(&dev()).expect("fast-path stream sync");
}

/// The fast path's report of the benchmarked GPU (calls, fallbacks, errors per kind) as JSON.
pub fn fast_path_json() -> Value {
    json!(G::fast_path_report(&dev()))
}

/// Shows the library's `log` messages on stderr: the fast path's warnings (a kind of operation switched off by a
/// CUDA error) and its `info` messages (`QWEN_GEMM_AUTOTUNE=verbose` timings); other crates' from `warn` up.
pub fn log_to_stderr() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::Level::Warn
                || (m.level() <= log::Level::Info && m.target().starts_with("qwen_image"))
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                eprintln!("[{} {}] {}", r.level(), r.target(), r.args());
            }
        }
        fn flush(&self) {}
    }
    if log::set_logger(&Stderr).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// The median of `v` (upper median for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Bytes in GiB.
pub fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}
