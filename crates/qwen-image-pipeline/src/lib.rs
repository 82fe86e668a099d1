//! The Qwen-Image-Edit pipeline: composes the model crate and the pruning crate.
//!
//! - [`denoise`]: the flow-matching Euler loop under a [`PruningSchedule`](qwen_image_pruning::PruningSchedule),
//!   with true CFG and per-step reports.

pub mod denoise;
pub mod error;

pub use denoise::{denoise, true_cfg, DenoiseCaches, DenoiseInputs, StepReport, TextConditioning};
pub use error::{PipelineError, Result};
