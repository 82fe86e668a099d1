//! A built-in tiny Qwen-Image-Edit snapshot with **random weights**, to try the pipeline, the CLI and the examples
//! without downloading anything. Its outputs are noise-like images: it demonstrates the machinery, not editing.
//!
//! How to use:
//!
//! ```no_run
//! # fn main() -> qwen_image_pipeline::Result<()> {
//! let dir = qwen_image_pipeline::demo::write_demo_snapshot(&std::env::temp_dir().join("qwen-demo"))?;
//! let image = qwen_image_pipeline::demo::sample_image()?;
//! // QwenImageEditPipeline::load(dir.to_str().unwrap(), …) then edit with demo::demo_areas().
//! # let _ = (dir, image); Ok(()) }
//! ```
//!
//! The snapshot is the one the end-to-end parity test runs through diffusers (`tests/fixtures/pipeline/
//! snapshot_edit`, built by `tools/fixtures/pipeline.py`): a 2-block DiT, a 4-channel VAE, a 2-layer Qwen2.5-VL and
//! a 400-token byte-level BPE, ~1.4 MB embedded in the library.

use std::path::{Path, PathBuf};

use qwen_image::processor::RgbImage;

use crate::{pipeline::ImageAreas, PipelineError, Result};

macro_rules! snapshot_files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/pipeline/snapshot_edit/", $path)) as &[u8])),*]
    };
}

/// Relative path and bytes of every file of the demo snapshot.
pub const SNAPSHOT_FILES: &[(&str, &[u8])] = snapshot_files!(
    "model_index.json",
    "processor/processor_config.json",
    "processor/tokenizer.json",
    "processor/tokenizer_config.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
);

/// The bundled sample input image (PNG): scikit-image's CC0 "chelsea" photo, 384×256 (`assets/README.md`).
pub const SAMPLE_PNG: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/sample.png"));

/// Writes the demo snapshot under `dir` (created if needed) and returns the snapshot folder.
pub fn write_demo_snapshot(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("qwen-image-edit-demo");
    for (rel, bytes) in SNAPSHOT_FILES {
        let path = root.join(rel);
        let parent = path.parent().expect("files are in folders");
        std::fs::create_dir_all(parent).map_err(|e| PipelineError::Snapshot {
            path: parent.to_path_buf(),
            reason: format!("cannot create the demo snapshot: {e}"),
        })?;
        qwen_image::tensor_io::write_atomic(&path, bytes)?;
    }
    Ok(root)
}

/// The bundled sample image.
pub fn sample_image() -> Result<RgbImage> {
    Ok(qwen_image::processor::decode_image(SAMPLE_PNG)?)
}

/// Image areas for the demo: 128² pixels for the VAE and output (instead of 1024²), 64² for Edit-Plus's
/// vision-language images, so that a whole edit takes well under a second on a CPU.
pub fn demo_areas() -> ImageAreas {
    ImageAreas { vae: 128 * 128, condition: 64 * 64 }
}
