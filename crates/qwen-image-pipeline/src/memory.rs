//! Host memory readings for reports and benchmarks (Linux: `/proc/self/status`; elsewhere nothing).
//!
//! How to use: [`HostMemory::read`] gives the current resident set (split into anonymous memory and mapped file
//! pages) and its peak; [`PeakSampler`] polls in a background thread to catch the peak of each part during an
//! operation (the kernel keeps only the total's peak); [`reset_peak`] restarts the kernel's peak (`VmHWM`).
//! Device memory depends on the backend and is read by the caller (e.g. `qwen_image::cuda::device_memory_used`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

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
