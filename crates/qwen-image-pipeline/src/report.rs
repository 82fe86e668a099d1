//! [`EditReport`]: what an edit did and how long each part took, as data (serde, to and from JSON).
//!
//! How to use: every [`EditOutput`](crate::EditOutput) carries one; `serde_json::to_string_pretty(&report)` gives the
//! JSON the CLI writes with `--report`, and [`EditReport::stage_seconds`] / [`EditReport::steps`] feed tables.

use std::time::Duration;

use qwen_image::ops::FastPathReport;
use qwen_image_pruning::StepStats;
use serde::{Deserialize, Serialize};

use crate::{
    memory::MemoryReading, metrics::Comparison, progress::Stage, reuse::ReuseCounts, sizes::SizeAdjustment,
    snapshot::Variant,
};

/// Wall time of one stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageTiming {
    /// The stage.
    pub stage: Stage,
    /// Seconds: the device was synchronized before the clock stopped, unless the stage was only
    /// [`queued`](Self::queued).
    pub seconds: f64,
    /// The stage's device work was queued, not awaited (image encoding, queued ahead of prompt encoding: see
    /// [`QwenImageEditPipeline::edit`](crate::QwenImageEditPipeline::edit)). On a GPU [`seconds`](Self::seconds) is
    /// the host's time to queue it, and the device finishes it during the next stage, whose time includes it; on
    /// the CPU, which computes as it queues, it is the stage's whole time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queued: bool,
}

/// What one denoising step did: the progress event of the step and its entry in the [`EditReport`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// 0-based step index (tables print it 1-based).
    pub step: usize,
    /// σ of the step.
    pub sigma: f32,
    /// Wall time of the step (the device is synchronized before the clock stops); JSON: `seconds`.
    #[serde(rename = "seconds", with = "duration_seconds")]
    pub time: Duration,
    /// Tokens computed and reused and cache entries written, summed over blocks and CFG branches (JSON: flattened).
    #[serde(flatten)]
    pub stats: StepStats,
    /// Bytes held by the caches after the step.
    pub cache_bytes: usize,
    /// Relative L2 change of the velocity against the previous step.
    pub velocity_change: Option<f32>,
    /// The schedule's plan, summarized (`compute n, cache n, reuse n` over blocks × condition images); JSON: `plan`.
    #[serde(rename = "plan")]
    pub plan_summary: String,
    /// Set when the schedule's guardrail rejected the step's reuse and the step ran again with everything computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guardrail: Option<GuardrailEvent>,
}

/// A step the guardrail ran again with everything computed ([`PruningSchedule::review`](qwen_image_pruning::PruningSchedule::review)).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuardrailEvent {
    /// The relative velocity change that made it fire.
    pub drift: f32,
    /// Seconds the second DiT pass took (included in the step's time).
    pub seconds: f64,
}

impl StepReport {
    /// The wall time of the step in seconds.
    pub fn seconds(&self) -> f64 {
        self.time.as_secs_f64()
    }
}

/// Everything an edit reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EditReport {
    /// The pipeline variant.
    pub variant: Variant,
    /// The pruning schedule's name.
    pub schedule: String,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// Requested output sides that were rounded down to the model's multiple (empty when none was).
    #[serde(default)]
    pub size_adjustments: Vec<SizeAdjustment>,
    /// Denoising steps.
    pub num_steps: usize,
    /// Whether true CFG ran (scale > 1 and a negative prompt).
    pub true_cfg: bool,
    /// The true-CFG scale asked for.
    pub cfg_scale: f32,
    /// The noise seed (`None` when the noise was supplied).
    pub seed: Option<u64>,
    /// Text tokens of the prompt that condition the DiT.
    pub text_tokens: usize,
    /// Noisy target tokens.
    pub target_tokens: usize,
    /// Tokens of each condition image.
    pub condition_tokens: Vec<usize>,
    /// σ values of the run (`num_steps + 1`).
    pub sigmas: Vec<f32>,
    /// Time per stage, in order.
    pub stages: Vec<StageTiming>,
    /// Per-step details.
    pub steps: Vec<StepReport>,
    /// Wall time of the whole edit in seconds.
    pub total_seconds: f64,
    /// Bytes held by the pruning caches at the end of the edit.
    pub cache_bytes: usize,
    /// Largest cache size seen after any step.
    pub cache_peak_bytes: usize,
    /// Memory at the end of the edit, as the pipeline's [`MemoryProbe`](crate::memory::MemoryProbe) reads it.
    #[serde(default)]
    pub memory: Option<MemoryReading>,
    /// The backend's fast-path statistics (calls, fallbacks, errors per kind of operation); `None` for a backend
    /// without a fast path.
    #[serde(default)]
    pub fast_path: Option<FastPathReport>,
    /// Quality and speed against a baseline edit, when the caller compared them ([`Comparison::between`]).
    #[serde(default)]
    pub comparison: Option<Comparison>,
    /// Per-image encodings taken from ([`ReuseCounts::hits`]) or computed for ([`ReuseCounts::misses`]) an
    /// [`ImageReuse`](crate::ImageReuse) cache (both 0 without one).
    #[serde(default)]
    pub image_reuse: ReuseCounts,
}

impl EditReport {
    /// Seconds spent in `stage` (0 if it did not run).
    pub fn stage_seconds(&self, stage: Stage) -> f64 {
        self.stages.iter().filter(|s| s.stage == stage).map(|s| s.seconds).sum()
    }

    /// Tokens computed and reused and cache entries written over the whole run.
    pub fn stats(&self) -> StepStats {
        self.steps.iter().map(|s| s.stats).sum()
    }

    /// Condition tokens reused over the whole run.
    pub fn reused_tokens(&self) -> usize {
        self.stats().reused_tokens
    }
}

/// A [`Duration`] as seconds (f64) in JSON.
mod duration_seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}
