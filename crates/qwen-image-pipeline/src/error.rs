//! Errors of the pipeline crate.

use std::path::PathBuf;

/// Result alias of the pipeline crate.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// What went wrong while preparing or running an edit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A model failed to load or run.
    #[error(transparent)]
    Model(#[from] qwen_image::ModelError),
    /// The pruning schedule or plan is invalid.
    #[error(transparent)]
    Prune(#[from] qwen_image_pruning::PruneError),
    /// A request argument is invalid (empty prompt, zero steps, absurd size, …).
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// An image could not be read or written.
    #[error("image {path}: {reason}")]
    Image {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The model folder is missing, incomplete or of another model type.
    #[error("model {path}: {reason}")]
    Snapshot {
        /// The folder (or file) at fault.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A LoRA file cannot be used with this model.
    #[error("LoRA {path}: {reason}")]
    Lora {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A device-side failure (out of memory, kernel error).
    #[error("device error: {0}")]
    Device(String),
}

impl PipelineError {
    /// Shorthand for [`PipelineError::InvalidInput`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        PipelineError::InvalidInput(msg.into())
    }
}
