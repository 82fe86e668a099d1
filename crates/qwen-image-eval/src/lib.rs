//! Edit quality of pruning schedules on the trained proxy models' held-out set (issue 11; docs/quality.md).
//!
//! - [`heldout`]: the held-out set (manifest, selection, images).
//! - [`score`]: per-edit metrics against the ground truth (with the success rule) and against the unpruned run.
//! - [`flops`]: DiT FLOPs per step, of the steps that ran (from their stats) or planned (from a schedule's plans).
//! - [`evaluate`](mod@evaluate): running a selection of edits under a list of schedules ([`Evaluator`]).
//! - [`report`]: the run summarized per schedule and per (variant, task) ([`EvalReport`], serde).
//! - [`grid`]: the worst cases of a schedule as one image.
//!
//! `qwen-edit eval` renders these (table, JSON, grids); the CI subset test (`tests/proxy_quality.rs`) asserts on
//! them.

pub mod evaluate;
pub mod flops;
pub mod grid;
pub mod heldout;
pub mod report;
pub mod score;

use std::path::PathBuf;

pub use evaluate::{EditRecord, EvalOptions, EvalRun, Evaluator};
pub use heldout::{HeldOutSet, Selection, SetVariant};
pub use report::EvalReport;

/// Errors of an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The held-out set (or one of its files) is missing or malformed.
    #[error("held-out set {path}: {reason}")]
    HeldOut {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A bad selection, schedule or image.
    #[error("{0}")]
    Invalid(String),
    /// The pipeline failed.
    #[error(transparent)]
    Pipeline(#[from] qwen_image_pipeline::PipelineError),
    /// A schedule could not be built or planned.
    #[error(transparent)]
    Prune(#[from] qwen_image_pruning::PruneError),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, EvalError>;

/// An `f64` that may be infinite or NaN, in JSON: a number, or `"inf"`, `"-inf"`, `"nan"` (JSON has neither).
pub mod json_f64 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(f64),
        Text(String),
    }

    /// Serializes `v` as a number, or as `"inf"`, `"-inf"` or `"nan"`.
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        match *v {
            v if v.is_finite() => Value::Number(v),
            v if v.is_nan() => Value::Text("nan".into()),
            v => Value::Text(if v > 0.0 { "inf" } else { "-inf" }.into()),
        }
        .serialize(s)
    }

    /// Reads what [`serialize`] writes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(v) => Ok(v),
            Value::Text(t) => match t.as_str() {
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                "nan" => Ok(f64::NAN),
                _ => Err(serde::de::Error::custom(format!("`{t}` is not a number"))),
            },
        }
    }
}
