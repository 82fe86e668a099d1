//! `qwen-edit eval`: pruning schedules on the proxy models' held-out set. The evaluation itself is
//! `qwen-image-eval`'s ([`Evaluator`]); this module loads the models, and renders the table, the JSON report and the
//! worst-case grids.

use std::io::Write;
use std::path::PathBuf;

use qwen_image::ops::QwenBackend;
use qwen_image_eval::{
    evaluate::{parse_schedules, EvalProgress},
    grid::worst_case_grid,
    report::{GroupStats, ScheduleSummary},
    EvalOptions, EvalReport, EvalRun, Evaluator, HeldOutSet, Selection, SetVariant,
};
use qwen_image_pipeline::{save_image, MemoryProbe, NoProgress, QwenImageEditPipeline, Snapshot, Variant};
use qwen_image_pruning::ScheduleSpec;

use crate::args::{Device, Dtype, QuantizeArgs};
use crate::{BackendTask, CliError};

/// Arguments of `qwen-edit eval`.
#[derive(Clone, Debug, clap::Args)]
pub struct EvalArgs {
    /// The held-out set's folder (manifest.jsonl and images/).
    #[arg(long, default_value = "tests/fixtures/proxy/heldout")]
    pub heldout: PathBuf,
    /// The schedules, comma-separated in the --schedule syntax; numbers after a `reuse:` belong to it
    /// (`none,cat,reuse:2,3,4,cat/recompute`). `none` always runs first: it is the reference.
    #[arg(long, default_value = "none,cat", value_parser = schedule_list)]
    pub schedules: ScheduleList,
    /// At most this many edits, spread evenly over the (variant, task) groups.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only these tasks, comma-separated (recolor, remove, add, background, paste).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Only this variant's edits: edit, plus, or both.
    #[arg(long, default_value = "both", value_parser = ["edit", "plus", "both"])]
    pub variant: String,
    /// The Edit snapshot folder [default: the embedded trained proxy].
    #[arg(long)]
    pub edit_model: Option<PathBuf>,
    /// The Edit-Plus snapshot folder [default: the embedded trained proxy].
    #[arg(long)]
    pub plus_model: Option<PathBuf>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Weights dtype (default: f32 on the CPU, bf16 on CUDA).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// Quantization of the DiT's weights (compare `--quantize fp8` with a run without it: docs/fp8.md).
    #[command(flatten)]
    pub quantize: QuantizeArgs,
    /// Noise seed of manifest line 0 (line i uses seed + i, the same under every schedule).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Denoising steps.
    #[arg(short = 's', long, default_value_t = 4)]
    pub steps: usize,
    /// True-CFG scale (CFG runs above 1, with the negative prompt " ").
    #[arg(short = 'c', long, default_value_t = 1.0)]
    pub cfg: f32,
    /// Guard reuse by the drift signal in every edit: a reuse step whose velocity changed by more than this runs
    /// again with everything computed (docs/schedules.md, "Guardrail"; its cost shows in the FLOPs column).
    #[arg(long, value_name = "DRIFT")]
    pub guardrail: Option<f32>,
    /// Untimed runs of the first edit per variant and schedule [default: 0 on the CPU, 1 on CUDA].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Worst cases per schedule in the grids.
    #[arg(long, default_value_t = 6)]
    pub worst: usize,
    /// Output folder: `eval_report.json` and `worst_<schedule>.png`.
    #[arg(short = 'o', long = "output-dir", default_value = "outputs_eval")]
    pub output_dir: PathBuf,
    /// No line per edit.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// A parsed `--schedules` list.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleList(
    /// The schedules, in the order given.
    pub Vec<ScheduleSpec>,
);

fn schedule_list(s: &str) -> Result<ScheduleList, String> {
    parse_schedules(s).map(ScheduleList).map_err(|e| e.to_string())
}

/// `qwen-edit eval` as a [`BackendTask`].
pub(crate) struct EvalTask<'a> {
    pub(crate) args: &'a EvalArgs,
    pub(crate) out: &'a mut dyn Write,
}

impl BackendTask for EvalTask<'_> {
    fn run<B: QwenBackend>(self, device: &B::Device, _probe: MemoryProbe) -> Result<(), CliError> {
        let EvalTask { args, out } = self;
        let set = HeldOutSet::open(&args.heldout)?;
        let edits = set.select(&selection(args)?)?;
        let options = options(args);
        let variants: Vec<Variant> = [SetVariant::Edit, SetVariant::Plus]
            .into_iter()
            .filter(|v| edits.iter().any(|e| e.variant == *v))
            .map(SetVariant::pipeline_variant)
            .collect();
        let tmp = std::env::temp_dir().join(format!("qwen-edit-eval-{}", std::process::id()));
        let pipes = variants.iter().map(|&v| load::<B>(args, v, &tmp, device)).collect::<Result<Vec<_>, _>>();
        let _ = std::fs::remove_dir_all(&tmp);
        let pipes = pipes?;
        if args.quantize.quantize != crate::args::QuantizeArg::None || args.quantize.low_memory {
            for pipe in &pipes {
                let weights = pipe.transformer().linear_weights().describe();
                writeln!(out, "{:?} DiT weights: {weights}", pipe.variant())?;
            }
            if let Some(pipe) = pipes.first() {
                writeln!(out, "Text encoder weights: {}", crate::run::text_encoder_weights(pipe.options()))?;
            }
        }
        let names: Vec<String> = options.run_order().iter().map(|s| s.to_string()).collect();
        writeln!(
            out,
            "Evaluating {} held-out edits under {} on {:?}",
            edits.len(),
            names.join(", "),
            args.device
        )?;
        let mut evaluator = Evaluator::new(pipes);
        let quiet = args.quiet;
        let run = evaluator.run(&set, &edits, &options, &mut |p: EvalProgress<'_>| {
            if !quiet {
                // A progress line that cannot be written is not worth stopping the evaluation for.
                let _ = writeln!(out, "{}", progress_line(&p));
            }
        });
        let run = run?;
        let report = run.report(&set, &options);
        print_table(out, &report)?;
        write_outputs(args, &run, &report, out)
    }
}

fn selection(args: &EvalArgs) -> Result<Selection, CliError> {
    let variants = match args.variant.as_str() {
        "both" => Vec::new(),
        v => vec![v.parse::<SetVariant>()?],
    };
    if args.limit == Some(0) {
        return Err("--limit must be at least 1".into());
    }
    Ok(Selection { limit: args.limit, tasks: args.tasks.clone(), variants })
}

fn options(args: &EvalArgs) -> EvalOptions {
    let mut options = EvalOptions::new(args.schedules.0.clone());
    options.seed = args.seed;
    options.steps = args.steps;
    options.cfg = args.cfg;
    options.warmup = args.warmup.unwrap_or(usize::from(args.device == Device::Cuda));
    options.worst_cases = args.worst;
    options.areas = qwen_image_proxy::areas();
    options.guardrail = args.guardrail;
    options
}

/// Loads the pipeline of `variant`: `--edit-model` / `--plus-model`, else the embedded proxy written under `tmp`.
fn load<B: QwenBackend>(
    args: &EvalArgs,
    variant: Variant,
    tmp: &std::path::Path,
    device: &B::Device,
) -> Result<QwenImageEditPipeline<B>, CliError> {
    let given = match variant {
        Variant::Edit => &args.edit_model,
        Variant::EditPlus => &args.plus_model,
    };
    let root = match given {
        Some(path) => path.clone(),
        None => qwen_image_proxy::write_snapshot(variant, tmp).map_err(|e| {
            let flag = if variant == Variant::Edit { "--edit-model" } else { "--plus-model" };
            format!("{e}; pass a snapshot folder with {flag}")
        })?,
    };
    let snapshot = Snapshot::open(&root)?;
    if snapshot.variant != variant {
        return Err(
            format!("{} is a {:?} snapshot, not {variant:?}", root.display(), snapshot.variant).into()
        );
    }
    let options =
        args.quantize.apply(qwen_image_proxy::load_options(crate::dtype_for(args.dtype, args.device)))?;
    Ok(QwenImageEditPipeline::<B>::from_snapshot(snapshot, &options, device, &mut NoProgress)?)
}

fn progress_line(p: &EvalProgress<'_>) -> String {
    let r = p.record;
    let drift = r.drift.map_or(String::new(), |d| format!("  vs none {:.1} dB", d.psnr_db.min(99.9)));
    format!(
        "[{}/{}] {} {:<10} {:<14} {} PSNR {:5.2} dB  ΔE {:5.1}{drift}  {:.2} s",
        p.edit + 1,
        p.edits,
        r.id,
        r.task,
        r.schedule,
        if r.truth.success { "ok  " } else { "FAIL" },
        r.truth.psnr_db,
        r.truth.delta_e,
        r.seconds
    )
}

/// The table: one block per schedule (all edits, then each variant/task group), then speed.
fn print_table(out: &mut dyn Write, report: &EvalReport) -> Result<(), CliError> {
    writeln!(
        out,
        "\n{:<16} {:<17} {:>5} {:>8} {:>7} {:>6} {:>7} {:>7} {:>6} | {:>7} {:>6} {:>4} {:>6}",
        "schedule",
        "group",
        "edits",
        "success",
        "PSNR",
        "SSIM",
        "inside",
        "outside",
        "ΔE",
        "vsPSNR",
        "vsSSIM",
        "max",
        "SSIM2"
    )?;
    for s in &report.schedules {
        for g in std::iter::once(&s.all).chain(&s.groups) {
            print_group(out, s, g)?;
        }
    }
    writeln!(
        out,
        "\n{:<16} {:>20} {:>7} {:>9} {:>8} {:>9} {:>8}",
        "schedule", "DiT GFLOP/step (ran)", "ratio", "seconds", "speed-up", "denoise s", "speed-up"
    )?;
    for s in &report.schedules {
        writeln!(
            out,
            "{:<16} {:>20.3} {:>7.3} {:>9.3} {:>7.2}× {:>9.3} {:>7.2}×",
            s.schedule,
            s.dit_flops_per_step / 1e9,
            s.flops_ratio,
            s.seconds,
            s.speedup,
            s.denoise_seconds,
            s.speedup_denoise
        )?;
    }
    writeln!(
        out,
        "DiT GFLOP/step (ran): the transformer blocks' FLOPs of the plans each edit ran (the tokens its steps \
         computed), per step, averaged over the edits; ratio: against none."
    )?;
    Ok(())
}

fn print_group(out: &mut dyn Write, s: &ScheduleSummary, g: &GroupStats) -> Result<(), CliError> {
    let group = match (&g.variant, &g.task) {
        (Some(v), Some(t)) => format!("{}/{t}", v.name()),
        _ => "all".to_string(),
    };
    let drift = g.drift.map_or(format!("{:>7} {:>6} {:>4} {:>6}", "–", "–", "–", "–"), |d| {
        format!("{:>7.2} {:>6.4} {:>4} {:>6.2}", d.psnr_db, d.ssim, d.max_abs_diff, d.ssimulacra2)
    });
    writeln!(
        out,
        "{:<16} {:<17} {:>5} {:>7.1}% {:>7.2} {:>6.4} {:>7.2} {:>7.2} {:>6.2} | {drift}",
        s.schedule,
        group,
        g.edits,
        100.0 * g.success_rate,
        g.psnr_db,
        g.ssim,
        g.psnr_inside_db,
        g.psnr_outside_db,
        g.delta_e
    )?;
    Ok(())
}

/// `eval_report.json` and one worst-case grid per schedule.
fn write_outputs(
    args: &EvalArgs,
    run: &EvalRun,
    report: &EvalReport,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    std::fs::create_dir_all(&args.output_dir)
        .map_err(|e| format!("cannot create the output folder {}: {e}", args.output_dir.display()))?;
    let json = args.output_dir.join("eval_report.json");
    qwen_image::tensor_io::write_atomic(&json, serde_json::to_string_pretty(report)?.as_bytes())?;
    writeln!(out, "\nReport: {}", json.display())?;
    for (name, cases) in run.schedules.iter().zip(&run.worst) {
        if let Some(grid) = worst_case_grid(cases)? {
            let file: String =
                name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
            let path = args.output_dir.join(format!("worst_{file}.png"));
            save_image(&grid, &path)?;
            writeln!(
                out,
                "Worst cases of {name} (source | ground truth | output | |output − truth|): {}",
                path.display()
            )?;
        }
    }
    Ok(())
}
