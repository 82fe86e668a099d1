//! The `qwen-edit` command line tool as a library: [`run`] takes parsed [`args::Args`] and does what the binary
//! does (the binary is `parse → run → exit code`). Everything numeric lives in `qwen-image-pipeline`; this crate
//! only resolves files, calls the pipeline, writes images and reports, and formats tables.
//!
//! How to use: `qwen-edit --demo`, `qwen-edit -i input.png -p "Make it purple"`, `qwen-edit --help`; on a GPU,
//! `qwen-edit --demo --size full --device cuda --compare --repeat 10` runs the full-size architecture with random
//! weights and reports the time per stage and the memory after each edit.

pub mod args;
pub mod memory;
pub mod output;
pub mod progress;

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use qwen_image::{dit::ModulationMode, ops::QwenBackend, processor::RgbImage, text_encoder::PositionMode};
use qwen_image_pipeline::{
    demo, metrics, EditOutput, EditReport, EditRequest, ImageAreas, LoadOptions, LoraOption,
    QwenImageEditPipeline, SchedulerChoice, Snapshot,
};
use qwen_image_pruning::{dry_run, ScheduleSpec, TokenLayout};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::args::{Args, DemoSizeArg, Device, Dtype, ModulationArg, SchedulerArg, TextPositions};
use crate::memory::{MemoryProbe, MemoryReading};
use crate::output::{timestamp, OutputNames};
use crate::progress::Bars;

/// Errors of the CLI: the library's typed errors, or a message.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the command described by `args`, writing human-readable output to `out`.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), CliError> {
    check_demo_args(args)?;
    match args.device {
        Device::Cpu => run_on::<qwen_image::CpuBackend>(args, &Default::default(), &MemoryReading::host, out),
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            {
                // burn's own CUDA kernels (VAE, text encoder, reshapes…) are compiled and autotuned on first use:
                // keep them across runs, before the first CUDA tensor exists.
                if let Err(e) = qwen_image::cuda::configure_runtime_caches(None) {
                    eprintln!(
                        "warning: no kernel cache ({e}); burn's CUDA kernels are compiled again in every run"
                    );
                }
                let device = qwen_image::cuda::CudaDevice::new(0);
                let probe = || {
                    let pool = qwen_image::cuda::pool_usage(&device);
                    MemoryReading {
                        device_used_bytes: qwen_image::cuda::device_memory_used(0),
                        pool_in_use_bytes: pool.map(|p| p.0),
                        pool_reserved_bytes: pool.map(|p| p.1),
                        ..MemoryReading::host()
                    }
                };
                run_on::<qwen_image::cuda::CudaBackend>(args, &device, &probe, out)
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

/// The demo size asked for.
fn demo_size(args: &Args) -> demo::DemoSize {
    match args.size {
        Some(DemoSizeArg::Full) => demo::DemoSize::Full,
        Some(DemoSizeArg::Tiny) | None => demo::DemoSize::Tiny,
    }
}

/// `--size`, `--allow-full-on-cpu` and `--repeat`, checked before anything is loaded.
fn check_demo_args(args: &Args) -> Result<(), CliError> {
    if args.size.is_some() && !args.demo {
        return Err("--size chooses the demo model and needs --demo".into());
    }
    if args.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    if demo_size(args) == demo::DemoSize::Full && args.device == Device::Cpu && !args.allow_full_on_cpu {
        return Err(concat!(
            "--demo --size full builds the 20 B-parameter model (~58 GB of bf16 weights, ~80 GB in f32) and is meant ",
            "for a GPU: use --device cuda (a CUDA build). To run it on the CPU anyway (hours per edit), add ",
            "--allow-full-on-cpu"
        )
        .into());
    }
    Ok(())
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

fn run_on<B: QwenBackend>(
    args: &Args,
    device: &B::Device,
    probe: MemoryProbe<'_>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if args.cfg < 0.0 || !args.cfg.is_finite() {
        return Err(format!("--cfg {} must be ≥ 0", args.cfg).into());
    }
    // The model: the built-in demo snapshot or the user's.
    let (snapshot_dir, areas, demo_dir) = if args.demo {
        let dir = std::env::temp_dir().join(format!("qwen-edit-demo-{}", std::process::id()));
        let size = demo_size(args);
        let root = size.write_snapshot(&dir)?;
        (root.to_string_lossy().into_owned(), size.areas(), Some(dir))
    } else {
        (args.model.clone(), ImageAreas::default(), None)
    };
    let areas = ImageAreas {
        vae: args.vae_area.unwrap_or(areas.vae),
        condition: args.condition_area.unwrap_or(areas.condition),
    };
    let result = run_model::<B>(args, device, probe, out, &snapshot_dir, areas);
    if let Some(dir) = demo_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

fn run_model<B: QwenBackend>(
    args: &Args,
    device: &B::Device,
    probe: MemoryProbe<'_>,
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
            let size = demo_size(args);
            let name = if size == demo::DemoSize::Full {
                "<bundled sample, square crop>"
            } else {
                "<bundled sample>"
            };
            return Ok((vec![name.into()], vec![size.sample_image()?]));
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
        modulation: match args.modulation {
            ModulationArg::Table => ModulationMode::Table,
            ModulationArg::Resident => ModulationMode::Resident,
        },
    };
    let random = args.demo && demo_size(args).random_weights();
    if args.demo {
        if random {
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
    let mut bars = Bars::new(args.quiet);
    let mut pipe = if random {
        QwenImageEditPipeline::<B>::from_snapshot_random(snapshot, &options, 0, device, &mut bars)?
    } else {
        QwenImageEditPipeline::<B>::from_snapshot(snapshot, &options, device, &mut bars)?
    };
    let memory_after_load = probe();
    let load_seconds: f64 = pipe.load_stages().iter().map(|s| s.seconds).sum();
    writeln!(
        out,
        "Loaded {} ({:?}, {:?}) in {:.2} s",
        model_label(args, model),
        pipe.variant(),
        dtype,
        load_seconds
    )?;
    writeln!(out, "Memory after loading: {}", memory_after_load.summary())?;

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
    let mut memory = Vec::new();
    let batch = jobs.len() > 1 || args.batch.is_some();
    let numbered = batch || args.repeat > 1;
    for (i, job) in jobs.iter().enumerate() {
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
        for r in 0..args.repeat {
            let index = numbered.then_some(i * args.repeat + r);
            if args.repeat > 1 {
                writeln!(out, "-- run {}/{}", r + 1, args.repeat)?;
            }
            let mut record = if args.compare {
                compare(&mut pipe, job, &names, index, &mut bars, out)?
            } else {
                single(&mut pipe, job, &names, index, &mut bars, out)?
            };
            let reading = probe();
            writeln!(out, "Memory after the edit: {}", reading.summary())?;
            record["run"] = json!(r + 1);
            record["memory"] = json!(reading);
            let seconds: f64 = record["runs"]
                .as_object()
                .map(|runs| runs.values().filter_map(|r| r["total_seconds"].as_f64()).sum())
                .unwrap_or(0.0);
            memory.push((seconds, reading));
            edits.push(record);
        }
    }
    let memory_growth = (memory.len() > 1).then(|| {
        let (first, last) = (&memory[0].1, &memory[memory.len() - 1].1);
        memory::growth(first, last)
    });
    if args.repeat > 1 {
        output::print_memory_table(out, &memory)?;
    }
    let report = json!({
        "model": model_label(args, model),
        "random_weights": args.demo,
        "size": args.demo.then(|| format!("{:?}", demo_size(args)).to_lowercase()),
        "variant": format!("{:?}", pipe.variant()),
        "device": format!("{:?}", args.device).to_lowercase(),
        "dtype": format!("{dtype:?}"),
        "weights_loaded": 1,
        "warmup_runs": warmup,
        "load_seconds": load_seconds,
        "load_stages": pipe.load_stages(),
        "memory_after_load": memory_after_load,
        "repeat": args.repeat,
        "memory_growth": memory_growth,
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
    if args.demo && demo_size(args) == demo::DemoSize::Full {
        "built-in full-size demo model (random weights)".into()
    } else if args.demo {
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
