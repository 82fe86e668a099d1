//! `qwen-edit --demo` with the trained proxy model (crate `qwen-image-proxy`): a real edit of a held-out scene with
//! its instruction (or of the user's `-i` images with `-p`), a before/after grid, and, for a held-out scene, the
//! score against its ground truth.
//!
//! The model and its settings are [`DemoModel`]'s (crate `qwen-image-proxy`), as for `qwen-edit serve --demo`.
//!
//! The stages: the inputs (scene or files) and the request, checked; the embedded snapshot written to a temporary
//! folder and loaded; the edit (and the unpruned baseline with `--compare`); the images, the grid and the report.

use std::io::Write;
use std::path::PathBuf;

use qwen_image::{ops::QwenBackend, processor::RgbImage};
use qwen_image_eval::score::{score_against_truth, TruthScore};
use qwen_image_pipeline::{
    check_schedule, EditOutput, EditRequest, QwenImageEditPipeline, Snapshot, Variant,
};
use qwen_image_proxy::{DemoModel, Scene};
use qwen_image_pruning::ScheduleSpec;

use crate::args::{Args, DemoSizeArg, VariantArg};
use crate::output::{self, timestamp, OutputNames};
use crate::progress::Bars;
use crate::CliError;

/// What the demo edits: the request, where its inputs come from, and the scene when it is a held-out one.
struct DemoInput {
    request: EditRequest,
    inputs: Vec<String>,
    scene: Option<&'static Scene>,
    schedule: ScheduleSpec,
}

/// The demo model of `--demo`: the proxy of the inputs' variant (Edit-Plus for two or more `-i` images, else
/// Edit) when this build bundles it, else the tiny random-weight model; with `--size proxy`, the proxy whether
/// bundled or not (its snapshot then says that it is not).
pub(crate) fn demo_model(args: &Args) -> DemoModel {
    let variant = demo_variant(args);
    match args.size {
        Some(DemoSizeArg::Proxy) => DemoModel::Proxy(variant),
        _ => DemoModel::for_variant(variant),
    }
}

/// The variant the demo runs: `--variant`, else Edit-Plus for two or more `-i` images, else Edit.
pub(crate) fn demo_variant(args: &Args) -> Variant {
    match args.variant {
        Some(VariantArg::Edit) => Variant::Edit,
        Some(VariantArg::EditPlus) => Variant::EditPlus,
        None if args.input.len() > 1 => Variant::EditPlus,
        None => Variant::Edit,
    }
}

/// Runs the proxy demo `model` on backend `B`.
pub(crate) fn run_proxy<B: QwenBackend>(
    args: &Args,
    model: DemoModel,
    device: &B::Device,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    check_args(args)?;
    let input = demo_input(args, model)?;
    input.request.validate(model.variant())?;
    announce(&input, model, out)?;
    let dir = std::env::temp_dir().join(format!("qwen-edit-proxy-{}", std::process::id()));
    let result = load_and_edit::<B>(args, device, &input, model, &dir, out);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Flags the proxy demo does not take.
fn check_args(args: &Args) -> Result<(), CliError> {
    let refuse = |flag: &str| -> Result<(), CliError> {
        Err(format!("{flag} is not available with the proxy demo (use --demo --size tiny, or a model)")
            .into())
    };
    if args.batch.is_some() {
        return refuse("--batch");
    }
    if !args.lora.is_empty() {
        return refuse("--lora");
    }
    if args.repeat > 1 {
        return refuse("--repeat");
    }
    if !args.input.is_empty() && args.prompt.is_none() {
        return Err("--demo with -i needs the instruction: -p \"Make the red circle blue\"".into());
    }
    Ok(())
}

/// The default held-out scene and its instruction, or `-i` with `-p`; the request with `model`'s settings.
fn demo_input(args: &Args, model: DemoModel) -> Result<DemoInput, CliError> {
    let (images, inputs, prompt, scene) = if args.input.is_empty() {
        let scene = qwen_image_proxy::default_scene();
        let prompt = args.prompt_or(scene.instruction).to_string();
        let known = (prompt == scene.instruction).then_some(scene);
        (vec![scene.source()?], vec![format!("<held-out scene {}>", scene.id)], prompt, known)
    } else {
        let images = args
            .input
            .iter()
            .map(|p| qwen_image::processor::load_image(p).map_err(|e| format!("input image: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let names = args.input.iter().map(|p| p.display().to_string()).collect();
        (images, names, args.prompt_or("").to_string(), None)
    };
    let mut request = model.request(images, prompt);
    request.num_steps = args.steps;
    request.seed = args.seed;
    request.true_cfg_scale = args.cfg;
    request.negative_prompt = args.negative_prompt.clone().or_else(|| (args.cfg > 1.0).then(|| " ".into()));
    request.areas.vae = args.vae_area.unwrap_or(request.areas.vae);
    request.areas.condition = args.condition_area.unwrap_or(request.areas.condition);
    request.width = args.width;
    request.height = args.height;
    let schedule = if args.no_pruning { ScheduleSpec::None } else { args.schedule.clone() };
    Ok(DemoInput { request, inputs, scene, schedule })
}

fn announce(input: &DemoInput, model: DemoModel, out: &mut dyn Write) -> Result<(), CliError> {
    writeln!(out, "DEMO: {} (docs/quality.md)", model.describe())?;
    writeln!(out, "Input: {}", input.inputs.join(", "))?;
    writeln!(out, "Instruction: \"{}\"", input.request.prompt)?;
    Ok(())
}

/// Writes and loads the snapshot, runs the edit (and the baseline with `--compare`), writes the results.
fn load_and_edit<B: QwenBackend>(
    args: &Args,
    device: &B::Device,
    input: &DemoInput,
    model: DemoModel,
    dir: &std::path::Path,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let root = model.write_snapshot(dir)?;
    let snapshot = Snapshot::open(&root)?;
    let layers = snapshot.dit_config()?.num_layers;
    check_schedule(&input.schedule, input.request.num_steps, layers, input.request.images.len())
        .map_err(|e| format!("schedule `{}`: {e}", input.schedule))?;
    let options = args.quantize.apply(model.load_options(crate::dtype_for(args.dtype, args.device)))?;
    if args.dry_run {
        let first = Some((&input.request, &input.schedule));
        return crate::run::dry_run(&snapshot, &options, 1, first, args.device_memory, out);
    }
    let mut bars = Bars::new(args.quiet);
    let mut pipe = QwenImageEditPipeline::<B>::from_snapshot(snapshot, &options, device, &mut bars)?;
    let baseline = if args.compare && input.schedule.prunes() {
        Some(pipe.edit(&input.request, &ScheduleSpec::None, &mut bars)?)
    } else {
        None
    };
    let edited = pipe.edit(&input.request, &input.schedule, &mut bars)?;
    let r = &edited.report;
    writeln!(out, "Edit time: {:.3} s  (schedule {}, {} steps)", r.total_seconds, r.schedule, r.num_steps)?;
    output::print_report(out, r)?;
    let score = input.scene.map(|s| scene_score(s, &edited.image)).transpose()?;
    if let Some(s) = &score {
        print_score(out, s)?;
    }
    let paths = save(args, input, &edited, baseline.as_ref())?;
    for p in &paths {
        writeln!(out, "Saved {}", p.display())?;
    }
    let mut columns = before_labels(input.request.images.len());
    columns.extend(baseline.as_ref().map(|_| "unpruned".to_string()));
    columns.push("after".to_string());
    columns.extend(input.scene.map(|_| "ground truth".to_string()));
    writeln!(out, "Grid: {}", columns.join(" | "))?;
    Ok(())
}

/// The grid's labels of the `n` input images: `before` for one, `picture 1`, `picture 2`, … for several.
fn before_labels(n: usize) -> Vec<String> {
    if n == 1 {
        vec!["before".to_string()]
    } else {
        (1..=n).map(|k| format!("picture {k}")).collect()
    }
}

/// The output against the scene's ground truth.
fn scene_score(scene: &Scene, output: &RgbImage) -> Result<TruthScore, CliError> {
    Ok(score_against_truth(output, &scene.target()?, &scene.mask()?, scene.core_rgb)?)
}

fn print_score(out: &mut dyn Write, s: &TruthScore) -> Result<(), CliError> {
    writeln!(
        out,
        "Against the ground truth: PSNR {:.2} dB (outside the object {:.2} dB), ΔE of the object's colour {:.1} → {}",
        s.psnr_db,
        s.psnr_outside_db,
        s.delta_e,
        if s.success { "edit correct" } else { "edit NOT correct" }
    )?;
    Ok(())
}

/// Writes the output(s) and the grid `before(s) | [baseline |] after [| ground truth]` (every input image, resized to
/// the output's size); returns the paths written.
fn save(
    args: &Args,
    input: &DemoInput,
    edited: &EditOutput,
    baseline: Option<&EditOutput>,
) -> Result<Vec<PathBuf>, CliError> {
    std::fs::create_dir_all(&args.output_dir)
        .map_err(|e| format!("cannot create the output folder {}: {e}", args.output_dir.display()))?;
    let names = OutputNames::new(&args.output_dir, timestamp());
    let label = if input.schedule.prunes() { "pruning" } else { "baseline" };
    let mut paths = vec![names.save(&edited.image, label, None)?];
    let (w, h) = edited.image.dimensions();
    let befores = input
        .request
        .images
        .iter()
        .map(|im| qwen_image::processor::resize(im, w, h, qwen_image::processor::Filter::Lanczos))
        .collect::<Result<Vec<_>, _>>()?;
    let target = input.scene.map(|s| s.target()).transpose()?;
    let mut cells: Vec<&RgbImage> = befores.iter().collect();
    if let Some(b) = baseline {
        paths.push(names.save(&b.image, "baseline", None)?);
        cells.push(&b.image);
    }
    cells.push(&edited.image);
    cells.extend(target.as_ref());
    let grid = output::grid(&cells);
    paths.push(names.save_plain(&grid, "demo", None)?);
    qwen_image_pipeline::save_image(&grid, &names.latest("demo"))?;
    Ok(paths)
}
