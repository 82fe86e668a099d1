//! Serving Qwen-Image-Edit: one loaded pipeline, many edits, with back-pressure.
//!
//! - [`service`]: [`EditService`], embeddable in a Rust app without HTTP: a worker thread that owns the pipeline,
//!   a bounded job queue ([`EditService::submit`] refuses with [`SubmitError::QueueFull`] instead of growing),
//!   per-job progress events and cancellation ([`JobHandle`]), and per-image reuse of the VAE latents and the
//!   vision tower's embeddings across jobs ([`ReuseCache`](qwen_image_pipeline::ReuseCache), bit-identical).
//! - [`job`]: what a caller submits and gets back.
//! - [`metrics`]: Prometheus metrics of the service and the HTTP layer.
//! - [`http`]: the OpenAI-compatible HTTP server (`qwen-edit serve`).
//!
//! How to use (no HTTP):
//!
//! ```no_run
//! use qwen_image::CpuBackend;
//! use qwen_image_pipeline::{EditRequest, LoadOptions, NoProgress, QwenImageEditPipeline};
//! use qwen_image_serve::{EditJob, EditService, JobEvent, ServiceConfig};
//!
//! let service = EditService::start(ServiceConfig::default(), || {
//!     QwenImageEditPipeline::<CpuBackend>::load("Qwen/Qwen-Image-Edit", &LoadOptions::default(), &Default::default(), &mut NoProgress)
//! });
//! service.wait_loaded().expect("the model loads");
//! let image = qwen_image::processor::load_image("input.png".as_ref()).unwrap();
//! let job = EditJob { request: EditRequest::new(vec![image], "Make it purple"), schedule: "cat".parse().unwrap() };
//! let mut handle = service.submit(job).expect("queued");
//! while let Some(event) = handle.blocking_next_event() {
//!     match event {
//!         JobEvent::Step(s) => println!("step {}/{}, ETA {:.1} s", s.step, s.num_steps, s.eta_seconds),
//!         JobEvent::Finished(Ok(out)) => out.edit.image.save("out.png").unwrap(),
//!         JobEvent::Finished(Err(e)) => eprintln!("{e}"),
//!         _ => {}
//!     }
//! }
//! ```

pub mod http;
pub mod job;
pub mod metrics;
pub mod service;

pub use job::{CancelToken, EditJob, JobError, JobEvent, JobHandle, JobOutput, StepProgress};
pub use metrics::Metrics;
pub use service::{EditService, ModelInfo, ServiceConfig, ServiceStatus, SubmitError};
