//! One submitted edit: what the caller sends ([`EditJob`]), what it gets back ([`JobHandle`], a stream of
//! [`JobEvent`]s ending with the result), and how it fails ([`JobError`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qwen_image_pipeline::{EditOutput, EditRequest, Stage};
use qwen_image_pruning::ScheduleSpec;
use serde::Serialize;
use tokio::sync::mpsc;

/// One edit to run: the request and its pruning schedule.
#[derive(Clone, Debug)]
pub struct EditJob {
    /// The edit.
    pub request: EditRequest,
    /// The pruning schedule (`none`, `cat`, `reuse:…`).
    pub schedule: ScheduleSpec,
}

/// The result of a finished job.
#[derive(Clone, Debug)]
pub struct JobOutput {
    /// The edit's image, latents and report (its `image_reuse` says whether the image encodings were reused).
    pub edit: EditOutput,
    /// Seconds the job waited in the queue before it started.
    pub queued_seconds: f64,
}

/// Why a job gave no image.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum JobError {
    /// Cancelled by the caller ([`JobHandle::cancel`], dropping the handle) or by a shutdown.
    #[error("the edit was cancelled{}", if *.shutdown { " (the server is shutting down)" } else { "" })]
    Cancelled {
        /// Whether the service's shutdown cancelled it.
        shutdown: bool,
    },
    /// The request is invalid (found when the edit ran).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The edit failed (a device error, a model error).
    #[error("the edit failed: {0}")]
    Failed(String),
}

/// A progress event of a job, in order: `Started`, then `Stage` and `Step` events, then one `Finished`.
#[derive(Clone, Debug)]
pub enum JobEvent {
    /// The job left the queue and the pipeline started it.
    Started {
        /// Time spent in the queue.
        queued: Duration,
    },
    /// A stage of the edit started.
    Stage(Stage),
    /// A denoising step ended.
    Step(StepProgress),
    /// The job ended: the output, or why not. Always the last event.
    Finished(Result<Box<JobOutput>, JobError>),
}

/// Progress of the denoising loop after one step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StepProgress {
    /// Steps done (1-based: 1 after the first step).
    pub step: usize,
    /// Steps in all.
    pub num_steps: usize,
    /// Estimated seconds until the edit ends: the mean step time × the steps left, plus the last decode time.
    pub eta_seconds: f64,
}

/// A shared flag that cancels a job.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// Asks the job to stop (between two stages or steps; a queued job never starts).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`Self::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The caller's side of a submitted job. Dropping it before the job finished cancels the job (e.g. when an HTTP
/// client goes away); call [`Self::detach`] to let it run unobserved instead.
#[derive(Debug)]
pub struct JobHandle {
    id: u64,
    events: mpsc::UnboundedReceiver<JobEvent>,
    cancel: CancelToken,
    finished: bool,
}

impl JobHandle {
    pub(crate) fn new(id: u64, events: mpsc::UnboundedReceiver<JobEvent>, cancel: CancelToken) -> Self {
        JobHandle { id, events, cancel, finished: false }
    }

    /// The job's id (unique in the service, in submission order).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Cancels the job; its last event is then [`JobError::Cancelled`] unless it had already finished.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// A token that cancels the job from elsewhere.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Lets the job run without this handle (dropping the handle then does not cancel it).
    pub fn detach(mut self) {
        self.finished = true;
    }

    /// The next event (async); `None` after [`JobEvent::Finished`].
    pub async fn next_event(&mut self) -> Option<JobEvent> {
        let event = self.events.recv().await;
        self.note(&event);
        event
    }

    /// The next event, blocking the thread (not from inside an async runtime); `None` after `Finished`.
    pub fn blocking_next_event(&mut self) -> Option<JobEvent> {
        let event = self.events.blocking_recv();
        self.note(&event);
        event
    }

    /// Waits for the result (async), skipping progress events.
    pub async fn result(mut self) -> Result<Box<JobOutput>, JobError> {
        while let Some(event) = self.next_event().await {
            if let JobEvent::Finished(result) = event {
                return result;
            }
        }
        Err(lost())
    }

    /// Waits for the result, blocking the thread (not from inside an async runtime).
    pub fn wait(mut self) -> Result<Box<JobOutput>, JobError> {
        while let Some(event) = self.blocking_next_event() {
            if let JobEvent::Finished(result) = event {
                return result;
            }
        }
        Err(lost())
    }

    fn note(&mut self, event: &Option<JobEvent>) {
        if matches!(event, Some(JobEvent::Finished(_)) | None) {
            self.finished = true;
        }
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel.cancel();
        }
    }
}

/// The error of a job whose worker went away without a result (the service stopped abnormally).
fn lost() -> JobError {
    JobError::Failed("the service stopped before the job finished".into())
}
