//! [`Metrics`]: the service's and the HTTP layer's counters, gauges and histograms, rendered in the Prometheus
//! text format ([`Metrics::render`], served at `GET /metrics`). Built on `prometheus-client` (the Prometheus
//! project's Rust client).

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram};
use prometheus_client::registry::Registry;
use qwen_image_pipeline::{EditReport, MemoryReading, Stage};

/// Label of a job outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok`, `cancelled`, `invalid`, `failed`, `queue_full`.
    pub outcome: &'static str,
}

/// Label of an edit stage.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    /// The stage (`encode_image`, `denoise`, …).
    pub stage: String,
}

/// Label of an HTTP response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The route (`/v1/images/edits`, …).
    pub route: &'static str,
    /// The status code.
    pub status: u16,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric of a server (names start with `qwen_edit_`).
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Jobs waiting in the queue.
    pub queue_depth: Gauge,
    /// The queue's capacity.
    pub queue_capacity: Gauge,
    /// Jobs running (0 or 1).
    pub jobs_running: Gauge,
    /// Jobs by outcome (`queue_full`: refused at submission).
    pub jobs: Family<OutcomeLabel, Counter>,
    /// Seconds from start to end of each edit that ran to completion.
    pub edit_seconds: Histogram,
    /// Seconds each started job waited in the queue.
    pub queue_wait_seconds: Histogram,
    /// Seconds per stage of each completed edit.
    pub stage_seconds: HistogramFamily<StageLabel>,
    /// Per-image encodings reused (VAE latents, vision embeddings).
    pub reuse_hits: Counter,
    /// Per-image encodings computed because the cache lacked them.
    pub reuse_misses: Counter,
    /// Bytes held by the per-image reuse cache.
    pub reuse_bytes: Gauge,
    /// Device memory in use after the last edit (GPU builds; absent on the CPU).
    pub device_memory_used_bytes: Gauge,
    /// Host resident set after the last edit.
    pub host_rss_bytes: Gauge,
    /// HTTP responses by route and status.
    pub http_responses: Family<StatusLabel, Counter>,
    /// Seconds from request to response, per route.
    pub http_seconds: HistogramFamily<StatusLabel>,
    /// 1 once the model is loaded.
    pub model_loaded: Gauge,
}

/// Buckets from 1 ms to ~65 s.
fn seconds_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("qwen_edit")),
            queue_depth: Gauge::default(),
            queue_capacity: Gauge::default(),
            jobs_running: Gauge::default(),
            jobs: Family::default(),
            edit_seconds: seconds_histogram(),
            queue_wait_seconds: seconds_histogram(),
            stage_seconds: Family::new_with_constructor(seconds_histogram),
            reuse_hits: Counter::default(),
            reuse_misses: Counter::default(),
            reuse_bytes: Gauge::default(),
            device_memory_used_bytes: Gauge::default(),
            host_rss_bytes: Gauge::default(),
            http_responses: Family::default(),
            http_seconds: Family::new_with_constructor(seconds_histogram),
            model_loaded: Gauge::default(),
        };
        {
            let mut r = m.registry.lock().expect("not poisoned");
            r.register("queue_depth", "Jobs waiting in the queue", m.queue_depth.clone());
            r.register("queue_capacity", "Capacity of the job queue", m.queue_capacity.clone());
            r.register("jobs_running", "Jobs running now", m.jobs_running.clone());
            r.register("jobs", "Jobs by outcome", m.jobs.clone());
            r.register("edit_seconds", "Seconds per completed edit", m.edit_seconds.clone());
            r.register(
                "queue_wait_seconds",
                "Seconds a job waited in the queue",
                m.queue_wait_seconds.clone(),
            );
            r.register("stage_seconds", "Seconds per stage of completed edits", m.stage_seconds.clone());
            r.register("reuse_hits", "Per-image encodings reused from the cache", m.reuse_hits.clone());
            r.register("reuse_misses", "Per-image encodings computed (cache misses)", m.reuse_misses.clone());
            r.register("reuse_bytes", "Bytes held by the per-image reuse cache", m.reuse_bytes.clone());
            r.register(
                "device_memory_used_bytes",
                "Device (GPU) memory in use after the last edit",
                m.device_memory_used_bytes.clone(),
            );
            r.register("host_rss_bytes", "Host resident set after the last edit", m.host_rss_bytes.clone());
            r.register("http_responses", "HTTP responses by route and status", m.http_responses.clone());
            r.register("http_request_seconds", "Seconds from request to response", m.http_seconds.clone());
            r.register("model_loaded", "1 once the model is loaded", m.model_loaded.clone());
        }
        m
    }
}

impl Metrics {
    /// Everything in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("not poisoned");
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counts a job's outcome.
    pub fn job(&self, outcome: &'static str) {
        self.jobs.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Records a completed edit: its time, its stages, its reuse counts and the memory it reports.
    pub fn edit_done(&self, report: &EditReport) {
        self.edit_seconds.observe(report.total_seconds);
        for s in &report.stages {
            self.stage_seconds.get_or_create(&StageLabel { stage: stage_name(s.stage) }).observe(s.seconds);
        }
        self.reuse_hits.inc_by(report.image_reuse.hits as u64);
        self.reuse_misses.inc_by(report.image_reuse.misses as u64);
        if let Some(memory) = &report.memory {
            self.memory(memory);
        }
    }

    fn memory(&self, m: &MemoryReading) {
        if let Some(v) = m.device_used_bytes {
            self.device_memory_used_bytes.set(v as i64);
        }
        if let Some(v) = m.host_rss_bytes {
            self.host_rss_bytes.set(v as i64);
        }
    }

    /// Records an HTTP response.
    pub fn http(&self, route: &'static str, status: u16, seconds: f64) {
        let label = StatusLabel { route, status };
        self.http_responses.get_or_create(&label).inc();
        self.http_seconds.get_or_create(&label).observe(seconds);
    }
}

/// A stage's name as in the JSON report (`encode_image`).
pub fn stage_name(stage: Stage) -> String {
    serde_json::to_value(stage).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}
