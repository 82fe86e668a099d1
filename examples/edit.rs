//! One edit through the library: load a snapshot (or the built-in demo model), edit, save, print the report.
//!
//! ```text
//! cargo run --release --example edit                                   # demo model (random weights), bundled image
//! cargo run --release --example edit -- --model Qwen/Qwen-Image-Edit --input in.png --prompt "Make it purple"
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qwen_image::{processor::load_image, CpuBackend};
use qwen_image_pipeline::{demo, save_image, EditRequest, LoadOptions, NoProgress, QwenImageEditPipeline};
use qwen_image_pruning::ScheduleSpec;

#[derive(Parser)]
#[command(about = "Edit an image with Qwen-Image-Edit (the built-in random-weight demo model by default)")]
struct Args {
    /// Snapshot folder or Hugging Face repo id; omitted = the built-in demo model (random weights).
    #[arg(long)]
    model: Option<String>,
    /// Input image; omitted = the bundled sample.
    #[arg(long)]
    input: Option<PathBuf>,
    /// The instruction.
    #[arg(long, default_value = "Make it purple")]
    prompt: String,
    /// Pruning schedule (none, cat, reuse:2,4, …).
    #[arg(long, default_value = "cat")]
    schedule: ScheduleSpec,
    /// Steps.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Output image.
    #[arg(long, default_value = "edited.png")]
    output: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let demo_dir = std::env::temp_dir().join(format!("qwen-edit-example-{}", std::process::id()));
        let model = match &args.model {
            Some(m) => m.clone(),
            None => {
                println!("Using the built-in demo model: RANDOM WEIGHTS, the output is noise-like.");
                demo::write_demo_snapshot(&demo_dir)?.to_string_lossy().into_owned()
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
        let out = pipe.edit(&request, &args.schedule, &mut NoProgress)?;
        save_image(&out.image, &args.output)?;
        let r = &out.report;
        println!("{}x{} in {:.3} s with schedule {}", r.width, r.height, r.total_seconds, r.schedule);
        for s in &r.stages {
            println!("  {:<14} {:>8.4} s", s.stage.label(), s.seconds);
        }
        for s in &r.steps {
            println!(
                "  step {} σ={:.3}: {:.4} s, reused {} tokens ({})",
                s.step + 1,
                s.sigma,
                s.seconds(),
                s.stats.reused_tokens,
                s.plan_summary
            );
        }
        println!("wrote {}", args.output.display());
        let _ = std::fs::remove_dir_all(&demo_dir);
        Ok(())
    };
    qwen_image_edit::exit_code(run())
}
