//! Running the jobs of one invocation on one backend, as a list of stages: build and check every job (and stop there
//! with `--dry-run`), load the pipeline once, warm up, run each job (plain, or the baseline and the pruned schedule
//! with `--compare`), write the images and the [`RunReport`].

use std::io::Write;

use qwen_image::{
    dit::{dit_linear_plan, DitLoadOptions},
    ops::QwenBackend,
    processor::RgbImage,
    text_encoder::PositionMode,
};
use qwen_image_pipeline::{
    demo, metrics, plan_request, Comparison, EditOutput, EditRequest, ImageAreas, LoadOptions, MemoryFit,
    MemoryProbe, QwenImageEditPipeline, SchedulerChoice, Snapshot,
};
use qwen_image_pruning::ScheduleSpec;

use crate::args::{Args, Device, SchedulerArg, TextPositions};
use crate::jobs::{self, Job, JobSet};
use crate::output::{self, timestamp, OutputNames};
use crate::progress::Bars;
use crate::report::{FailedJob, JobReport, Outputs, RunReport, Runs};
use crate::{demo_size, memory_check, CliError};

/// Runs `args` on backend `B` (device `device`), reading memory with `probe`.
pub(crate) fn run_on<B: QwenBackend>(
    args: &Args,
    device: &B::Device,
    probe: MemoryProbe,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    // The model: the built-in demo snapshot or the user's.
    let (model, areas, demo_dir) = if args.demo {
        let dir = std::env::temp_dir().join(format!("qwen-edit-demo-{}", std::process::id()));
        let size = demo_size(args);
        // Edit-Plus for two or more `-i` images, as the proxy demo chooses.
        let root = size.write_variant_snapshot(&dir, crate::demo::demo_variant(args))?;
        (root.to_string_lossy().into_owned(), size.areas(), Some(dir))
    } else {
        (args.model.clone(), ImageAreas::default(), None)
    };
    let areas = ImageAreas {
        vae: args.vae_area.unwrap_or(areas.vae),
        condition: args.condition_area.unwrap_or(areas.condition),
    };
    let result = run_model::<B>(args, device, probe, out, &model, areas);
    if let Some(dir) = demo_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// The stages of an invocation on the snapshot `model`.
fn run_model<B: QwenBackend>(
    args: &Args,
    device: &B::Device,
    probe: MemoryProbe,
    out: &mut dyn Write,
    model: &str,
    areas: ImageAreas,
) -> Result<(), CliError> {
    let snapshot = Snapshot::locate(model)?;
    let set = jobs::build(args, areas, &snapshot)?;
    let failed = accept_jobs(args, &set, out)?;
    announce(args, &set.jobs, out)?;
    let options = load_options(args)?;
    let first = set.jobs.first().map(|j| (&j.request, &j.schedule));
    let available = memory_check::available(args, &probe);
    if args.dry_run {
        return dry_run(&snapshot, &options, set.jobs.len(), first, available, out);
    }
    let memory_plan = match first {
        Some((request, schedule)) => {
            let plan = plan_request(&snapshot, request, schedule, &options)?;
            memory_check::check(&plan, &snapshot, &options, (request, schedule), available, out)?;
            Some(plan)
        }
        None => None,
    };
    let mut bars = Bars::new(args.quiet);
    let pipe = load::<B>(args, snapshot, &options, device, probe, &mut bars)?;
    let mut report = loaded(args, model, &pipe, out)?;
    if let Some(plan) = &memory_plan {
        writeln!(out, "First edit's {}", plan.describe())?;
    }
    report.memory_plan = memory_plan;
    report.failed = failed;
    let mut runner = Runner { args, pipe, bars, out };
    report.warmup_runs = runner.warm_up(&set.jobs)?;
    std::fs::create_dir_all(&args.output_dir)
        .map_err(|e| format!("cannot create the output folder {}: {e}", args.output_dir.display()))?;
    let names = OutputNames::new(&args.output_dir, timestamp());
    let outcome = runner.run_jobs(&set.jobs, &names, &mut report);
    finish(args, report, &names, runner.out)?;
    outcome
}

/// The jobs' checks: with bad batch lines, either refuses the whole batch (listing every bad line) or, with
/// `--keep-going`, says which lines are skipped and returns them for the report.
fn accept_jobs(args: &Args, set: &JobSet, out: &mut dyn Write) -> Result<Vec<FailedJob>, CliError> {
    if set.rejected.is_empty() {
        return Ok(Vec::new());
    }
    let file = args.batch.as_ref().map_or(String::new(), |p| p.display().to_string());
    let total = set.jobs.len() + set.rejected.len();
    let lines: Vec<String> = set.rejected.iter().map(|r| format!("  {file} {r}")).collect();
    if !args.keep_going || set.jobs.is_empty() {
        let hint = if set.jobs.is_empty() { "" } else { "; add --keep-going to run the valid ones" };
        return Err(format!(
            "{} of {total} edits of {file} cannot run (nothing was run{hint}):\n{}",
            set.rejected.len(),
            lines.join("\n")
        )
        .into());
    }
    writeln!(out, "Skipping {} of {total} edits of {file} (--keep-going):", set.rejected.len())?;
    for line in &lines {
        writeln!(out, "{line}")?;
    }
    Ok(set.rejected.iter().map(FailedJob::rejected).collect())
}

/// The demo banner, and a warning for each requested size that is rounded.
fn announce(args: &Args, jobs: &[Job], out: &mut dyn Write) -> Result<(), CliError> {
    if args.demo {
        if demo_size(args).random_weights() {
            writeln!(
                out,
                "DEMO: the full-size architecture (20 B DiT, Qwen2.5-VL-7B, VAE) with RANDOM WEIGHTS created on the \
                 device, at 1024² on a square crop of the bundled sample image."
            )?;
        } else {
            writeln!(out, "DEMO: a built-in tiny model with RANDOM WEIGHTS on the bundled sample image.")?;
        }
        writeln!(out, "      The output is noise-like by design: this shows the pipeline, pruning and reports, not editing.")?;
    }
    for job in jobs {
        for adjustment in job.request.size_adjustments() {
            let line = job.line.map_or(String::new(), |l| format!("line {l}: "));
            writeln!(out, "warning: {line}{adjustment}")?;
        }
    }
    Ok(())
}

/// `--dry-run`: what would be loaded (the DiT's layers and their weight bytes, from its config alone) and the memory
/// plan of the first edit, after the edits were checked; with `available` free device memory, whether it fits.
pub(crate) fn dry_run(
    snapshot: &Snapshot,
    options: &LoadOptions,
    edits: usize,
    first: Option<(&EditRequest, &ScheduleSpec)>,
    available: Option<u64>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let options = &options.resolved()?;
    let dit = DitLoadOptions { modulation: options.modulation, fp8: options.fp8.clone() };
    let plan = dit_linear_plan(&snapshot.dit_config()?, options.dtype, &dit)?;
    writeln!(
        out,
        "Dry run: {edits} edit(s) checked against {}; no weights were read.",
        snapshot.root.display()
    )?;
    writeln!(out, "DiT weights: {}", plan.describe())?;
    writeln!(out, "Text encoder weights: {}", text_encoder_weights(options))?;
    if let Some((request, schedule)) = first {
        let memory = plan_request(snapshot, request, schedule, options)?;
        writeln!(out, "First edit's {}", memory.describe())?;
        if let Some(available) = available {
            let fit = MemoryFit::check(&memory, snapshot, request, schedule, options, available)?;
            writeln!(out, "Memory: {}", memory_check::verdict(&fit))?;
        }
    }
    Ok(())
}

/// How the text encoder's weights are held under `options` (printed by `--dry-run` and `eval`).
pub(crate) fn text_encoder_weights(options: &LoadOptions) -> String {
    match options.text_encoder_fp8() {
        Some(_) => {
            "linear layers in FP8 (e4m3, per-channel scales), but for the patch merger and those whose shape \
                    the FP8 GEMM cannot take (docs/fp8.md)"
                .into()
        }
        None => format!("in {:?}", options.dtype),
    }
}

/// The pipeline's load options from the arguments.
fn load_options(args: &Args) -> Result<LoadOptions, CliError> {
    let dtype = crate::dtype_for(args.dtype, args.device);
    let scheduler = match (args.scheduler, args.lora.is_empty()) {
        (SchedulerArg::Lightning, _) | (SchedulerArg::Auto, false) => SchedulerChoice::Lightning,
        _ => SchedulerChoice::Snapshot,
    };
    args.quantize.apply(LoadOptions {
        dtype,
        loras: crate::lora_options(&args.lora, args.lora_scale),
        scheduler,
        text_positions: match args.text_positions {
            TextPositions::Multimodal => PositionMode::Multimodal,
            TextPositions::Sequential => PositionMode::Sequential,
        },
        vae_tiling: args.vae_tiling.then(Default::default),
        modulation: crate::modulation_mode(args.modulation),
        ..LoadOptions::default()
    })
}

/// Loads the pipeline once (random weights for the full-size demo); its reports read memory with `probe`.
fn load<B: QwenBackend>(
    args: &Args,
    snapshot: Snapshot,
    options: &LoadOptions,
    device: &B::Device,
    probe: MemoryProbe,
    bars: &mut Bars,
) -> Result<QwenImageEditPipeline<B>, CliError> {
    let mut pipe = if args.demo && demo_size(args).random_weights() {
        QwenImageEditPipeline::<B>::from_snapshot_random(snapshot, options, 0, device, bars)?
    } else {
        QwenImageEditPipeline::<B>::from_snapshot(snapshot, options, device, bars)?
    };
    pipe.set_memory_probe(probe);
    Ok(pipe)
}

/// Says what was loaded, and starts the report.
fn loaded<B: QwenBackend>(
    args: &Args,
    model: &str,
    pipe: &QwenImageEditPipeline<B>,
    out: &mut dyn Write,
) -> Result<RunReport, CliError> {
    let memory_after_load = pipe.memory_probe().read();
    let load_seconds: f64 = pipe.load_stages().iter().map(|s| s.seconds).sum();
    let label = model_label(args, model);
    let dtype = pipe.options().dtype;
    writeln!(out, "Loaded {label} ({:?}, {dtype:?}) in {load_seconds:.2} s", pipe.variant())?;
    writeln!(out, "Memory after loading: {}", memory_after_load.summary())?;
    let dit_weights = pipe.transformer().linear_weights();
    writeln!(out, "DiT weights: {}", dit_weights.describe())?;
    Ok(RunReport {
        model: label,
        random_weights: args.demo,
        size: args.demo.then(|| format!("{:?}", demo_size(args)).to_lowercase()),
        variant: pipe.variant(),
        device: format!("{:?}", args.device).to_lowercase(),
        dtype: format!("{dtype:?}"),
        weights_loaded: 1,
        warmup_runs: 0,
        load_seconds,
        load_stages: pipe.load_stages().to_vec(),
        memory_after_load,
        dit_weights: Some(dit_weights),
        memory_plan: None,
        loaded_weights: Some(pipe.weight_bytes()),
        repeat: args.repeat,
        memory_growth: None,
        edits: Vec::new(),
        failed: Vec::new(),
    })
}

fn model_label(args: &Args, model: &str) -> String {
    if args.demo && demo_size(args) == demo::DemoSize::Full {
        "built-in full-size demo model (random weights)".into()
    } else if args.demo {
        "built-in demo model (random weights)".into()
    } else {
        model.to_string()
    }
}

/// What every job run uses: the loaded pipeline, the progress bars and the text output.
struct Runner<'a, B: QwenBackend> {
    args: &'a Args,
    pipe: QwenImageEditPipeline<B>,
    bars: Bars,
    out: &'a mut dyn Write,
}

impl<B: QwenBackend> Runner<'_, B> {
    /// Untimed runs of the first job (each schedule it will run), so that one-time costs stay out of the timings;
    /// returns how many. A failing warm-up is reported and skipped with `--keep-going` (the job fails again later).
    fn warm_up(&mut self, jobs: &[Job]) -> Result<usize, CliError> {
        let args = self.args;
        let warmup = args.warmup.unwrap_or(usize::from(args.device == Device::Cuda));
        let Some(job) = jobs.first().filter(|_| warmup > 0) else {
            return Ok(0);
        };
        let specs = if args.compare {
            vec![ScheduleSpec::None, job.pruned_schedule()]
        } else {
            vec![job.schedule.clone()]
        };
        for _ in 0..warmup {
            for spec in &specs {
                match self.pipe.edit(&job.request, spec, &mut self.bars) {
                    Ok(_) => {}
                    Err(e) if args.keep_going => {
                        writeln!(self.out, "Warm-up failed ({e}); continuing without it")?;
                        return Ok(0);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let names: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        writeln!(self.out, "Warm-up: {warmup} untimed run(s) of {}", names.join(", "))?;
        Ok(warmup)
    }

    /// Runs every job `--repeat` times, adding each run to `report`. A failing job stops the run, or, with
    /// `--keep-going`, is recorded and the next job runs. Errors (after the report is complete) when any job failed.
    fn run_jobs(
        &mut self,
        jobs: &[Job],
        names: &OutputNames,
        report: &mut RunReport,
    ) -> Result<(), CliError> {
        let args = self.args;
        let batch = jobs.len() > 1 || args.batch.is_some();
        let numbered = batch || args.repeat > 1;
        for (i, job) in jobs.iter().enumerate() {
            if batch {
                let inputs = job.inputs.join(", ");
                writeln!(self.out, "[{}/{}] {inputs} — \"{}\"", i + 1, jobs.len(), job.request.prompt)?;
            }
            for r in 0..args.repeat {
                if args.repeat > 1 {
                    writeln!(self.out, "-- run {}/{}", r + 1, args.repeat)?;
                }
                let index = numbered.then_some(i * args.repeat + r);
                let result = if args.compare {
                    self.compare(job, names, index)
                } else {
                    self.single(job, names, index)
                };
                match result {
                    Ok(done) => {
                        let memory = done.runs.last().and_then(|r| r.memory).unwrap_or_default();
                        writeln!(self.out, "Memory after the edit: {}", memory.summary())?;
                        report.edits.push(JobReport { run: r + 1, ..done });
                    }
                    Err(e) => {
                        report.failed.push(FailedJob::at_run_time(job, &e));
                        if !args.keep_going {
                            return Err(e);
                        }
                        writeln!(self.out, "Failed: {e}")?;
                        break;
                    }
                }
            }
        }
        let rejected = report.failed.iter().filter(|f| f.before_loading).count();
        match report.failed.len() {
            0 => Ok(()),
            n => Err(format!(
                "{n} of {} edits did not run (listed under `failed` in the report)",
                jobs.len() + rejected
            )
            .into()),
        }
    }

    /// A plain run (pruned, or the baseline with `--no-pruning`).
    fn single(
        &mut self,
        job: &Job,
        names: &OutputNames,
        index: Option<usize>,
    ) -> Result<JobReport, CliError> {
        let pruned = job.schedule.prunes();
        let label = if pruned { "pruning" } else { "baseline" };
        let result = self.pipe.edit(&job.request, &job.schedule, &mut self.bars)?;
        let path = names.save(&result.image, label, index)?;
        let r = &result.report;
        let out = &mut *self.out;
        writeln!(
            out,
            "Inference time: {:.3} s  (schedule {}, {} steps)",
            r.total_seconds, r.schedule, r.num_steps
        )?;
        output::print_report(out, r)?;
        writeln!(out, "Saved {} (and {})", path.display(), names.latest(label).display())?;
        let mut report = job_report(job);
        if pruned {
            (report.outputs.pruning, report.runs.pruning) = (Some(path), Some(result.report));
        } else {
            (report.outputs.baseline, report.runs.baseline) = (Some(path), Some(result.report));
        }
        Ok(report)
    }

    /// `--compare`: the baseline and the pruned schedule with the same seed, images, heat map, grid, metrics.
    fn compare(
        &mut self,
        job: &Job,
        names: &OutputNames,
        index: Option<usize>,
    ) -> Result<JobReport, CliError> {
        let base = self.pipe.edit(&job.request, &ScheduleSpec::None, &mut self.bars)?;
        let mut pruned = self.pipe.edit(&job.request, &job.pruned_schedule(), &mut self.bars)?;
        let comparison = Comparison::between(&base, &pruned)?;
        let (heat, grid) = comparison_images(job, &base, &pruned)?;
        let mut report = job_report(job);
        report.outputs = Outputs {
            baseline: Some(names.save(&base.image, "baseline", index)?),
            pruning: Some(names.save(&pruned.image, "pruning", index)?),
            difference: Some(names.save_plain(&heat, "diff", index)?),
            grid: Some(names.save_plain(&grid, "compare", index)?),
        };
        output::print_comparison(self.out, &base.report, &pruned.report, &comparison)?;
        writeln!(
            self.out,
            "Saved baseline, pruned, difference heat map and grid to {}",
            names.dir().display()
        )?;
        pruned.report.comparison = Some(comparison);
        report.runs = Runs { baseline: Some(base.report), pruning: Some(pruned.report) };
        Ok(report)
    }
}

/// The `--repeat` table and the report files.
fn finish(
    args: &Args,
    mut report: RunReport,
    names: &OutputNames,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    report.finish();
    if args.repeat > 1 {
        output::print_memory_table(out, &report.memory_by_run())?;
    }
    let default_report = names.report(None);
    let mut paths = vec![default_report.as_path()];
    paths.extend(args.report.as_deref());
    report.write(&paths)?;
    for path in paths {
        writeln!(out, "Report: {}", path.display())?;
    }
    Ok(())
}

/// The start of a job's report: its line, inputs and prompt (outputs and runs filled by the caller).
fn job_report(job: &Job) -> JobReport {
    JobReport {
        line: job.line,
        input: job.inputs.clone(),
        prompt: job.request.prompt.clone(),
        run: 1,
        outputs: Outputs::default(),
        runs: Runs::default(),
    }
}

/// The difference heat map of two edits, and the grid input | baseline | pruned | heat map.
fn comparison_images(
    job: &Job,
    base: &EditOutput,
    pruned: &EditOutput,
) -> Result<(RgbImage, RgbImage), CliError> {
    let (w, h) = base.image.dimensions();
    let heat = RgbImage::from_raw(
        w,
        h,
        metrics::difference_heatmap(base.image.as_raw(), pruned.image.as_raw(), 4.0)?,
    )
    .ok_or("heat map size")?;
    let last = &job.request.images[job.request.images.len() - 1];
    let input = qwen_image::processor::resize(last, w, h, qwen_image::processor::Filter::Lanczos)?;
    let grid = output::grid(&[&input, &base.image, &pruned.image, &heat]);
    Ok((heat, grid))
}
