//! Errors of the model crate.

use std::path::PathBuf;

use qwen_image_pruning::PruneError;

/// Result alias of the model crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// What went wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is corrupt or truncated.
    #[error("{path} is not a valid safetensors file ({reason}); the file may be truncated or corrupt")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A config file does not parse or has impossible values.
    #[error("invalid config {path}: {reason}")]
    Config {
        /// The file (or a description of where the config came from).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("missing weight `{key}` (looked in {files})")]
    MissingKey {
        /// The checkpoint key.
        key: String,
        /// The files that were searched.
        files: String,
    },
    /// The checkpoint holds tensors the model does not use.
    #[error("unexpected weights in the checkpoint (is it the right model?): {}{}", keys.join(", "), if *more > 0 { format!(" and {more} more") } else { String::new() })]
    UnexpectedKeys {
        /// The first few unexpected keys.
        keys: Vec<String>,
        /// How many more were not listed.
        more: usize,
    },
    /// A tensor has a different shape than the config implies.
    #[error("weight `{key}` in {file} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The checkpoint key.
        key: String,
        /// The file it came from.
        file: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype the model cannot use.
    #[error("weight `{key}` in {file} has dtype {dtype}, expected a float type (f32, bf16 or f16)")]
    Dtype {
        /// The checkpoint key.
        key: String,
        /// The file it came from.
        file: String,
        /// The dtype in the file.
        dtype: String,
    },
    /// An input tensor or argument is invalid.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The pruning plan cannot be executed.
    #[error(transparent)]
    Prune(#[from] PruneError),
    /// A device-side failure (out of memory, kernel launch error) on an accelerated backend.
    #[error("device error: {0}")]
    Device(String),
}

impl ModelError {
    /// Shorthand for [`ModelError::InvalidInput`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        ModelError::InvalidInput(msg.into())
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        ModelError::Config { path: path.into(), reason: reason.into() }
    }
}

/// Reads the JSON config file `path` and parses it with `parse`; parse errors are reported against `path`.
pub(crate) fn read_config<T>(path: &std::path::Path, parse: impl FnOnce(&str) -> Result<T>) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    parse(&text).map_err(|e| match e {
        ModelError::Config { reason, .. } => ModelError::config(path, reason),
        e => e,
    })
}
