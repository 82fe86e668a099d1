//! The Qwen-Image-Edit pipeline: composes the model crate and the pruning crate.
//!
//! - [`pipeline`]: [`QwenImageEditPipeline`] — load a diffusers snapshot, run edits (Edit v1 and Edit-Plus) under a
//!   pruning schedule, get the image and an [`EditReport`].
//! - [`denoise`](mod@denoise): the flow-matching Euler loop under a [`PruningSchedule`](qwen_image_pruning::PruningSchedule),
//!   with true CFG and per-step reports.
//! - [`scheduler`]: `FlowMatchEulerDiscreteScheduler` (base and Lightning configs).
//! - [`lora`]: LoRA files (Lightning and others), merged at load time or attached at run time.
//! - [`metrics`]: PSNR and SSIM (scikit-image's Gaussian-window SSIM) for comparing outputs.
//! - [`snapshot`]: finding and checking snapshot folders (also in the Hugging Face cache).
//! - [`progress`], [`report`]: progress events and timings as data.
//! - [`latents`], [`noise`]: packing, image ↔ tensor conversions, seeded noise.
//! - [`demo`]: a built-in tiny random-weight snapshot to try everything without downloading weights, and the
//!   full-size configs to run the real architecture with random weights on a GPU.
//! - [`memory`]: host memory readings (resident set, peak) for reports and benchmarks.

pub mod demo;
pub mod denoise;
pub mod error;
pub mod latents;
pub mod lora;
pub mod memory;
pub mod metrics;
pub mod noise;
pub mod pipeline;
pub mod progress;
pub mod report;
pub mod scheduler;
pub mod snapshot;

pub use denoise::{denoise, true_cfg, DenoiseCaches, DenoiseInputs, StepReport, TextConditioning};
pub use error::{PipelineError, Result};
pub use pipeline::{
    save_image, EditOutput, EditRequest, ImageAreas, LoadOptions, LoraOption, QwenImageEditPipeline,
    ScheduleFactory, SchedulerChoice,
};
pub use progress::{NoProgress, Progress, Stage};
pub use report::{EditReport, StageTiming, StepEntry};
pub use scheduler::{FlowMatchEulerScheduler, Schedule, SchedulerConfig};
pub use snapshot::{Snapshot, Variant};
