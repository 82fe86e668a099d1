//! The Qwen-Image-Edit pipeline: composes the model crate and the pruning crate.
//!
//! - [`pipeline`]: [`QwenImageEditPipeline`] — load a diffusers snapshot ([`load`](mod@load)), run edits (Edit v1 and
//!   Edit-Plus) under a pruning schedule ([`edit`](mod@edit), one method per stage), get the image and an
//!   [`EditReport`].
//! - [`request`], [`sizes`], [`validate`]: what an edit asks for, its sizes, and the checks that need no weights
//!   ([`EditRequest::validate`], [`check_schedule`]), for callers that refuse bad requests before loading.
//! - [`denoise`](mod@denoise): the flow-matching Euler loop under a [`PruningSchedule`](qwen_image_pruning::PruningSchedule),
//!   with true CFG and per-step reports.
//! - [`scheduler`]: `FlowMatchEulerDiscreteScheduler` (base and Lightning configs).
//! - [`lora`]: LoRA files (Lightning and others), merged at load time or attached at run time.
//! - [`metrics`]: PSNR and SSIM (scikit-image's Gaussian-window SSIM), and a [`Comparison`] of two edits.
//! - [`snapshot`]: finding and checking snapshot folders (also in the Hugging Face cache).
//! - [`progress`], [`report`]: progress events (and cancellation), and timings and statistics as typed data.
//! - [`reuse`]: per-image encodings (VAE latents, vision-tower embeddings) reused across edits of the same images
//!   ([`ReuseCache`]: LRU with a byte budget).
//! - [`latents`], [`noise`]: packing, image ↔ tensor conversions, seeded noise.
//! - [`demo`]: a built-in tiny random-weight snapshot to try everything without downloading weights, and the
//!   full-size configs to run the real architecture with random weights on a GPU.
//! - [`compose`]: the schedule an edit runs (the caller's, fitted to a cache budget, guarded by a guardrail).
//! - [`region`]: what the edit-region schedules need from the pipeline (per-token signals, unmasked pixels kept).
//! - [`memory`]: memory readings (host resident set and peak; device memory through a [`MemoryProbe`]).
//! - [`profile`]: the stages around the networks timed as an edit runs them and part by part ([`EditProfile`]), to
//!   measure each stage's overhead over its network.

pub mod compose;
pub mod demo;
pub mod denoise;
pub mod edit;
pub mod error;
pub mod fit;
pub mod latents;
pub mod load;
pub mod lora;
pub mod memory;
pub mod memory_plan;
pub mod metrics;
pub mod noise;
pub mod pipeline;
pub mod profile;
pub mod progress;
pub mod region;
pub mod report;
pub mod request;
pub mod reuse;
pub mod scheduler;
pub mod sizes;
pub mod snapshot;
pub mod validate;

pub use denoise::{denoise, denoise_with, true_cfg, DenoiseCaches, DenoiseInputs, TextConditioning};
pub use error::{PipelineError, Result};
pub use fit::{MemoryFit, SmallerMode};
pub use load::{ExactAllocation, LoadOptions, LoraOption, MemoryMode, SchedulerChoice};
pub use memory::{MemoryProbe, MemoryReading};
pub use memory_plan::{plan_request, ComponentWeights, MemoryPlan, PlanShape};
pub use metrics::Comparison;
pub use pipeline::QwenImageEditPipeline;
pub use profile::{EditProfile, PartTiming, StageProfile};
pub use progress::{NoProgress, Progress, Stage};
pub use report::{EditReport, GuardrailEvent, StageTiming, StepReport};
pub use request::{save_image, EditOutput, EditRequest, ImageAreas};
pub use reuse::{Encoding, EncodingKind, ImageReuse, NoReuse, ReuseCache, ReuseCounts, ReuseKey, ReuseStats};
pub use scheduler::{FlowMatchEulerScheduler, Schedule, SchedulerConfig};
pub use sizes::{EditSizes, SizeAdjustment};
pub use snapshot::{Snapshot, Variant};
pub use validate::check_schedule;
