//! Runs the Qwen-Image VAE on inputs dumped from diffusers (or by `tools/fixtures/vae.py`) and writes its outputs.
//!
//! ```text
//! cargo run --release --example vae -- --weights VAE_DIR --inputs IN.safetensors --output OUT.safetensors
//! ```
//! `VAE_DIR` is a diffusers `vae/` folder. `IN` holds `image` ([1, 3, 1, H, W] or [1, 3, H, W], values in [-1, 1],
//! H and W multiples of 8) and/or `latents` (raw, [1, z, 1, h, w] or [1, z, h, w]). `OUT` gets `latent_mode` (the raw
//! posterior mean, diffusers' `vae.encode(image).latent_dist.mode()`) and/or `decoded` (diffusers'
//! `vae.decode(latents).sample`), each with the rank of its input. `--tile`/`--overlap` select the tiled modes.

use std::path::PathBuf;
use std::process::ExitCode;

use burn::tensor::DType;
use clap::Parser;
use qwen_image::{
    tensor_io::write_f32,
    vae::{AutoencoderKLQwenImage, TileConfig},
    CpuBackend,
};
use qwen_image_edit::reference::vae_file;

#[derive(Parser)]
#[command(about = "Run the Qwen-Image VAE on a safetensors dump of an image and/or latents")]
struct Args {
    /// Diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// Inputs file with `image` and/or `latents`.
    #[arg(long)]
    inputs: PathBuf,
    /// Output file (written atomically).
    #[arg(long)]
    output: PathBuf,
    /// Compute in bf16 instead of f32.
    #[arg(long)]
    bf16: bool,
    /// Tile side in pixels (multiple of 8): encode/decode tile by tile with blended seams.
    #[arg(long)]
    tile: Option<usize>,
    /// Overlap of neighbouring tiles in pixels (multiple of 8, at most half the tile).
    #[arg(long, default_value_t = 64, requires = "tile")]
    overlap: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dtype = if args.bf16 { DType::BF16 } else { DType::F32 };
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let tiles = args.tile.map(|tile| TileConfig::new(tile, args.overlap)).transpose()?;
        let model = AutoencoderKLQwenImage::<CpuBackend>::load(&args.weights, dtype, &Default::default())?;
        let outputs = vae_file(&model, &args.inputs, tiles.as_ref())?;
        write_f32(&args.output, &outputs)?;
        for (name, _, shape) in &outputs {
            println!("wrote {name} {shape:?} to {}", args.output.display());
        }
        Ok(())
    };
    qwen_image_edit::exit_code(run())
}
