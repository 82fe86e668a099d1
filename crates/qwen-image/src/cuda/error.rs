//! Why a fast-path operation did not run (it then falls back to the portable implementation).

/// A fast-path operation that could not run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FastError {
    /// The inputs are outside what the kernel handles (dtype, head dimension, layout…): a silent fallback.
    #[error("not supported by the fast path: {0}")]
    Unsupported(String),
    /// A CUDA, NVRTC or cuBLASLt call failed: the operation kind is switched off on that device (until the next
    /// [`configure`](super::configure)), logged and reported.
    #[error("CUDA fast path failed: {0}")]
    Cuda(String),
}

impl FastError {
    pub(crate) fn unsupported(m: impl Into<String>) -> Self {
        FastError::Unsupported(m.into())
    }

    pub(crate) fn cuda(m: impl Into<String>) -> Self {
        FastError::Cuda(m.into())
    }
}

/// Returns `Err(Unsupported(msg))` unless `cond`.
pub(crate) fn require(cond: bool, msg: impl FnOnce() -> String) -> Result<(), FastError> {
    if cond {
        Ok(())
    } else {
        Err(FastError::Unsupported(msg()))
    }
}
