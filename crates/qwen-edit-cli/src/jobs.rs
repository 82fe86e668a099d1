//! The edits of one invocation ([`Job`]s), built from the command line or from a batch file and checked before any
//! weights are loaded.
//!
//! A batch file is JSONL: one edit per line (`{"input": "a.png" or [...], "prompt": "…"}` with optional `seed`,
//! `steps`, `cfg`, `negative_prompt`, `schedule` (the spec grammar, or its JSON form), `width`, `height`); blank
//! lines and lines starting with `#` are skipped. Every line is read and checked (JSON, images, request, schedule),
//! and every bad line is reported at once ([`JobSet::rejected`]), so that one run fixes them all.

use std::fmt;
use std::path::{Path, PathBuf};

use qwen_image::processor::RgbImage;
use qwen_image_pipeline::{check_schedule, demo, EditRequest, ImageAreas, Snapshot};
use qwen_image_pruning::ScheduleSpec;
use serde::Deserialize;

use crate::args::Args;
use crate::CliError;

/// The instruction when `-p` is not given.
pub const DEFAULT_PROMPT: &str = "Make it purple";

/// One edit to run: its inputs (loaded), request and schedule.
#[derive(Clone, Debug)]
pub struct Job {
    /// The 1-based line of the batch file it comes from (`None` for the command line's edit).
    pub line: Option<usize>,
    /// The input images' names, for reports.
    pub inputs: Vec<String>,
    /// The request (images loaded, checked).
    pub request: EditRequest,
    /// The pruning schedule asked for.
    pub schedule: ScheduleSpec,
}

impl Job {
    /// The schedule of the pruned run under `--compare`: the job's, or the default one when it does not prune.
    pub fn pruned_schedule(&self) -> ScheduleSpec {
        if self.schedule.prunes() {
            self.schedule.clone()
        } else {
            ScheduleSpec::default()
        }
    }
}

/// A batch line that cannot run, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RejectedLine {
    /// The 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub error: String,
}

impl fmt::Display for RejectedLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.error)
    }
}

/// The jobs of one invocation: those that passed every check, and the batch lines that did not.
#[derive(Clone, Debug, Default)]
pub struct JobSet {
    /// The jobs to run, in order.
    pub jobs: Vec<Job>,
    /// Batch lines refused before loading (always empty for the command line's single edit, whose errors are
    /// returned directly).
    pub rejected: Vec<RejectedLine>,
}

/// One edit of a batch file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    input: OneOrMany,
    prompt: String,
    seed: Option<u64>,
    steps: Option<usize>,
    cfg: Option<f32>,
    negative_prompt: Option<String>,
    schedule: Option<ScheduleField>,
    width: Option<u32>,
    height: Option<u32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

/// A schedule as the spec grammar (`"reuse:2,3"`) or its JSON form (`{"type": "reuse", "steps": [2, 3]}`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum ScheduleField {
    Text(String),
    Spec(ScheduleSpec),
}

/// Builds and checks the jobs of `args` for the model in `snapshot` (its variant and depth), with image `areas`.
///
/// The command line's single edit fails with its error; a batch file fails only when it cannot be read or holds no
/// edits, and otherwise returns its bad lines in [`JobSet::rejected`].
pub fn build(args: &Args, areas: ImageAreas, snapshot: &Snapshot) -> Result<JobSet, CliError> {
    let builder = JobBuilder { args, areas, snapshot, num_layers: snapshot.dit_config()?.num_layers };
    let Some(path) = &args.batch else {
        let (names, images) = builder.default_inputs()?;
        return Ok(JobSet { jobs: vec![builder.job(None, names, images, None)?], rejected: Vec::new() });
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the batch file {}: {e}", path.display()))?;
    let mut set = JobSet::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        match builder.batch_job(i + 1, line) {
            Ok(job) => set.jobs.push(job),
            Err(e) => set.rejected.push(RejectedLine { line: i + 1, error: e.to_string() }),
        }
    }
    if set.jobs.is_empty() && set.rejected.is_empty() {
        return Err(format!("the batch file {} holds no edits", path.display()).into());
    }
    Ok(set)
}

/// What every job is built from.
struct JobBuilder<'a> {
    args: &'a Args,
    areas: ImageAreas,
    snapshot: &'a Snapshot,
    num_layers: usize,
}

impl JobBuilder<'_> {
    /// The command line's images: `-i`, else the bundled sample with `--demo`, else `input.png`.
    fn default_inputs(&self) -> Result<(Vec<String>, Vec<RgbImage>), CliError> {
        let args = self.args;
        if args.input.is_empty() && args.demo {
            let size = crate::demo_size(args);
            let name = if size == demo::DemoSize::Full {
                "<bundled sample, square crop>"
            } else {
                "<bundled sample>"
            };
            return Ok((vec![name.into()], vec![size.sample_image()?]));
        }
        let inputs =
            if args.input.is_empty() { vec![PathBuf::from("input.png")] } else { args.input.clone() };
        Ok((names(&inputs), load_images(&inputs)?))
    }

    /// The job of batch line `line` (1-based) with the text `text`.
    fn batch_job(&self, line: usize, text: &str) -> Result<Job, CliError> {
        let l: BatchLine = serde_json::from_str(text).map_err(|e| format!("not a valid edit: {e}"))?;
        let paths = match &l.input {
            OneOrMany::One(p) => vec![p.clone()],
            OneOrMany::Many(v) => v.clone(),
        };
        self.job(Some(line), names(&paths), load_images(&paths)?, Some(&l))
    }

    /// A job from the command line's options, overridden by a batch line's, checked against the model.
    fn job(
        &self,
        line_number: Option<usize>,
        inputs: Vec<String>,
        images: Vec<RgbImage>,
        line: Option<&BatchLine>,
    ) -> Result<Job, CliError> {
        let args = self.args;
        let schedule = match line.and_then(|l| l.schedule.clone()) {
            Some(ScheduleField::Text(s)) => s.parse::<ScheduleSpec>()?,
            Some(ScheduleField::Spec(spec)) => spec,
            None if args.no_pruning => ScheduleSpec::None,
            None => match &args.mask {
                Some(path) => format!("mask:{}", path.display()).parse::<ScheduleSpec>()?,
                None => args.schedule.clone(),
            },
        };
        let cfg = line.and_then(|l| l.cfg).unwrap_or(args.cfg);
        let prompt = line.map_or_else(|| args.prompt_or(DEFAULT_PROMPT).to_string(), |l| l.prompt.clone());
        let mut request = EditRequest::new(images, prompt);
        request.num_steps = line.and_then(|l| l.steps).unwrap_or(args.steps);
        request.true_cfg_scale = cfg;
        request.seed = line.and_then(|l| l.seed).unwrap_or(args.seed);
        request.negative_prompt = line
            .and_then(|l| l.negative_prompt.clone())
            .or_else(|| args.negative_prompt.clone())
            .or_else(|| (cfg > 1.0).then(|| " ".to_string()));
        request.width = line.and_then(|l| l.width).or(args.width);
        request.height = line.and_then(|l| l.height).or(args.height);
        request.areas = self.areas;
        request.cache_budget = args.cache_budget;
        request.guardrail = args.guardrail;
        request.validate(self.snapshot.variant)?;
        check_schedule(&schedule, request.num_steps, self.num_layers, request.images.len())
            .map_err(|e| format!("schedule `{schedule}`: {e}"))?;
        Ok(Job { line: line_number, inputs, request, schedule })
    }
}

fn names(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.display().to_string()).collect()
}

fn load_images(paths: &[PathBuf]) -> Result<Vec<RgbImage>, CliError> {
    paths.iter().map(|p| load_image(p)).collect()
}

fn load_image(path: &Path) -> Result<RgbImage, CliError> {
    qwen_image::processor::load_image(path).map_err(|e| format!("input image: {e}").into())
}
