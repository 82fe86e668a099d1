//! Memory readings after each edit (host resident set; device memory where the backend reports it), for the
//! report and the `--repeat` growth check.

use qwen_image_pipeline::memory::HostMemory;
use serde::Serialize;
use serde_json::{json, Value};

/// Memory in bytes at one moment; `None` where it cannot be read (no `/proc`, no GPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
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
}

/// Takes a [`MemoryReading`] (the backend decides what it can read).
pub type MemoryProbe<'a> = &'a dyn Fn() -> MemoryReading;

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
}

/// Change of every reading from `first` to `last` in bytes (JSON; `null` where either is missing).
pub fn growth(first: &MemoryReading, last: &MemoryReading) -> Value {
    let d = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| b as i64 - a as i64);
    json!({
        "host_rss_bytes": d(first.host_rss_bytes, last.host_rss_bytes),
        "device_used_bytes": d(first.device_used_bytes, last.device_used_bytes),
        "pool_in_use_bytes": d(first.pool_in_use_bytes, last.pool_in_use_bytes),
        "pool_reserved_bytes": d(first.pool_reserved_bytes, last.pool_reserved_bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_and_growth() {
        let a = MemoryReading {
            host_rss_bytes: Some(1 << 30),
            device_used_bytes: Some(3 << 30),
            ..Default::default()
        };
        let b = MemoryReading {
            host_rss_bytes: Some(1 << 29),
            device_used_bytes: Some(3 << 30),
            ..Default::default()
        };
        assert_eq!(a.summary(), "host RSS 1.00 GiB; GPU used 3.00 GiB");
        assert_eq!(MemoryReading::default().summary(), "unavailable");
        let g = growth(&a, &b);
        assert_eq!(g["host_rss_bytes"], -(1i64 << 29));
        assert_eq!(g["device_used_bytes"], 0);
        assert!(g["pool_in_use_bytes"].is_null());
    }
}
