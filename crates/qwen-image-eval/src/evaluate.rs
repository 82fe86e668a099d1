//! Running held-out edits under a list of schedules: every edit once per schedule, the unpruned run (`none`) first
//! (the reference for drift and speed-up), each output scored against the ground truth and against the unpruned
//! output of the same seed, and the worst cases of each schedule kept with their images.
//!
//! How to use:
//!
//! ```no_run
//! use qwen_image::CpuBackend;
//! use qwen_image_eval::{evaluate::{EvalOptions, Evaluator}, heldout::{HeldOutSet, Selection}};
//!
//! # fn main() -> qwen_image_eval::Result<()> {
//! # let (edit_pipe, plus_pipe): (qwen_image_pipeline::QwenImageEditPipeline<CpuBackend>, _) = todo!();
//! let set = HeldOutSet::open("tests/fixtures/proxy/heldout".as_ref())?;
//! let edits = set.select(&Selection { limit: Some(24), ..Selection::default() })?;
//! let options = EvalOptions::new(vec!["none".parse()?, "cat".parse()?]);
//! let mut evaluator = Evaluator::new(vec![edit_pipe, plus_pipe]);
//! let run = evaluator.run(&set, &edits, &options, &mut |_| {})?;
//! let report = run.report(&set, &options); // per schedule and task; serde
//! # Ok(()) }
//! ```

use qwen_image::{ops::QwenBackend, processor::RgbImage};
use qwen_image_pipeline::{EditRequest, NoProgress, QwenImageEditPipeline, Stage, Variant};
use qwen_image_pruning::ScheduleSpec;
use serde::{Deserialize, Serialize};

use crate::{
    flops::executed_flops_per_step,
    heldout::{EditImages, HeldOutEdit, HeldOutSet, SetVariant},
    score::{drift_from_baseline, score_against_truth, DriftScore, TruthScore},
    EvalError, Result,
};

/// How to run the evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalOptions {
    /// The schedules, in report order; `none` is run first whether listed or not (it is the reference).
    pub schedules: Vec<ScheduleSpec>,
    /// Noise seed of the first edit of the set; the edit on manifest line `i` uses `seed + i` under every schedule.
    pub seed: u64,
    /// Denoising steps (the proxies: 4).
    pub steps: usize,
    /// True-CFG scale; above 1, CFG runs with the negative prompt `" "`.
    pub cfg: f32,
    /// Untimed runs of the first edit of each variant under each schedule before the timed ones (one-time costs such
    /// as kernel compilation stay out of the timings).
    pub warmup: usize,
    /// How many worst cases to keep per schedule.
    pub worst_cases: usize,
    /// Image areas of the requests.
    pub areas: qwen_image_pipeline::ImageAreas,
    /// The drift guardrail of every request ([`EditRequest::guardrail`]; `None`: off). A step it runs again counts
    /// in the record's FLOPs (both passes).
    pub guardrail: Option<f32>,
}

impl EvalOptions {
    /// Options for `schedules` with the proxies' settings: 4 steps, CFG off, seed 0, no warm-up, 6 worst cases,
    /// 128² areas.
    pub fn new(schedules: Vec<ScheduleSpec>) -> Self {
        EvalOptions {
            schedules,
            seed: 0,
            steps: 4,
            cfg: 1.0,
            warmup: 0,
            worst_cases: 6,
            areas: qwen_image_pipeline::ImageAreas { vae: 128 * 128, condition: 128 * 128 },
            guardrail: None,
        }
    }

    /// The schedules in run order: `none`, then the others as listed (duplicates dropped).
    pub fn run_order(&self) -> Vec<ScheduleSpec> {
        let mut order = vec![ScheduleSpec::None];
        for s in &self.schedules {
            if !order.contains(s) {
                order.push(s.clone());
            }
        }
        order
    }
}

/// One edit under one schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EditRecord {
    /// The held-out id.
    pub id: String,
    /// The set's variant.
    pub variant: SetVariant,
    /// The task.
    pub task: String,
    /// The schedule (its spec).
    pub schedule: String,
    /// The noise seed.
    pub seed: u64,
    /// Against the ground truth.
    pub truth: TruthScore,
    /// Against the unpruned output of the same seed (`None` for `none` itself).
    pub drift: Option<DriftScore>,
    /// Wall time of the whole edit, seconds.
    pub seconds: f64,
    /// Wall time of the denoising loop, seconds.
    pub denoise_seconds: f64,
    /// FLOPs of the DiT's blocks per step that the edit ran (from its steps' stats: the plans that actually ran,
    /// [`crate::flops::executed_flops`]), averaged over its steps.
    pub dit_flops_per_step: f64,
}

impl EditRecord {
    /// Worst first: failures before successes, then the lower PSNR against the ground truth.
    fn badness_key(&self) -> (bool, f64) {
        (self.truth.success, self.truth.psnr_db)
    }
}

/// A worst case of a schedule with its images.
#[derive(Clone, Debug)]
pub struct WorstCase {
    /// The edit's record under the schedule.
    pub record: EditRecord,
    /// The last input image (the one the output edits).
    pub source: RgbImage,
    /// The ground truth.
    pub target: RgbImage,
    /// The schedule's output.
    pub output: RgbImage,
}

/// Everything an evaluation measured.
#[derive(Clone, Debug)]
pub struct EvalRun {
    /// The schedules in run order (`none` first).
    pub schedules: Vec<String>,
    /// One record per edit and schedule, edit by edit in run order.
    pub records: Vec<EditRecord>,
    /// Per schedule (run order): its worst cases, worst first.
    pub worst: Vec<Vec<WorstCase>>,
}

/// What the progress callback hears after each edit and schedule.
#[derive(Clone, Copy, Debug)]
pub struct EvalProgress<'a> {
    /// 0-based position of the edit in the selection.
    pub edit: usize,
    /// Edits in the selection.
    pub edits: usize,
    /// The record just made.
    pub record: &'a EditRecord,
}

/// Runs held-out edits on loaded pipelines (one per variant).
#[derive(Debug)]
pub struct Evaluator<B: QwenBackend> {
    pipes: Vec<QwenImageEditPipeline<B>>,
}

impl<B: QwenBackend> Evaluator<B> {
    /// An evaluator with these pipelines (at most one per [`Variant`]; the first of a variant is used).
    pub fn new(pipes: Vec<QwenImageEditPipeline<B>>) -> Self {
        Evaluator { pipes }
    }

    fn pipe(&mut self, variant: Variant) -> Result<&mut QwenImageEditPipeline<B>> {
        self.pipes.iter_mut().find(|p| p.variant() == variant).ok_or_else(|| {
            EvalError::Invalid(format!("no {variant:?} pipeline was loaded for the selected edits"))
        })
    }

    /// Runs `edits` of `set` under every schedule of `options`, calling `progress` after each run. Checks first
    /// that a pipeline exists for every selected edit's variant and that every schedule fits every pipeline.
    pub fn run(
        &mut self,
        set: &HeldOutSet,
        edits: &[&HeldOutEdit],
        options: &EvalOptions,
        progress: &mut dyn FnMut(EvalProgress<'_>),
    ) -> Result<EvalRun> {
        let order = options.run_order();
        self.check(set, edits, options, &order)?;
        self.warm_up(set, edits, options, &order)?;
        let mut run = EvalRun {
            schedules: order.iter().map(|s| s.to_string()).collect(),
            records: Vec::new(),
            worst: vec![Vec::new(); order.len()],
        };
        for (i, edit) in edits.iter().enumerate() {
            let images = set.load(edit)?;
            let mut baseline: Option<RgbImage> = None;
            for (k, spec) in order.iter().enumerate() {
                let (record, output) = self.run_one(set, edit, &images, spec, options, baseline.as_ref())?;
                progress(EvalProgress { edit: i, edits: edits.len(), record: &record });
                keep_worst(&mut run.worst[k], &record, &images, &output, options.worst_cases);
                run.records.push(record);
                baseline.get_or_insert(output);
            }
        }
        Ok(run)
    }

    /// Refuses a selection without a pipeline for one of its variants, and schedules that do not fit a pipeline.
    fn check(
        &mut self,
        set: &HeldOutSet,
        edits: &[&HeldOutEdit],
        options: &EvalOptions,
        order: &[ScheduleSpec],
    ) -> Result<()> {
        let mut variants: Vec<SetVariant> = edits.iter().map(|e| e.variant).collect();
        variants.sort();
        variants.dedup();
        for v in variants {
            let max_images =
                edits.iter().filter(|e| e.variant == v).map(|e| e.sources.len()).max().unwrap_or(1);
            let layers = self.pipe(v.pipeline_variant())?.transformer().config.num_layers;
            let first = edits.iter().find(|e| e.variant == v).expect("a variant of the selection");
            for spec in order {
                let concrete = set.schedule_for(spec, first)?;
                qwen_image_pipeline::check_schedule(&concrete, options.steps, layers, max_images)
                    .map_err(|e| EvalError::Invalid(format!("schedule `{spec}`: {e}")))?;
            }
        }
        Ok(())
    }

    /// `options.warmup` untimed runs of the first edit of each variant under each schedule.
    fn warm_up(
        &mut self,
        set: &HeldOutSet,
        edits: &[&HeldOutEdit],
        options: &EvalOptions,
        order: &[ScheduleSpec],
    ) -> Result<()> {
        if options.warmup == 0 {
            return Ok(());
        }
        for v in [SetVariant::Edit, SetVariant::Plus] {
            let Some(edit) = edits.iter().find(|e| e.variant == v) else { continue };
            let request = request(edit, set.load(edit)?, options);
            let pipe = self.pipe(v.pipeline_variant())?;
            for _ in 0..options.warmup {
                for spec in order {
                    pipe.edit(&request, &set.schedule_for(spec, edit)?, &mut NoProgress)?;
                }
            }
        }
        Ok(())
    }

    /// One edit under one schedule, scored; returns the record and the output image.
    fn run_one(
        &mut self,
        set: &HeldOutSet,
        edit: &HeldOutEdit,
        images: &EditImages,
        spec: &ScheduleSpec,
        options: &EvalOptions,
        baseline: Option<&RgbImage>,
    ) -> Result<(EditRecord, RgbImage)> {
        let request = request(edit, images.clone(), options);
        let pipe = self.pipe(edit.variant.pipeline_variant())?;
        let out = pipe.edit(&request, &set.schedule_for(spec, edit)?, &mut NoProgress)?;
        let flops = executed_flops_per_step(&pipe.transformer().config, &out.report);
        let truth = score_against_truth(&out.image, &images.target, &images.mask, edit.core_rgb)?;
        let drift = baseline.map(|b| drift_from_baseline(&out.image, b)).transpose()?;
        let record = EditRecord {
            id: edit.id.clone(),
            variant: edit.variant,
            task: edit.task.clone(),
            schedule: spec.to_string(),
            seed: request.seed,
            truth,
            drift,
            seconds: out.report.total_seconds,
            denoise_seconds: out.report.stage_seconds(Stage::Denoise),
            dit_flops_per_step: flops,
        };
        Ok((record, out.image))
    }
}

/// Parses a comma-separated list of schedules in the spec syntax of `--schedule`; a part that starts with a digit
/// continues the previous spec (`none,cat,reuse:2,3,4,cat/recompute` is four schedules).
pub fn parse_schedules(list: &str) -> Result<Vec<ScheduleSpec>> {
    let mut parts: Vec<String> = Vec::new();
    for part in list.split(',').map(str::trim) {
        match parts.last_mut() {
            Some(last) if part.starts_with(|c: char| c.is_ascii_digit()) => {
                last.push(',');
                last.push_str(part);
            }
            _ if part.is_empty() => {
                return Err(EvalError::Invalid(format!("empty schedule in the list `{list}`")));
            }
            _ => parts.push(part.to_string()),
        }
    }
    parts
        .iter()
        .map(|p| p.parse::<ScheduleSpec>().map_err(|e| EvalError::Invalid(format!("schedule `{p}`: {e}"))))
        .collect()
}

/// The request of a held-out edit.
fn request(edit: &HeldOutEdit, images: EditImages, options: &EvalOptions) -> EditRequest {
    let mut request = EditRequest::new(images.sources, edit.instruction.clone());
    request.num_steps = options.steps;
    request.seed = options.seed.wrapping_add(edit.index as u64);
    request.true_cfg_scale = options.cfg;
    request.negative_prompt = (options.cfg > 1.0).then(|| " ".to_string());
    request.areas = options.areas;
    request.guardrail = options.guardrail;
    request
}

/// Adds `record` to the worst cases `list` (worst first, at most `keep`).
fn keep_worst(
    list: &mut Vec<WorstCase>,
    record: &EditRecord,
    images: &EditImages,
    output: &RgbImage,
    keep: usize,
) {
    if keep == 0 {
        return;
    }
    let key = record.badness_key();
    let worse_than = |w: &WorstCase| key < w.record.badness_key();
    if list.len() == keep && !list.last().is_some_and(worse_than) {
        return;
    }
    let at = list.iter().position(worse_than).unwrap_or(list.len());
    list.insert(
        at,
        WorstCase {
            record: record.clone(),
            source: images.sources.last().cloned().unwrap_or_default(),
            target: images.target.clone(),
            output: output.clone(),
        },
    );
    list.truncate(keep);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_lists_keep_reuse_steps_together() {
        let names = |s: &str| parse_schedules(s).unwrap().iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names("none,cat,reuse:2,3,4,cat/recompute"),
            ["none", "cat", "reuse:2,3,4", "cat/recompute"]
        );
        assert_eq!(names(" cat@1-4 , reuse:2 "), ["cat@1-4", "reuse:2"]);
        assert!(parse_schedules("none,,cat").unwrap_err().to_string().contains("empty schedule"));
        assert!(parse_schedules("none,purple").unwrap_err().to_string().contains("schedule `purple`"));
        let options = EvalOptions::new(parse_schedules("cat,none,cat").unwrap());
        assert_eq!(options.run_order().len(), 2);
        assert_eq!(options.run_order()[0], ScheduleSpec::None);
    }
}
