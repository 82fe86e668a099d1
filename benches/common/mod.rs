//! Helpers shared by the CUDA benchmarks (`dit_bench`, `pipeline_bench`).

use burn::tensor::backend::Backend;
use qwen_image::cuda::{self, CudaBackend, CudaDevice};

/// The backend every benchmark measures.
pub type G = CudaBackend;

/// The benchmarked GPU.
pub fn dev() -> CudaDevice {
    CudaDevice::new(0)
}

/// Waits for burn's queue and the fast path's stream.
pub fn sync() {
    G::sync(&dev()).expect("burn sync");
    cuda::synchronize(0).expect("fast-path stream sync");
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
