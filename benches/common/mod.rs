//! Helpers shared by the CUDA benchmarks (`dit_bench`, `pipeline_bench`).

use burn::tensor::backend::Backend;
use qwen_image::{
    cuda::{self, CudaBackend, CudaDevice},
    dit::ModulationMode,
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

/// Where the DiT's modulation weights live (`--modulation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModulationArg {
    /// On the host; the rows of the timesteps used are built once into a table (the default).
    Table,
    /// On the GPU, rows computed in every forward pass (the layout before the table).
    Resident,
}

impl ModulationArg {
    /// The load option.
    pub fn mode(self) -> ModulationMode {
        match self {
            ModulationArg::Table => ModulationMode::Table,
            ModulationArg::Resident => ModulationMode::Resident,
        }
    }
}

/// Prints and returns the GPU memory in use: the driver's (`cuMemGetInfo`, whole GPU) and burn's pool (in use /
/// reserved; the pool keeps what it reserved, so "reserved" is the peak so far as seen by burn).
pub fn gpu_memory(what: &str) -> Value {
    let used = cuda::device_memory_used(0);
    let pool = cuda::pool_usage(&dev());
    println!(
        "GPU memory {what}: {:.2} GiB used; burn pool {:.2} GiB in use / {:.2} GiB reserved",
        gib(used.unwrap_or(0)),
        gib(pool.map_or(0, |p| p.0)),
        gib(pool.map_or(0, |p| p.1))
    );
    json!({"device_used_bytes": used, "pool_in_use_bytes": pool.map(|p| p.0), "pool_reserved_bytes": pool.map(|p| p.1)})
}
