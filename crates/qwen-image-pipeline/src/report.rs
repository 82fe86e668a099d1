//! [`EditReport`]: what an edit did and how long each part took, as data (serializable to JSON).
//!
//! How to use: every [`EditOutput`](crate::EditOutput) carries one; `serde_json::to_string_pretty(&report)` gives the
//! JSON the CLI writes with `--report`, and [`EditReport::stage_seconds`] / [`EditReport::steps`] feed tables.

use serde::Serialize;

use crate::{progress::Stage, snapshot::Variant, StepReport};

/// Wall time of one stage.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageTiming {
    /// The stage.
    pub stage: Stage,
    /// Seconds (the device was synchronized before the clock stopped).
    pub seconds: f64,
}

/// One denoising step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepEntry {
    /// 0-based step index.
    pub step: usize,
    /// σ of the step.
    pub sigma: f32,
    /// Wall time of the step in seconds.
    pub seconds: f64,
    /// Image tokens computed, summed over blocks and CFG branches.
    pub computed_tokens: usize,
    /// Condition tokens reused from the cache, summed over blocks and branches.
    pub reused_tokens: usize,
    /// Cache entries written.
    pub cached_entries: usize,
    /// Bytes held by the caches after the step.
    pub cache_bytes: usize,
    /// Relative L2 change of the velocity against the previous step.
    pub velocity_change: Option<f32>,
    /// The plan, summarized (`compute n, cache n, reuse n` over blocks × condition images).
    pub plan: String,
}

impl From<&StepReport> for StepEntry {
    fn from(r: &StepReport) -> Self {
        StepEntry {
            step: r.step,
            sigma: r.sigma,
            seconds: r.time.as_secs_f64(),
            computed_tokens: r.computed_tokens,
            reused_tokens: r.reused_tokens,
            cached_entries: r.cached_entries,
            cache_bytes: r.cache_bytes,
            velocity_change: r.velocity_change,
            plan: r.plan_summary.clone(),
        }
    }
}

/// Everything an edit reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EditReport {
    /// The pipeline variant.
    pub variant: Variant,
    /// The pruning schedule's name.
    pub schedule: String,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
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
    pub steps: Vec<StepEntry>,
    /// Wall time of the whole edit in seconds.
    pub total_seconds: f64,
    /// Bytes held by the pruning caches at the end of the edit.
    pub cache_bytes: usize,
    /// Largest cache size seen after any step.
    pub cache_peak_bytes: usize,
}

impl EditReport {
    /// Seconds spent in `stage` (0 if it did not run).
    pub fn stage_seconds(&self, stage: Stage) -> f64 {
        self.stages.iter().filter(|s| s.stage == stage).map(|s| s.seconds).sum()
    }

    /// Condition tokens reused over the whole run.
    pub fn reused_tokens(&self) -> usize {
        self.steps.iter().map(|s| s.reused_tokens).sum()
    }
}
