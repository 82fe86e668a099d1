//! Runs the Qwen2.5-VL text encoder on inputs dumped from transformers (or by `tools/fixtures/text_encoder.py`) and
//! writes `last_hidden_state` (diffusers' `hidden_states[-1]`).
//!
//! ```text
//! cargo run --release --example text_encode -- --weights TEXT_ENCODER_DIR --inputs IN.safetensors --output OUT.safetensors
//! ```
//! `TEXT_ENCODER_DIR` is a `text_encoder/` folder (config.json + model.safetensors, single file or shards, either key
//! naming). `IN` holds `input_ids` i64 [1, T], optionally `attention_mask` [1, T], `pixel_values` [P, 1176] and
//! `image_grid_thw` i64 [n, 3]. `OUT` gets `last_hidden_state` [1, T, hidden]. Image tokens get M-RoPE positions
//! (transformers with `mm_token_type_ids`); `--sequential-positions` gives 0..T instead (transformers 5 without
//! `mm_token_type_ids`, as diffusers calls it).

use std::path::PathBuf;
use std::process::ExitCode;

use burn::tensor::DType;
use clap::Parser;
use qwen_image::{
    tensor_io::write_f32,
    text_encoder::{PositionMode, Qwen25VlTextEncoder},
    CpuBackend,
};
use qwen_image_edit::reference::text_encode;

#[derive(Parser)]
#[command(about = "Run the Qwen2.5-VL text encoder on a safetensors dump of its inputs")]
struct Args {
    /// `text_encoder/` folder (config.json + safetensors, single file or shards).
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
    /// Plain 0..T rotary positions instead of the multimodal (M-RoPE) ones.
    #[arg(long)]
    sequential_positions: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dtype = if args.bf16 { DType::BF16 } else { DType::F32 };
    let positions =
        if args.sequential_positions { PositionMode::Sequential } else { PositionMode::Multimodal };
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let model = Qwen25VlTextEncoder::<CpuBackend>::load(&args.weights, dtype, &Default::default())?;
        let (hidden, shape) = text_encode(&model, &args.inputs, positions)?;
        write_f32(&args.output, &[("last_hidden_state", hidden, shape.clone())])?;
        println!("wrote last_hidden_state {shape:?} to {}", args.output.display());
        Ok(())
    };
    qwen_image_edit::exit_code(run())
}
