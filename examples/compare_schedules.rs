//! Runs several built-in schedules on the same edit and prints time, reuse and quality against the baseline.
//!
//! ```text
//! cargo run --release --example compare_schedules                      # demo model (random weights)
//! cargo run --release --example compare_schedules -- --model DIR --input in.png --steps 4 \
//!     --schedules none,cat,reuse:2,3,4,cat/recompute
//! ```

use std::path::PathBuf;

use clap::Parser;
use qwen_image::{processor::load_image, CpuBackend};
use qwen_image_pipeline::{
    demo, metrics, EditRequest, LoadOptions, NoProgress, QwenImageEditPipeline, Stage,
};
use qwen_image_pruning::ScheduleSpec;

#[derive(Parser)]
#[command(about = "Compare pruning schedules on one edit")]
struct Args {
    /// Snapshot folder or repo id; omitted = the built-in demo model (random weights).
    #[arg(long)]
    model: Option<String>,
    /// Input image; omitted = the bundled sample.
    #[arg(long)]
    input: Option<PathBuf>,
    /// The instruction.
    #[arg(long, default_value = "Make it purple")]
    prompt: String,
    /// Steps.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Schedules, separated by spaces or semicolons.
    #[arg(
        long,
        default_value = "cat;reuse:2,3,4;cat/recompute;cat@1-1;reuse:2,4@0-0",
        value_delimiter = ';'
    )]
    schedules: Vec<ScheduleSpec>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("qwen-compare-schedules-{}", std::process::id()));
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            println!(
                "Built-in demo model: RANDOM WEIGHTS (timings and reuse are real, quality numbers are not)."
            );
            demo::write_demo_snapshot(&dir)?.to_string_lossy().into_owned()
        }
    };
    let mut pipe = QwenImageEditPipeline::<CpuBackend>::load(
        &model,
        &LoadOptions::default(),
        &Default::default(),
        &mut NoProgress,
    )?;
    let image = match &args.input {
        Some(p) => load_image(p)?,
        None => demo::sample_image()?,
    };
    let mut request = EditRequest::new(vec![image], args.prompt.clone());
    request.num_steps = args.steps;
    if args.model.is_none() {
        request.areas = demo::demo_areas();
    }
    let base = pipe.edit(&request, &ScheduleSpec::None, &mut NoProgress)?;
    let base_dn = base.report.stage_seconds(Stage::Denoise);
    let (w, h) = base.image.dimensions();
    println!(
        "{:<24} {:>10} {:>8} {:>12} {:>12} {:>9} {:>7}",
        "schedule", "denoise s", "speedup", "reused tok", "cache peak", "PSNR dB", "SSIM"
    );
    println!(
        "{:<24} {:>10.4} {:>8} {:>12} {:>12} {:>9} {:>7}",
        "none", base_dn, "1.00x", 0, 0, "inf", "1.0000"
    );
    for spec in &args.schedules {
        let out = pipe.edit(&request, spec, &mut NoProgress)?;
        let dn = out.report.stage_seconds(Stage::Denoise);
        let psnr = metrics::psnr(base.image.as_raw(), out.image.as_raw())?;
        let ssim = metrics::ssim(base.image.as_raw(), out.image.as_raw(), w as usize, h as usize, 3)?;
        println!(
            "{:<24} {:>10.4} {:>7.2}x {:>12} {:>12} {:>9.2} {:>7.4}",
            spec.to_string(),
            dn,
            base_dn / dn.max(1e-12),
            out.report.reused_tokens(),
            out.report.cache_peak_bytes,
            psnr,
            ssim
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
