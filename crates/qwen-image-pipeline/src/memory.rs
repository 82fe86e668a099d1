//! Memory readings for reports and benchmarks: the host's (Linux: `/proc/self/status`; elsewhere nothing) and, where
//! the caller can read it, the device's.
//!
//! How to use: [`HostMemory::read`] gives the current resident set (split into anonymous memory and mapped file
//! pages) and its peak; [`PeakSampler`] polls in a background thread to catch the peak of each part during an
//! operation (the kernel keeps only the total's peak); [`reset_peak`] restarts the kernel's peak (`VmHWM`).
//! [`MemoryReading`] is what a report holds (host and device, `None` where unknown), and a [`MemoryProbe`] takes
//! one: [`MemoryProbe::host`] by default; device memory depends on the backend, so a caller that knows it builds a
//! probe that adds it (e.g. from `qwen_image::cuda::device_memory_used`) and gives it to the pipeline
//! ([`QwenImageEditPipeline::set_memory_probe`](crate::QwenImageEditPipeline::set_memory_probe)).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Resident memory of this process, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostMemory {
    /// Resident set (`VmRSS`).
    pub rss: u64,
    /// Peak resident set since start or the last [`reset_peak`] (`VmHWM`).
    pub peak_rss: u64,
    /// Anonymous resident memory (`RssAnon`: heap, buffers).
    pub anon: u64,
    /// Resident pages of mapped files (`RssFile`: e.g. memory-mapped checkpoints).
    pub file: u64,
}

impl HostMemory {
    /// The current values, or `None` where `/proc/self/status` is unavailable.
    pub fn read() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        Some(Self::parse(&text))
    }

    /// Parses the text of `/proc/<pid>/status` (missing fields are 0).
    pub fn parse(status: &str) -> Self {
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        HostMemory {
            rss: field("VmRSS"),
            peak_rss: field("VmHWM"),
            anon: field("RssAnon"),
            file: field("RssFile"),
        }
    }
}

/// Memory in bytes at one moment; `None` where it cannot be read (no `/proc`, no GPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReading {
    /// Host resident set (`VmRSS`).
    pub host_rss_bytes: Option<u64>,
    /// Host peak resident set since the start (`VmHWM`).
    pub host_peak_rss_bytes: Option<u64>,
    /// Memory in use on the whole GPU (driver's total − free).
    pub device_used_bytes: Option<u64>,
    /// Bytes of burn's device-memory pool in use by live tensors.
    pub pool_in_use_bytes: Option<u64>,
    /// Bytes burn's pool holds from the driver (in use or cached for reuse).
    pub pool_reserved_bytes: Option<u64>,
    /// The GPU's total memory, as the driver reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_total_bytes: Option<u64>,
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

impl MemoryReading {
    /// The host's readings only.
    pub fn host() -> Self {
        let m = HostMemory::read();
        MemoryReading {
            host_rss_bytes: m.map(|m| m.rss),
            host_peak_rss_bytes: m.map(|m| m.peak_rss),
            ..Default::default()
        }
    }

    /// The GPU's free memory (total − used), where both are known.
    pub fn device_free_bytes(&self) -> Option<u64> {
        Some(self.device_total_bytes?.saturating_sub(self.device_used_bytes?))
    }

    /// One line: `host RSS 1.20 GiB; GPU used 60.1 GiB, pool 58.0 GiB in use / 70.2 GiB reserved`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = self.host_rss_bytes {
            parts.push(format!("host RSS {}", gib(r)));
        }
        if let Some(d) = self.device_used_bytes {
            parts.push(format!("GPU used {}", gib(d)));
        }
        if let (Some(a), Some(b)) = (self.pool_in_use_bytes, self.pool_reserved_bytes) {
            parts.push(format!("pool {} in use / {} reserved", gib(a), gib(b)));
        }
        if parts.is_empty() {
            "unavailable".into()
        } else {
            parts.join("; ")
        }
    }

    /// The change of every reading from `self` to `later`.
    pub fn growth_to(&self, later: &MemoryReading) -> MemoryGrowth {
        let d = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| b as i64 - a as i64);
        MemoryGrowth {
            host_rss_bytes: d(self.host_rss_bytes, later.host_rss_bytes),
            device_used_bytes: d(self.device_used_bytes, later.device_used_bytes),
            pool_in_use_bytes: d(self.pool_in_use_bytes, later.pool_in_use_bytes),
            pool_reserved_bytes: d(self.pool_reserved_bytes, later.pool_reserved_bytes),
        }
    }
}

/// Change of each [`MemoryReading`] between two moments, in bytes; `None` where either reading is missing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryGrowth {
    /// Host resident set.
    pub host_rss_bytes: Option<i64>,
    /// Memory in use on the whole GPU.
    pub device_used_bytes: Option<i64>,
    /// burn's pool, in use.
    pub pool_in_use_bytes: Option<i64>,
    /// burn's pool, reserved.
    pub pool_reserved_bytes: Option<i64>,
}

/// Takes a [`MemoryReading`] (what it can read depends on who built it). Cheap to clone.
#[derive(Clone)]
pub struct MemoryProbe(Arc<dyn Fn() -> MemoryReading + Send + Sync>);

impl MemoryProbe {
    /// A probe calling `read`.
    pub fn new(read: impl Fn() -> MemoryReading + Send + Sync + 'static) -> Self {
        MemoryProbe(Arc::new(read))
    }

    /// The host's memory only ([`MemoryReading::host`]).
    pub fn host() -> Self {
        MemoryProbe::new(MemoryReading::host)
    }

    /// A reading now.
    pub fn read(&self) -> MemoryReading {
        (self.0)()
    }
}

impl Default for MemoryProbe {
    fn default() -> Self {
        MemoryProbe::host()
    }
}

impl std::fmt::Debug for MemoryProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryProbe")
    }
}

/// Restarts the kernel's peak resident set (`VmHWM`) of this process; false where it is not supported.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Polls [`HostMemory`] every few milliseconds in a thread and keeps the largest value of each field.
#[derive(Debug)]
pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<HostMemory>>,
}

impl PeakSampler {
    /// Starts sampling every `period`.
    pub fn start(period: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut peak = HostMemory::default();
            loop {
                if let Some(m) = HostMemory::read() {
                    peak.rss = peak.rss.max(m.rss);
                    peak.peak_rss = peak.peak_rss.max(m.peak_rss);
                    peak.anon = peak.anon.max(m.anon);
                    peak.file = peak.file.max(m.file);
                }
                if flag.load(Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(period);
            }
        });
        PeakSampler { stop, handle: Some(handle) }
    }

    /// Stops sampling and returns the largest value of each field (zeros where nothing could be read).
    pub fn finish(mut self) -> HostMemory {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_status() {
        let m = HostMemory::parse(
            "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t1024 kB\nRssAnon:\t 512 kB\nRssFile: 256 kB\n",
        );
        assert_eq!(m, HostMemory { rss: 1 << 20, peak_rss: 2 << 20, anon: 512 << 10, file: 256 << 10 });
        assert_eq!(HostMemory::parse("nothing"), HostMemory::default());
    }

    #[test]
    fn summary_and_growth() {
        let a = MemoryReading {
            host_rss_bytes: Some(1 << 30),
            device_used_bytes: Some(3 << 30),
            ..Default::default()
        };
        let b = MemoryReading { host_rss_bytes: Some(1 << 29), ..a };
        assert_eq!(a.summary(), "host RSS 1.00 GiB; GPU used 3.00 GiB");
        assert_eq!(MemoryReading::default().summary(), "unavailable");
        let g = a.growth_to(&b);
        assert_eq!(
            (g.host_rss_bytes, g.device_used_bytes, g.pool_in_use_bytes),
            (Some(-(1 << 29)), Some(0), None)
        );
        assert_eq!(MemoryProbe::new(move || b).read(), b);
    }

    #[test]
    fn the_sampler_sees_a_large_allocation() {
        if HostMemory::read().is_none() {
            return;
        }
        let sampler = PeakSampler::start(Duration::from_millis(1));
        let mut v = vec![1u8; 64 << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = i as u8;
        }
        std::thread::sleep(Duration::from_millis(30));
        let peak = sampler.finish();
        drop(v);
        assert!(peak.anon >= 64 << 20 && peak.rss >= peak.anon, "{peak:?}");
    }
}
