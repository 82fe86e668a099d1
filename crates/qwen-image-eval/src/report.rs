//! [`EvalReport`]: an evaluation summarized per schedule and per (variant, task), as typed data (serde, the JSON
//! that `qwen-edit eval` writes).
//!
//! Averages: PSNRs are averaged after capping them at [`PSNR_CAP_DB`] (an identical image has an infinite PSNR)
//! and skipping NaN (an empty mask region); the success rate is the fraction of edits that pass the success rule
//! ([`crate::score`]); `max_abs_diff` is the largest over the group. Speed-ups are the unpruned run's mean wall time
//! divided by the schedule's; FLOPs are those of the DiT's blocks in the steps that ran (from each step's stats,
//! [`crate::flops::executed_flops`]), per step, averaged over an edit's steps and then over the edits.

use serde::{Deserialize, Serialize};

use crate::{
    evaluate::{EditRecord, EvalOptions, EvalRun},
    heldout::{HeldOutSet, SetVariant},
};

/// PSNRs above this are counted as this in averages, dB.
pub const PSNR_CAP_DB: f64 = 100.0;

/// Averages of a group of edits under one schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupStats {
    /// The variant, or `None` for all.
    pub variant: Option<SetVariant>,
    /// The task, or `None` for all.
    pub task: Option<String>,
    /// Edits in the group.
    pub edits: usize,
    /// Fraction of the edits that pass the success rule.
    pub success_rate: f64,
    /// Mean PSNR against the ground truth over the whole image, dB.
    pub psnr_db: f64,
    /// Mean SSIM against the ground truth.
    pub ssim: f64,
    /// Mean PSNR against the ground truth inside the mask (mask > 0), dB.
    pub psnr_inside_db: f64,
    /// Mean PSNR against the ground truth outside the mask (mask 0), dB.
    pub psnr_outside_db: f64,
    /// Mean ΔE76 of the core's colour.
    pub delta_e: f64,
    /// Against the unpruned run (`None` for `none`).
    pub drift: Option<DriftStats>,
}

/// Averages of the drift from the unpruned run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftStats {
    /// Mean PSNR, dB.
    pub psnr_db: f64,
    /// Mean SSIM.
    pub ssim: f64,
    /// The largest absolute pixel difference of any edit.
    pub max_abs_diff: u8,
    /// Mean SSIMULACRA2.
    pub ssimulacra2: f64,
}

/// One schedule: all edits, each (variant, task) group, and speed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleSummary {
    /// The schedule's spec.
    pub schedule: String,
    /// Over every edit.
    pub all: GroupStats,
    /// Per (variant, task), in the set's order.
    pub groups: Vec<GroupStats>,
    /// DiT FLOPs per step of the plans that ran, averaged over the edits ([`EditRecord::dit_flops_per_step`]).
    pub dit_flops_per_step: f64,
    /// This schedule's FLOPs per step divided by the unpruned run's.
    pub flops_ratio: f64,
    /// Mean wall time of an edit, seconds.
    pub seconds: f64,
    /// Mean wall time of the denoising loop, seconds.
    pub denoise_seconds: f64,
    /// The unpruned run's mean wall time divided by this schedule's.
    pub speedup: f64,
    /// The same for the denoising loop alone.
    pub speedup_denoise: f64,
    /// The ids of the worst cases, worst first (the rows of the grid).
    pub worst_cases: Vec<String>,
}

/// An evaluation: settings, per-schedule summaries and every record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The held-out set's folder.
    pub heldout: String,
    /// Edits evaluated (each under every schedule).
    pub edits: usize,
    /// Denoising steps.
    pub steps: usize,
    /// True-CFG scale (CFG off at 1).
    pub cfg: f32,
    /// Seed of manifest line 0 (line `i` uses `seed + i`).
    pub seed: u64,
    /// Per schedule, `none` first.
    pub schedules: Vec<ScheduleSummary>,
    /// Every edit under every schedule.
    pub records: Vec<EditRecord>,
}

impl EvalRun {
    /// Summarizes the run.
    pub fn report(&self, set: &HeldOutSet, options: &EvalOptions) -> EvalReport {
        let per_schedule: Vec<Vec<&EditRecord>> = self
            .schedules
            .iter()
            .map(|s| self.records.iter().filter(|r| &r.schedule == s).collect())
            .collect();
        let base = per_schedule.first().cloned().unwrap_or_default();
        let (base_seconds, base_denoise, base_flops) = (
            mean(base.iter().map(|r| r.seconds)),
            mean(base.iter().map(|r| r.denoise_seconds)),
            mean(base.iter().map(|r| r.dit_flops_per_step)),
        );
        let schedules = self
            .schedules
            .iter()
            .zip(&per_schedule)
            .zip(&self.worst)
            .map(|((name, records), worst)| {
                let seconds = mean(records.iter().map(|r| r.seconds));
                let denoise_seconds = mean(records.iter().map(|r| r.denoise_seconds));
                let flops = mean(records.iter().map(|r| r.dit_flops_per_step));
                ScheduleSummary {
                    schedule: name.clone(),
                    all: group_stats(None, None, records),
                    groups: groups(set, records),
                    dit_flops_per_step: flops,
                    flops_ratio: flops / base_flops,
                    seconds,
                    denoise_seconds,
                    speedup: base_seconds / seconds,
                    speedup_denoise: base_denoise / denoise_seconds,
                    worst_cases: worst.iter().map(|w| w.record.id.clone()).collect(),
                }
            })
            .collect();
        EvalReport {
            heldout: set.dir.display().to_string(),
            edits: per_schedule.first().map_or(0, Vec::len),
            steps: options.steps,
            cfg: options.cfg,
            seed: options.seed,
            schedules,
            records: self.records.clone(),
        }
    }
}

/// The (variant, task) groups of `records`, in the order of the set's manifest.
fn groups(set: &HeldOutSet, records: &[&EditRecord]) -> Vec<GroupStats> {
    let mut keys: Vec<(SetVariant, &str)> = Vec::new();
    for e in &set.edits {
        if !keys.contains(&(e.variant, e.task.as_str())) {
            keys.push((e.variant, &e.task));
        }
    }
    keys.into_iter()
        .filter_map(|(v, t)| {
            let members: Vec<&EditRecord> =
                records.iter().copied().filter(|r| r.variant == v && r.task == t).collect();
            (!members.is_empty()).then(|| group_stats(Some(v), Some(t.to_string()), &members))
        })
        .collect()
}

fn group_stats(variant: Option<SetVariant>, task: Option<String>, records: &[&EditRecord]) -> GroupStats {
    let drifts: Vec<_> = records.iter().filter_map(|r| r.drift).collect();
    let drift = (!drifts.is_empty()).then(|| DriftStats {
        psnr_db: mean_db(drifts.iter().map(|d| d.psnr_db)),
        ssim: mean(drifts.iter().map(|d| d.ssim)),
        max_abs_diff: drifts.iter().map(|d| d.max_abs_diff).max().unwrap_or(0),
        ssimulacra2: mean(drifts.iter().map(|d| d.ssimulacra2)),
    });
    GroupStats {
        variant,
        task,
        edits: records.len(),
        success_rate: mean(records.iter().map(|r| f64::from(u8::from(r.truth.success)))),
        psnr_db: mean_db(records.iter().map(|r| r.truth.psnr_db)),
        ssim: mean(records.iter().map(|r| r.truth.ssim)),
        psnr_inside_db: mean_db(records.iter().map(|r| r.truth.psnr_inside_db)),
        psnr_outside_db: mean_db(records.iter().map(|r| r.truth.psnr_outside_db)),
        delta_e: mean(records.iter().map(|r| r.truth.delta_e)),
        drift,
    }
}

/// Mean of the non-NaN values (0 for none).
fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.filter(|v| !v.is_nan()).fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Mean of PSNRs capped at [`PSNR_CAP_DB`].
fn mean_db(values: impl Iterator<Item = f64>) -> f64 {
    mean(values.map(|v| v.min(PSNR_CAP_DB)))
}
