//! Errors of the pipeline crate.

use std::path::PathBuf;

use qwen_image::ModelError;
use qwen_image_pruning::PruneError;

/// Result alias of the pipeline crate.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// What went wrong while preparing or running an edit.
///
/// A [`PruneError`] always arrives as [`PipelineError::Prune`], also when the model reported it: converting a
/// [`ModelError::Prune`] gives a `PipelineError::Prune`, never a `PipelineError::Model`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A model failed to load or run (never [`ModelError::Prune`]: see [`PipelineError::Prune`]).
    #[error(transparent)]
    Model(ModelError),
    /// The pruning schedule or plan is invalid.
    #[error(transparent)]
    Prune(#[from] PruneError),
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
    /// The caller cancelled the edit ([`Progress::cancelled`](crate::Progress::cancelled)); it stopped between two
    /// stages or two denoising steps.
    #[error("the edit was cancelled")]
    Cancelled,
}

impl From<ModelError> for PipelineError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Prune(e) => PipelineError::Prune(e),
            e => PipelineError::Model(e),
        }
    }
}

impl PipelineError {
    /// Shorthand for [`PipelineError::InvalidInput`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        PipelineError::InvalidInput(msg.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prune_error_from_the_model_arrives_as_prune() {
        let e = PruneError::InvalidPlan("x".into());
        assert!(
            matches!(PipelineError::from(ModelError::Prune(e.clone())), PipelineError::Prune(p) if p == e)
        );
        assert!(matches!(PipelineError::from(ModelError::invalid("y")), PipelineError::Model(_)));
    }
}
