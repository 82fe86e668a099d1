//! Runs a plain Euler denoising loop of the DiT under a pruning schedule and writes the final latents.
//!
//! ```text
//! cargo run --release --example denoise -- --weights DIR --inputs IN.safetensors \
//!     --sigmas 1,0.9,0.75,0.5,0 --schedule cat --output OUT.safetensors
//! ```
//! `IN` holds `latents` [1, N, C] (initial noise), `image_latents` [1, M, C], `encoder_hidden_states` [1, T, joint_dim],
//! `img_shapes` i64 [n, 3] and optionally `encoder_hidden_states_mask`. Each step is `x += (σ_next − σ)·v` with
//! timestep σ, in f32. `--schedule` is `none`, `cat`, `reuse:2,3,4`, optionally `/recompute` and `@LO-HI`.

use std::path::PathBuf;
use std::process::ExitCode;

use burn::tensor::DType;
use clap::Parser;
use qwen_image::{dit::QwenImageTransformer, tensor_io::write_f32, CpuBackend};
use qwen_image_edit::reference::denoise_file;
use qwen_image_pruning::ScheduleSpec;

#[derive(Parser)]
#[command(about = "Run a pruned Euler denoising loop of the Qwen-Image DiT on dumped inputs")]
struct Args {
    /// Diffusers `transformer/` folder.
    #[arg(long)]
    weights: PathBuf,
    /// Inputs file.
    #[arg(long)]
    inputs: PathBuf,
    /// Comma-separated σ values, num_steps + 1 of them.
    #[arg(long, default_value = "1,0.9,0.75,0.5,0", value_delimiter = ',')]
    sigmas: Vec<f32>,
    /// Pruning schedule: none | cat | reuse:S1,S2,… [/kv|/recompute] [@LO-HI].
    #[arg(long, default_value = "none")]
    schedule: ScheduleSpec,
    /// Output file (written atomically).
    #[arg(long)]
    output: PathBuf,
    /// Compute in bf16 instead of f32.
    #[arg(long)]
    bf16: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dtype = if args.bf16 { DType::BF16 } else { DType::F32 };
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let model = QwenImageTransformer::<CpuBackend>::load(&args.weights, dtype, &Default::default())?;
        let (latents, shape, reports) = denoise_file(&model, &args.inputs, &args.sigmas, &args.schedule)?;
        for r in &reports {
            println!(
                "step {} σ={:.4}: {:>8.1} ms, {}, reused {} tokens, cache {:.1} KiB",
                r.step + 1,
                r.sigma,
                r.time.as_secs_f64() * 1e3,
                r.plan_summary,
                r.stats.reused_tokens,
                r.cache_bytes as f64 / 1024.0
            );
        }
        write_f32(&args.output, &[("latents", latents, shape.clone())])?;
        println!("wrote latents {shape:?} to {}", args.output.display());
        Ok(())
    };
    qwen_image_edit::exit_code(run())
}
