//! [`EditService`]: one loaded pipeline on its own worker thread, fed by a bounded job queue.
//!
//! The worker loads the pipeline (so the device context lives on the thread that uses it), then runs the queued
//! jobs one after the other with a [`ReuseCache`] kept across jobs. [`EditService::submit`] checks a job (the
//! request and its schedule, no weights needed) and queues it, or refuses it at once when the queue is full
//! ([`SubmitError::QueueFull`] with a retry hint): the queue never grows beyond its capacity.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qwen_image::ops::QwenBackend;
use qwen_image_pipeline::{
    check_schedule, PipelineError, Progress, QwenImageEditPipeline, ReuseCache, ReuseStats, Stage,
    StepReport, Variant,
};
use serde::Serialize;
use tokio::sync::mpsc as events;

use crate::job::{CancelToken, EditJob, JobError, JobEvent, JobHandle, JobOutput, StepProgress};
use crate::metrics::Metrics;

/// How a service runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    /// Jobs that may wait in the queue (besides the one running); at least 1.
    pub queue_capacity: usize,
    /// Byte budget of the per-image reuse cache (0: no reuse).
    pub reuse_budget_bytes: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig { queue_capacity: 32, reuse_budget_bytes: 1 << 30 }
    }
}

/// What the loaded model is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// Edit v1 or Edit-Plus.
    pub variant: Variant,
    /// The DiT's depth (schedules are checked against it).
    pub num_layers: usize,
}

/// Why [`EditService::submit`] refused a job.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full; try again after `retry_after`.
    #[error("the job queue is full ({capacity} jobs waiting); retry after {} s", retry_after.as_secs())]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
        /// About when a slot frees up (the mean edit time, at least 1 s).
        retry_after: Duration,
    },
    /// The model is still loading (or failed to load).
    #[error("the model is not loaded{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    NotReady(Option<String>),
    /// The service no longer accepts jobs.
    #[error("the service is shutting down")]
    ShuttingDown,
    /// The request or its schedule is invalid.
    #[error("{0}")]
    Invalid(String),
}

/// A snapshot of the service's state (`/ready`, `/health`).
#[derive(Clone, Debug, Serialize)]
pub struct ServiceStatus {
    /// The loaded model, once loaded.
    pub model: Option<ModelInfo>,
    /// The load error, if loading failed.
    pub load_error: Option<String>,
    /// Whether new jobs are accepted (false once shutting down).
    pub accepting: bool,
    /// Jobs waiting.
    pub queue_depth: usize,
    /// The queue's capacity.
    pub queue_capacity: usize,
    /// Jobs running (0 or 1).
    pub running: usize,
    /// The per-image reuse cache.
    pub reuse: ReuseStats,
}

impl ServiceStatus {
    /// Loaded, accepting, and room in the queue.
    pub fn ready(&self) -> bool {
        self.model.is_some() && self.accepting && self.queue_depth < self.queue_capacity
    }
}

enum LoadState {
    Loading,
    Loaded(ModelInfo),
    Failed(String),
}

/// A job in the queue.
struct Queued {
    id: u64,
    job: EditJob,
    events: events::UnboundedSender<JobEvent>,
    cancel: CancelToken,
    enqueued: Instant,
}

/// State shared by the service's handles and its worker.
struct Shared {
    metrics: Arc<Metrics>,
    capacity: usize,
    depth: AtomicUsize,
    running: AtomicUsize,
    next_id: AtomicU64,
    accepting: AtomicBool,
    /// Cancels every queued and running job (a shutdown's deadline passed).
    abort: AtomicBool,
    load: Mutex<LoadState>,
    loaded: Condvar,
    /// Mean edit seconds (exponential average) and the last decode's seconds, for retry hints and ETAs.
    timing: Mutex<(f64, f64)>,
    reuse: Mutex<ReuseStats>,
}

/// One loaded pipeline serving edits from a bounded queue. Usable from any thread (wrap it in an `Arc` to share);
/// without HTTP: `submit` a job and read its [`JobHandle`].
pub struct EditService {
    shared: Arc<Shared>,
    sender: Mutex<Option<SyncSender<Queued>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for EditService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EditService").field("status", &self.status()).finish()
    }
}

impl EditService {
    /// Starts the worker thread, which runs `load` (the pipeline is made and used on that thread) and then the
    /// queued jobs. Returns at once; [`Self::wait_loaded`] waits for the model.
    pub fn start<B, F>(config: ServiceConfig, load: F) -> Self
    where
        B: QwenBackend,
        F: FnOnce() -> qwen_image_pipeline::Result<QwenImageEditPipeline<B>> + Send + 'static,
    {
        let capacity = config.queue_capacity.max(1);
        let metrics = Arc::new(Metrics::default());
        metrics.queue_capacity.set(capacity as i64);
        let shared = Arc::new(Shared {
            metrics,
            capacity,
            depth: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            accepting: AtomicBool::new(true),
            abort: AtomicBool::new(false),
            load: Mutex::new(LoadState::Loading),
            loaded: Condvar::new(),
            timing: Mutex::new((1.0, 0.0)),
            reuse: Mutex::new(ReuseStats {
                budget_bytes: config.reuse_budget_bytes,
                ..ReuseStats::default()
            }),
        });
        let (sender, receiver) = mpsc::sync_channel(capacity);
        let worker_shared = shared.clone();
        let budget = config.reuse_budget_bytes;
        let worker = std::thread::Builder::new()
            .name("qwen-edit-worker".into())
            .spawn(move || run_worker(load, receiver, worker_shared, budget))
            .expect("a thread can be spawned");
        EditService { shared, sender: Mutex::new(Some(sender)), worker: Mutex::new(Some(worker)) }
    }

    /// Blocks until the model is loaded; its description, or the load error.
    pub fn wait_loaded(&self) -> Result<ModelInfo, String> {
        let mut state = self.shared.load.lock().expect("not poisoned");
        loop {
            match &*state {
                LoadState::Loading => state = self.shared.loaded.wait(state).expect("not poisoned"),
                LoadState::Loaded(info) => return Ok(*info),
                LoadState::Failed(e) => return Err(e.clone()),
            }
        }
    }

    /// The metrics (shared with the HTTP layer).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// The service's state now.
    pub fn status(&self) -> ServiceStatus {
        let s = &self.shared;
        let (model, load_error) = match &*s.load.lock().expect("not poisoned") {
            LoadState::Loading => (None, None),
            LoadState::Loaded(info) => (Some(*info), None),
            LoadState::Failed(e) => (None, Some(e.clone())),
        };
        ServiceStatus {
            model,
            load_error,
            accepting: s.accepting.load(Ordering::SeqCst),
            queue_depth: s.depth.load(Ordering::SeqCst),
            queue_capacity: s.capacity,
            running: s.running.load(Ordering::SeqCst),
            reuse: *s.reuse.lock().expect("not poisoned"),
        }
    }

    /// Checks `job` against the loaded model (request and schedule) and queues it.
    pub fn submit(&self, job: EditJob) -> Result<JobHandle, SubmitError> {
        let s = &self.shared;
        if !s.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let status = self.status();
        let Some(info) = status.model else { return Err(SubmitError::NotReady(status.load_error)) };
        let invalid = |e: PipelineError| SubmitError::Invalid(e.to_string());
        job.request.validate(info.variant).map_err(invalid)?;
        let req = &job.request;
        check_schedule(&job.schedule, req.num_steps, info.num_layers, req.images.len()).map_err(invalid)?;
        let sender = self.sender.lock().expect("not poisoned");
        let Some(sender) = sender.as_ref() else { return Err(SubmitError::ShuttingDown) };
        let id = s.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = events::unbounded_channel();
        let cancel = CancelToken::default();
        s.depth.fetch_add(1, Ordering::SeqCst);
        let queued = Queued { id, job, events: tx, cancel: cancel.clone(), enqueued: Instant::now() };
        match sender.try_send(queued) {
            Ok(()) => {
                s.metrics.queue_depth.set(s.depth.load(Ordering::SeqCst) as i64);
                tracing::debug!(job = id, "queued");
                Ok(JobHandle::new(id, rx, cancel))
            }
            Err(e) => {
                s.depth.fetch_sub(1, Ordering::SeqCst);
                match e {
                    TrySendError::Full(_) => {
                        s.metrics.job("queue_full");
                        let mean = s.timing.lock().expect("not poisoned").0;
                        let retry_after = Duration::from_secs(mean.ceil().max(1.0) as u64);
                        Err(SubmitError::QueueFull { capacity: s.capacity, retry_after })
                    }
                    TrySendError::Disconnected(_) => Err(SubmitError::ShuttingDown),
                }
            }
        }
    }

    /// Stops accepting jobs; the queued and running ones go on.
    pub fn close(&self) {
        self.shared.accepting.store(false, Ordering::SeqCst);
    }

    /// Cancels every queued and running job (they end with [`JobError::Cancelled`] `{ shutdown: true }`).
    pub fn abort(&self) {
        self.shared.abort.store(true, Ordering::SeqCst);
    }

    /// Whether no job is queued or running.
    pub fn is_idle(&self) -> bool {
        self.shared.depth.load(Ordering::SeqCst) == 0 && self.shared.running.load(Ordering::SeqCst) == 0
    }

    /// Graceful shutdown: stops accepting, lets the queued and running jobs finish for up to `grace`, cancels
    /// what is left, and joins the worker. Blocking.
    pub fn shutdown(&self, grace: Duration) {
        self.close();
        let deadline = Instant::now() + grace;
        while !self.is_idle() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !self.is_idle() {
            tracing::warn!(
                queued = self.shared.depth.load(Ordering::SeqCst),
                "grace period over: cancelling jobs"
            );
        }
        self.abort();
        drop(self.sender.lock().expect("not poisoned").take());
        if let Some(worker) = self.worker.lock().expect("not poisoned").take() {
            let _ = worker.join();
        }
    }
}

impl Drop for EditService {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

/// The worker thread: load, then run jobs until the queue's sender is dropped.
fn run_worker<B, F>(load: F, receiver: Receiver<Queued>, shared: Arc<Shared>, budget: usize)
where
    B: QwenBackend,
    F: FnOnce() -> qwen_image_pipeline::Result<QwenImageEditPipeline<B>>,
{
    let started = Instant::now();
    let loaded = std::panic::catch_unwind(AssertUnwindSafe(load))
        .unwrap_or_else(|_| Err(PipelineError::Device("loading panicked".into())));
    let mut pipe = match loaded {
        Ok(pipe) => pipe,
        Err(e) => {
            tracing::error!(error = %e, "the model failed to load");
            set_load(&shared, LoadState::Failed(e.to_string()));
            for q in receiver {
                let _ = q.events.send(JobEvent::Finished(Err(JobError::Failed(e.to_string()))));
            }
            return;
        }
    };
    let info = ModelInfo { variant: pipe.variant(), num_layers: pipe.transformer().num_layers() };
    tracing::info!(variant = ?info.variant, seconds = started.elapsed().as_secs_f64(), "model loaded");
    shared.metrics.model_loaded.set(1);
    set_load(&shared, LoadState::Loaded(info));
    let mut reuse = ReuseCache::<B>::new(budget);
    for q in receiver {
        shared.depth.fetch_sub(1, Ordering::SeqCst);
        shared.metrics.queue_depth.set(shared.depth.load(Ordering::SeqCst) as i64);
        shared.running.store(1, Ordering::SeqCst);
        shared.metrics.jobs_running.set(1);
        run_job(&mut pipe, &mut reuse, q, &shared);
        *shared.reuse.lock().expect("not poisoned") = reuse.stats();
        shared.metrics.reuse_bytes.set(reuse.stats().bytes as i64);
        shared.running.store(0, Ordering::SeqCst);
        shared.metrics.jobs_running.set(0);
    }
}

fn set_load(shared: &Shared, state: LoadState) {
    *shared.load.lock().expect("not poisoned") = state;
    shared.loaded.notify_all();
}

/// Runs one job and sends its events.
fn run_job<B: QwenBackend>(
    pipe: &mut QwenImageEditPipeline<B>,
    reuse: &mut ReuseCache<B>,
    q: Queued,
    shared: &Shared,
) {
    let aborted = || shared.abort.load(Ordering::SeqCst);
    if q.cancel.is_cancelled() || aborted() {
        shared.metrics.job("cancelled");
        tracing::info!(job = q.id, "cancelled before it started");
        let _ = q.events.send(JobEvent::Finished(Err(JobError::Cancelled { shutdown: aborted() })));
        return;
    }
    let queued = q.enqueued.elapsed();
    shared.metrics.queue_wait_seconds.observe(queued.as_secs_f64());
    let _ = q.events.send(JobEvent::Started { queued });
    let decode_estimate = shared.timing.lock().expect("not poisoned").1;
    let mut progress = JobProgress {
        events: &q.events,
        cancel: &q.cancel,
        abort: &shared.abort,
        denoise: None,
        decode_estimate,
        decode_seconds: None,
    };
    let request = &q.job.request;
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        pipe.edit_with(request, &q.job.schedule, &mut progress, reuse)
    }))
    .unwrap_or_else(|_| {
        pipe.clear_cache();
        reuse.clear();
        Err(PipelineError::Device("the edit panicked".into()))
    });
    let decode_seconds = progress.decode_seconds;
    let (outcome, result) = match result {
        Ok(edit) => {
            shared.metrics.edit_done(&edit.report);
            let mut timing = shared.timing.lock().expect("not poisoned");
            timing.0 = 0.8 * timing.0 + 0.2 * edit.report.total_seconds;
            timing.1 = decode_seconds.unwrap_or(timing.1);
            ("ok", Ok(Box::new(JobOutput { edit, queued_seconds: queued.as_secs_f64() })))
        }
        Err(PipelineError::Cancelled) => ("cancelled", Err(JobError::Cancelled { shutdown: aborted() })),
        Err(e @ (PipelineError::InvalidInput(_) | PipelineError::Prune(_))) => {
            ("invalid", Err(JobError::Invalid(e.to_string())))
        }
        Err(e) => ("failed", Err(JobError::Failed(e.to_string()))),
    };
    shared.metrics.job(outcome);
    match &result {
        Ok(out) => tracing::info!(
            job = q.id,
            outcome,
            seconds = out.edit.report.total_seconds,
            queued_seconds = out.queued_seconds,
            reuse_hits = out.edit.report.image_reuse.hits,
            "edit finished"
        ),
        Err(e) => tracing::info!(job = q.id, outcome, error = %e, "edit ended"),
    }
    let _ = q.events.send(JobEvent::Finished(result));
}

/// The pipeline's [`Progress`] of one job: forwards stages and steps as [`JobEvent`]s with an ETA, and asks the
/// pipeline to stop when the job is cancelled or the service aborts.
struct JobProgress<'a> {
    events: &'a events::UnboundedSender<JobEvent>,
    cancel: &'a CancelToken,
    abort: &'a AtomicBool,
    /// Start and step count of the denoising loop.
    denoise: Option<(Instant, usize)>,
    decode_estimate: f64,
    decode_seconds: Option<f64>,
}

impl Progress for JobProgress<'_> {
    fn stage_started(&mut self, stage: Stage) {
        let _ = self.events.send(JobEvent::Stage(stage));
    }

    fn stage_finished(&mut self, stage: Stage, time: Duration) {
        if stage == Stage::Decode {
            self.decode_seconds = Some(time.as_secs_f64());
        }
    }

    fn denoise_started(&mut self, num_steps: usize) {
        self.denoise = Some((Instant::now(), num_steps));
    }

    fn step_finished(&mut self, report: &StepReport) {
        let Some((start, num_steps)) = self.denoise else { return };
        let step = report.step + 1;
        let per_step = start.elapsed().as_secs_f64() / step as f64;
        let eta_seconds = per_step * num_steps.saturating_sub(step) as f64 + self.decode_estimate;
        let _ = self.events.send(JobEvent::Step(StepProgress { step, num_steps, eta_seconds }));
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled() || self.abort.load(Ordering::SeqCst)
    }
}
