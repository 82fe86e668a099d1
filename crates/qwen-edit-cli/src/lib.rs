//! The `qwen-edit` command line tool as a library: [`run`] takes parsed [`args::Args`] and does what the binary
//! does (the binary is `parse → run → exit code`). Everything numeric lives in `qwen-image-pipeline`; this crate
//! only resolves files, calls the pipeline, writes images and reports, and formats tables.
//!
//! How to use: `qwen-edit --demo`, `qwen-edit -i input.png -p "Make it purple"`, `qwen-edit --help`.

pub mod args;
pub mod output;
pub mod progress;

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use qwen_image::{ops::QwenBackend, processor::RgbImage, text_encoder::PositionMode};
use qwen_image_pipeline::{
    demo, metrics, EditOutput, EditReport, EditRequest, ImageAreas, LoadOptions, LoraOption,
    QwenImageEditPipeline, SchedulerChoice, Snapshot,
};
use qwen_image_pruning::{dry_run, ScheduleSpec, TokenLayout};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::args::{Args, Device, Dtype, SchedulerArg, TextPositions};
use crate::output::{timestamp, OutputNames};
use crate::progress::Bars;

/// Errors of the CLI: the library's typed errors, or a message.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the command described by `args`, writing human-readable output to `out`.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), CliError> {
    match args.device {
        Device::Cpu => run_on::<qwen_image::CpuBackend>(args, &Default::default(), out),
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            {
                run_on::<qwen_image::cuda::CudaBackend>(args, &qwen_image::cuda::CudaDevice::new(0), out)
            }
            #[cfg(not(feature = "cuda"))]
            {
                Err("--device cuda needs a build with CUDA support: \
                     cargo build --release -p qwen-edit-cli --features cuda"
                    .into())
            }
        }
    }
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
    schedule: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

/// One edit to run: its inputs (loaded), request and schedule.
struct Job {
    inputs: Vec<String>,
    request: EditRequest,
    schedule: ScheduleSpec,
}

fn read_batch(path: &Path) -> Result<Vec<BatchLine>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the batch file {}: {e}", path.display()))?;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let l: BatchLine =
            serde_json::from_str(line).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?;
        lines.push(l);
    }
    if lines.is_empty() {
        return Err(format!("the batch file {} holds no edits", path.display()).into());
    }
    Ok(lines)
}

fn load_images(paths: &[PathBuf]) -> Result<Vec<RgbImage>, CliError> {
    paths
        .iter()
        .map(|p| qwen_image::processor::load_image(p).map_err(|e| format!("input image: {e}").into()))
        .collect()
}

/// Checks what can be checked before the weights are read: prompt, steps, schedule structure.
fn precheck(
    prompt: &str,
    steps: usize,
    schedule: &ScheduleSpec,
    images: usize,
    layers: usize,
) -> Result<(), CliError> {
    if prompt.trim().is_empty() {
        return Err("the prompt is empty (-p \"…\")".into());
    }
    if steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    let sigmas: Vec<f32> = (0..=steps).map(|i| 1.0 - i as f32 / steps as f32).collect();
    let mut s = schedule.build()?;
    dry_run(s.as_mut(), &sigmas, layers, &TokenLayout::new(1, 1, vec![1; images]))
        .map_err(|e| format!("schedule `{schedule}`: {e}"))?;
    Ok(())
}

fn run_on<B: QwenBackend>(args: &Args, device: &B::Device, out: &mut dyn Write) -> Result<(), CliError> {
    if args.cfg < 0.0 || !args.cfg.is_finite() {
        return Err(format!("--cfg {} must be ≥ 0", args.cfg).into());
    }
    // The model: the built-in demo snapshot or the user's.
    let (snapshot_dir, areas, demo_dir) = if args.demo {
        let dir = std::env::temp_dir().join(format!("qwen-edit-demo-{}", std::process::id()));
        let root = demo::write_demo_snapshot(&dir)?;
        (root.to_string_lossy().into_owned(), demo::demo_areas(), Some(dir))
    } else {
        (args.model.clone(), ImageAreas::default(), None)
    };
    let areas = ImageAreas {
        vae: args.vae_area.unwrap_or(areas.vae),
        condition: args.condition_area.unwrap_or(areas.condition),
    };
    let result = run_model::<B>(args, device, out, &snapshot_dir, areas);
    if let Some(dir) = demo_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn run_model<B: QwenBackend>(
    args: &Args,
    device: &B::Device,
    out: &mut dyn Write,
    model: &str,
    areas: ImageAreas,
) -> Result<(), CliError> {
    let snapshot = Snapshot::locate(model)?;
    let layers =
        qwen_image::dit::DitConfig::from_file(&snapshot.root.join("transformer/config.json"))?.num_layers;

    // Build (and check) every job before loading weights.
    let mut jobs = Vec::new();
    let default_inputs = || -> Result<(Vec<String>, Vec<RgbImage>), CliError> {
        if args.input.is_empty() && args.demo {
            return Ok((vec!["<bundled sample>".into()], vec![demo::sample_image()?]));
        }
        let inputs =
            if args.input.is_empty() { vec![PathBuf::from("input.png")] } else { args.input.clone() };
        Ok((inputs.iter().map(|p| p.display().to_string()).collect(), load_images(&inputs)?))
    };
    let make =
        |inputs: Vec<String>, images: Vec<RgbImage>, line: Option<&BatchLine>| -> Result<Job, CliError> {
            let prompt = line.map_or(args.prompt.clone(), |l| l.prompt.clone());
            let steps = line.and_then(|l| l.steps).unwrap_or(args.steps);
            let cfg = line.and_then(|l| l.cfg).unwrap_or(args.cfg);
            let schedule = match line.and_then(|l| l.schedule.as_deref()) {
                Some(s) => s.parse::<ScheduleSpec>()?,
                None if args.no_pruning => ScheduleSpec::None,
                None => args.schedule.clone(),
            };
            precheck(&prompt, steps, &schedule, images.len(), layers)?;
            let mut request = EditRequest::new(images, prompt);
            request.num_steps = steps;
            request.true_cfg_scale = cfg;
            request.seed = line.and_then(|l| l.seed).unwrap_or(args.seed);
            request.negative_prompt = line
                .and_then(|l| l.negative_prompt.clone())
                .or_else(|| args.negative_prompt.clone())
                .or_else(|| (cfg > 1.0).then(|| " ".to_string()));
            request.width = line.and_then(|l| l.width).or(args.width);
            request.height = line.and_then(|l| l.height).or(args.height);
            request.areas = areas;
            Ok(Job { inputs, request, schedule })
        };
    match &args.batch {
        Some(path) => {
            for line in read_batch(path)? {
                let paths = match &line.input {
                    OneOrMany::One(p) => vec![p.clone()],
                    OneOrMany::Many(v) => v.clone(),
                };
                let images = load_images(&paths)?;
                let names = paths.iter().map(|p| p.display().to_string()).collect();
                jobs.push(make(names, images, Some(&line))?);
            }
        }
        None => {
            let (names, images) = default_inputs()?;
            jobs.push(make(names, images, None)?);
        }
    }

    let dtype = match (args.dtype, args.device) {
        (Some(Dtype::F32), _) | (None, Device::Cpu) => DType::F32,
        (Some(Dtype::Bf16), _) | (None, Device::Cuda) => DType::BF16,
    };
    let scheduler = match (args.scheduler, args.lora.is_empty()) {
        (SchedulerArg::Lightning, _) | (SchedulerArg::Auto, false) => SchedulerChoice::Lightning,
        _ => SchedulerChoice::Snapshot,
    };
    let options = LoadOptions {
        dtype,
        loras: args
            .lora
            .iter()
            .map(|p| LoraOption { path: p.clone(), multiplier: args.lora_scale, merge: true })
            .collect(),
        scheduler,
        text_positions: match args.text_positions {
            TextPositions::Multimodal => PositionMode::Multimodal,
            TextPositions::Sequential => PositionMode::Sequential,
        },
        vae_tiling: args.vae_tiling.then(Default::default),
    };
    if args.demo {
        writeln!(out, "DEMO: a built-in tiny model with RANDOM WEIGHTS on the bundled sample image.")?;
        writeln!(out, "      The output is noise-like by design: this shows the pipeline, pruning and reports, not editing.")?;
    }
    let mut bars = Bars::new(args.quiet);
    let mut pipe = QwenImageEditPipeline::<B>::from_snapshot(snapshot, &options, device, &mut bars)?;
    let load_seconds: f64 = pipe.load_stages().iter().map(|s| s.seconds).sum();
    writeln!(
        out,
        "Loaded {} ({:?}, {:?}) in {:.2} s",
        model_label(args, model),
        pipe.variant(),
        dtype,
        load_seconds
    )?;

    let warmup = args.warmup.unwrap_or(usize::from(args.device == Device::Cuda));
    if let Some(job) = jobs.first().filter(|_| warmup > 0) {
        let mut specs = vec![job.schedule.clone()];
        if args.compare {
            specs = vec![
                ScheduleSpec::None,
                if job.schedule.prunes() { job.schedule.clone() } else { ScheduleSpec::default() },
            ];
        }
        for _ in 0..warmup {
            for spec in &specs {
                edit(&mut pipe, job, spec, &mut bars)?;
            }
        }
        writeln!(
            out,
            "Warm-up: {warmup} untimed run(s) of {}",
            specs.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
        )?;
    }
    std::fs::create_dir_all(&args.output_dir)
        .map_err(|e| format!("cannot create the output folder {}: {e}", args.output_dir.display()))?;
    let names = OutputNames::new(&args.output_dir, timestamp());
    let mut edits = Vec::new();
    let batch = jobs.len() > 1 || args.batch.is_some();
    for (i, job) in jobs.iter().enumerate() {
        let index = batch.then_some(i);
        if batch {
            writeln!(
                out,
                "[{}/{}] {} — \"{}\"",
                i + 1,
                jobs.len(),
                job.inputs.join(", "),
                job.request.prompt
            )?;
        }
        let record = if args.compare {
            compare(&mut pipe, job, &names, index, &mut bars, out)?
        } else {
            single(&mut pipe, job, &names, index, &mut bars, out)?
        };
        edits.push(record);
    }
    let report = json!({
        "model": model_label(args, model),
        "random_weights": args.demo,
        "variant": format!("{:?}", pipe.variant()),
        "device": format!("{:?}", args.device).to_lowercase(),
        "dtype": format!("{dtype:?}"),
        "weights_loaded": 1,
        "warmup_runs": warmup,
        "load_seconds": load_seconds,
        "load_stages": pipe.load_stages(),
        "edits": edits,
    });
    let text = serde_json::to_string_pretty(&report)?;
    let default_report = names.report(None);
    qwen_image::tensor_io::write_atomic(&default_report, text.as_bytes())?;
    writeln!(out, "Report: {}", default_report.display())?;
    if let Some(path) = &args.report {
        qwen_image::tensor_io::write_atomic(path, text.as_bytes())?;
        writeln!(out, "Report: {}", path.display())?;
    }
    Ok(())
}

fn model_label(args: &Args, model: &str) -> String {
    if args.demo {
        "built-in demo model (random weights)".into()
    } else {
        model.to_string()
    }
}

fn edit<B: QwenBackend>(
    pipe: &mut QwenImageEditPipeline<B>,
    job: &Job,
    schedule: &ScheduleSpec,
    bars: &mut Bars,
) -> Result<EditOutput, CliError> {
    Ok(pipe.edit(&job.request, schedule, bars)?)
}

/// A plain run (pruned, or the baseline with `--no-pruning`).
fn single<B: QwenBackend>(
    pipe: &mut QwenImageEditPipeline<B>,
    job: &Job,
    names: &OutputNames,
    index: Option<usize>,
    bars: &mut Bars,
    out: &mut dyn Write,
) -> Result<Value, CliError> {
    let label = if job.schedule.prunes() { "pruning" } else { "baseline" };
    let result = edit(pipe, job, &job.schedule, bars)?;
    let path = names.save(&result.image, label, index)?;
    writeln!(
        out,
        "Inference time: {:.3} s  (schedule {}, {} steps)",
        result.report.total_seconds, result.report.schedule, result.report.num_steps
    )?;
    output::print_report(out, &result.report)?;
    writeln!(out, "Saved {} (and {})", path.display(), names.latest(label).display())?;
    Ok(json!({
        "input": job.inputs,
        "prompt": job.request.prompt,
        "outputs": { label: path },
        "runs": { label: result.report },
    }))
}

/// `--compare`: the baseline and the pruned schedule with the same seed, images, heat map, grid, metrics.
fn compare<B: QwenBackend>(
    pipe: &mut QwenImageEditPipeline<B>,
    job: &Job,
    names: &OutputNames,
    index: Option<usize>,
    bars: &mut Bars,
    out: &mut dyn Write,
) -> Result<Value, CliError> {
    let pruned_spec = if job.schedule.prunes() { job.schedule.clone() } else { ScheduleSpec::default() };
    let base = edit(pipe, job, &ScheduleSpec::None, bars)?;
    let pruned = edit(pipe, job, &pruned_spec, bars)?;
    let (w, h) = base.image.dimensions();
    let psnr = metrics::psnr(base.image.as_raw(), pruned.image.as_raw())?;
    let ssim = metrics::ssim(base.image.as_raw(), pruned.image.as_raw(), w as usize, h as usize, 3)?;
    let heat = RgbImage::from_raw(
        w,
        h,
        metrics::difference_heatmap(base.image.as_raw(), pruned.image.as_raw(), 4.0)?,
    )
    .ok_or("heat map size")?;
    let input = qwen_image::processor::resize(
        &job.request.images[job.request.images.len() - 1],
        w,
        h,
        qwen_image::processor::Filter::Lanczos,
    )?;
    let grid = output::grid(&[&input, &base.image, &pruned.image, &heat]);
    let paths = json!({
        "baseline": names.save(&base.image, "baseline", index)?,
        "pruning": names.save(&pruned.image, "pruning", index)?,
        "difference": names.save_plain(&heat, "diff", index)?,
        "grid": names.save_plain(&grid, "compare", index)?,
    });
    let dn = |r: &EditReport| r.stage_seconds(qwen_image_pipeline::Stage::Denoise);
    let speedup_denoise = dn(&base.report) / dn(&pruned.report).max(1e-12);
    let speedup_total = base.report.total_seconds / pruned.report.total_seconds.max(1e-12);
    output::print_comparison(out, &base.report, &pruned.report, psnr, ssim)?;
    writeln!(out, "Saved baseline, pruned, difference heat map and grid to {}", names.dir().display())?;
    Ok(json!({
        "input": job.inputs,
        "prompt": job.request.prompt,
        "outputs": paths,
        "runs": { "baseline": base.report, "pruning": pruned.report },
        "comparison": {
            "schedule": pruned_spec.to_string(),
            "psnr_db": if psnr.is_finite() { json!(psnr) } else { json!("inf") },
            "ssim": ssim,
            "speedup_denoise": speedup_denoise,
            "speedup_total": speedup_total,
            "cache_peak_bytes": pruned.report.cache_peak_bytes,
        },
    }))
}
