//! [`RunReport`]: what one invocation did, as typed data; the CLI writes it as JSON (`report_TIMESTAMP.json`,
//! `--report FILE`) and prints tables from it.

use std::path::{Path, PathBuf};

use qwen_image::quant::LinearWeightSummary;
use qwen_image_pipeline::{
    memory::{MemoryGrowth, MemoryReading},
    EditReport, StageTiming, Variant,
};
use serde::{Deserialize, Serialize};

use crate::jobs::{Job, RejectedLine};
use crate::CliError;

/// The report of one invocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// The model folder or repo id, or the demo model's description.
    pub model: String,
    /// Whether the weights are random (the demo models).
    pub random_weights: bool,
    /// The demo size (`tiny`, `full`), with `--demo`.
    pub size: Option<String>,
    /// The pipeline variant.
    pub variant: Variant,
    /// `cpu` or `cuda`.
    pub device: String,
    /// The weights dtype (`F32`, `BF16`).
    pub dtype: String,
    /// How many times the weights were loaded (once per invocation).
    pub weights_loaded: usize,
    /// Untimed warm-up runs before the measured edits.
    pub warmup_runs: usize,
    /// Seconds spent loading.
    pub load_seconds: f64,
    /// Load time per stage.
    pub load_stages: Vec<StageTiming>,
    /// Memory right after loading.
    pub memory_after_load: MemoryReading,
    /// How the DiT's linear layers hold their weights (FP8 or the model's dtype) and the bytes FP8 saves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dit_weights: Option<LinearWeightSummary>,
    /// The memory plan of the first edit (predicted from the configs and the request; docs/memory.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_plan: Option<qwen_image_pipeline::MemoryPlan>,
    /// The weight bytes each network's load put on the device, counted from the tensors made (compare with
    /// `memory_plan.weights`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_weights: Option<qwen_image_pipeline::ComponentWeights>,
    /// Runs per edit (`--repeat`).
    pub repeat: usize,
    /// Change of memory from the first measured edit to the last (`None` with a single edit).
    pub memory_growth: Option<MemoryGrowth>,
    /// One entry per measured run of each job, in order.
    pub edits: Vec<JobReport>,
    /// Jobs that did not run: batch lines refused before loading and, with `--keep-going`, edits that failed.
    #[serde(default)]
    pub failed: Vec<FailedJob>,
}

/// One measured run of one job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobReport {
    /// The batch line of the job (`None` for the command line's edit).
    pub line: Option<usize>,
    /// The input images.
    pub input: Vec<String>,
    /// The instruction.
    pub prompt: String,
    /// Which run of the job (1-based; `--repeat`).
    pub run: usize,
    /// Files written.
    pub outputs: Outputs,
    /// The edits' reports: the pruned run (with `--compare`, its [`comparison`](EditReport::comparison) against the
    /// baseline) and/or the baseline.
    pub runs: Runs,
}

/// The edits of one job run, by role.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Runs {
    /// The unpruned run (schedule `none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<EditReport>,
    /// The pruned run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<EditReport>,
}

impl Runs {
    /// The reports that are there, baseline first.
    pub fn iter(&self) -> impl Iterator<Item = &EditReport> {
        self.baseline.iter().chain(&self.pruning)
    }

    /// The report of the last edit that ran (the pruned one under `--compare`).
    pub fn last(&self) -> Option<&EditReport> {
        self.pruning.as_ref().or(self.baseline.as_ref())
    }
}

/// The files one job run wrote.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Outputs {
    /// The baseline's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<PathBuf>,
    /// The pruned run's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruning: Option<PathBuf>,
    /// The difference heat map (`--compare`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difference: Option<PathBuf>,
    /// Input, baseline, pruned and heat map side by side (`--compare`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<PathBuf>,
}

/// A job that did not run, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailedJob {
    /// The batch line (`None` for the command line's edit).
    pub line: Option<usize>,
    /// The input images, when the line got that far.
    #[serde(default)]
    pub input: Vec<String>,
    /// What went wrong.
    pub error: String,
    /// Whether it was refused before loading (else it failed while running).
    pub before_loading: bool,
}

impl FailedJob {
    /// A batch line refused before loading.
    pub fn rejected(r: &RejectedLine) -> Self {
        FailedJob { line: Some(r.line), input: Vec::new(), error: r.error.clone(), before_loading: true }
    }

    /// A job that failed while running.
    pub fn at_run_time(job: &Job, error: &CliError) -> Self {
        FailedJob {
            line: job.line,
            input: job.inputs.clone(),
            error: error.to_string(),
            before_loading: false,
        }
    }
}

impl RunReport {
    /// Seconds and memory after each measured run (for the `--repeat` table).
    pub fn memory_by_run(&self) -> Vec<(f64, MemoryReading)> {
        self.edits
            .iter()
            .map(|e| {
                let seconds = e.runs.iter().map(|r| r.total_seconds).sum();
                (seconds, e.runs.last().and_then(|r| r.memory).unwrap_or_default())
            })
            .collect()
    }

    /// Sets [`RunReport::memory_growth`] from the first and the last measured run.
    pub fn finish(&mut self) {
        let memory = self.memory_by_run();
        self.memory_growth = match (memory.first(), memory.last()) {
            (Some((_, first)), Some((_, last))) if memory.len() > 1 => Some(first.growth_to(last)),
            _ => None,
        };
    }

    /// Writes the report as pretty JSON to each of `paths` (atomically).
    pub fn write(&self, paths: &[&Path]) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(self)?;
        for path in paths {
            qwen_image::tensor_io::write_atomic(path, text.as_bytes())?;
        }
        Ok(())
    }
}
