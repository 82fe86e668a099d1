//! Errors of schedules, plans and the cache.

use crate::TokenGroup;

/// An invalid schedule, plan or cache access.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PruneError {
    /// A plan reuses tokens that no earlier step cached.
    #[error(
        "step {}, layer {layer}: {group} is reused but nothing was cached for it (cache it at an earlier step)",
        .step + 1
    )]
    CacheMiss {
        /// 0-based step index (the message prints the 1-based step number).
        step: usize,
        /// Block index.
        layer: usize,
        /// The group that was to be reused.
        group: TokenGroup,
    },
    /// A plan reuses cached tokens whose shape no longer matches the input (another image size).
    #[error("layer {layer}: cached {group} has {cached} tokens but the input has {expected}")]
    CacheShapeMismatch {
        /// Block index.
        layer: usize,
        /// The group.
        group: TokenGroup,
        /// Tokens in the cache.
        cached: usize,
        /// Tokens in the current input.
        expected: usize,
    },
    /// A plan that reuses cached hidden states, but they were not stored.
    #[error("layer {layer}: {group} needs cached hidden states, but only K/V were cached")]
    HiddenNotCached {
        /// Block index.
        layer: usize,
        /// The group.
        group: TokenGroup,
    },
    /// A layer range that does not fit the model.
    #[error("layer range {lo}-{hi} is outside the model's layers 0-{last}")]
    LayerRange {
        /// First layer of the range (inclusive).
        lo: usize,
        /// Last layer of the range (inclusive).
        hi: usize,
        /// Last layer of the model.
        last: usize,
    },
    /// A step number outside the run.
    #[error("step {step} is outside 1-{num_steps}")]
    StepRange {
        /// 1-based step number as given.
        step: usize,
        /// Number of steps of the run.
        num_steps: usize,
    },
    /// A structurally invalid plan.
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    /// A plan feature the model does not implement yet.
    #[error("unsupported plan: {0}")]
    Unsupported(String),
    /// A schedule specification that does not parse.
    #[error("invalid schedule `{spec}`: {reason}")]
    Spec {
        /// The text given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
}
