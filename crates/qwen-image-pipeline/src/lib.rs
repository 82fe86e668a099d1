//! The Qwen-Image-Edit pipeline: composes the model crate and the pruning crate.
//!
//! - [`denoise`]: the flow-matching Euler loop under a [`PruningSchedule`](qwen_image_pruning::PruningSchedule),
//!   with true CFG and per-step reports.
//! - [`scheduler`]: `FlowMatchEulerDiscreteScheduler` (base and Lightning configs).
//! - [`lora`]: LoRA files (Lightning and others), merged at load time or attached at run time.
//! - [`metrics`]: PSNR and SSIM (scikit-image's Gaussian-window SSIM) for comparing outputs.

pub mod denoise;
pub mod error;
pub mod lora;
pub mod metrics;
pub mod scheduler;

pub use denoise::{denoise, true_cfg, DenoiseCaches, DenoiseInputs, StepReport, TextConditioning};
pub use error::{PipelineError, Result};
pub use scheduler::{FlowMatchEulerScheduler, Schedule, SchedulerConfig};
