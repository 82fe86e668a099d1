//! Runs the DiT once on inputs dumped from diffusers (or by `tools/fixtures/dit.py`) and writes `sample`.
//!
//! ```text
//! cargo run --release --example dit_forward -- --weights DIR --inputs IN.safetensors --output OUT.safetensors
//! ```
//! `DIR` is a diffusers `transformer/` folder. `IN` holds `hidden_states` [1, S, in_channels],
//! `encoder_hidden_states` [1, T, joint_dim], `timestep` [1] (σ in [0, 1]), `img_shapes` i64 [n, 3] and optionally
//! `encoder_hidden_states_mask` [1, T]. Compare `OUT`'s `sample` with diffusers' output.

use std::path::PathBuf;
use std::process::ExitCode;

use burn::tensor::DType;
use clap::Parser;
use qwen_image::{dit::QwenImageTransformer, tensor_io::write_f32, CpuBackend};
use qwen_image_edit::reference::dit_forward;

#[derive(Parser)]
#[command(about = "Run the Qwen-Image DiT on a safetensors dump of its inputs")]
struct Args {
    /// Diffusers `transformer/` folder (config.json + safetensors, single file or shards).
    #[arg(long)]
    weights: PathBuf,
    /// Inputs file.
    #[arg(long)]
    inputs: PathBuf,
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
        let (sample, shape) = dit_forward(&model, &args.inputs)?;
        write_f32(&args.output, &[("sample", sample, shape.clone())])?;
        println!("wrote sample {shape:?} to {}", args.output.display());
        Ok(())
    };
    qwen_image_edit::exit_code(run())
}
