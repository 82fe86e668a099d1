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
//! The snapshot is the one the end-to-end parity test runs through diffusers (`assets/demo_snapshot` in this crate,
//! built by `tools/fixtures/pipeline.py`): a 2-block DiT, a 4-channel VAE, a 2-layer Qwen2.5-VL and a 400-token
//! byte-level BPE, ~1 MB embedded in the library. Everything embedded lives under this crate's `assets/` (see its
//! `README.md`), so the crate packages on its own.
//!
//! [`DemoSize::Full`] is the same idea at full size, for GPUs: the published configs of the 20 B DiT, the
//! Qwen2.5-VL-7B text encoder and the VAE (embedded below, no weight files) with random bf16 weights created on the
//! device when the pipeline loads ([`QwenImageEditPipeline::from_snapshot_random`](crate::QwenImageEditPipeline::from_snapshot_random)),
//! at the real 1024² areas, on a square crop of the sample image: the sizes of a real Qwen-Image-Edit run (4096
//! target + 4096 condition tokens, a 74×74-patch vision-language image), so its timings and memory are the real
//! model's. It keeps the tiny byte-level tokenizer (the text encoder's special token ids are set to its ids), which
//! splits the Edit prompt template with "Make it purple" into 149 tokens where Qwen's tokenizer makes about 100:
//! ~1517 text-encoder tokens instead of ~1469 (the report states the counts).

use std::path::{Path, PathBuf};

use qwen_image::processor::RgbImage;

use crate::{request::ImageAreas, PipelineError, Result, Variant};

macro_rules! snapshot_files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo_snapshot/", $path)) as &[u8])),*]
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

/// The bundled sample input image (PNG): scikit-image's CC0 "chelsea" photo, 384×256 (this crate's
/// `assets/README.md`).
pub const SAMPLE_PNG: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/sample.png"));

/// Writes the demo snapshot under `dir` (created if needed) and returns the snapshot folder.
pub fn write_demo_snapshot(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("qwen-image-edit-demo");
    write_files(&root, SNAPSHOT_FILES)?;
    Ok(root)
}

/// Writes each `(relative path, bytes)` under `root`, creating folders, atomically per file.
fn write_files(root: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    for (rel, bytes) in files {
        let path = root.join(rel);
        let parent = path.parent().expect("files are in folders");
        std::fs::create_dir_all(parent).map_err(|e| PipelineError::Snapshot {
            path: parent.to_path_buf(),
            reason: format!("cannot create the demo snapshot: {e}"),
        })?;
        qwen_image::tensor_io::write_atomic(&path, bytes)?;
    }
    Ok(())
}

/// The bundled sample image.
pub fn sample_image() -> Result<RgbImage> {
    Ok(qwen_image::processor::decode_image(SAMPLE_PNG)?)
}

/// Which demo model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DemoSize {
    /// The tiny model with its bundled random weights (CPU, well under a second per edit).
    #[default]
    Tiny,
    /// The published architecture with random weights created at load time (GPU; ~58 GB of bf16 weights).
    Full,
}

impl DemoSize {
    /// Writes the demo snapshot under `dir` and returns its folder: the whole tiny snapshot, or the full
    /// snapshot's configs, tokenizer and scheduler (no weights: load it with
    /// [`QwenImageEditPipeline::from_snapshot_random`](crate::QwenImageEditPipeline::from_snapshot_random)).
    pub fn write_snapshot(self, dir: &Path) -> Result<PathBuf> {
        match self {
            DemoSize::Tiny => write_demo_snapshot(dir),
            DemoSize::Full => write_full_demo_snapshot(dir),
        }
    }

    /// [`write_snapshot`](Self::write_snapshot) for `variant`: the same networks, with `model_index.json` naming
    /// `QwenImageEditPlusPipeline` for [`Variant::EditPlus`] (1–3 input images, each at the condition area for the
    /// vision-language encoder), so that the random-weight demos time Edit-Plus too.
    pub fn write_variant_snapshot(self, dir: &Path, variant: Variant) -> Result<PathBuf> {
        let root = self.write_snapshot(dir)?;
        if variant == Variant::EditPlus {
            let (_, index) = SNAPSHOT_FILES.iter().find(|(p, _)| *p == "model_index.json").expect("bundled");
            let plus = String::from_utf8_lossy(index)
                .replace("\"QwenImageEditPipeline\"", "\"QwenImageEditPlusPipeline\"");
            write_files(&root, &[("model_index.json", plus.as_bytes())])?;
        }
        Ok(root)
    }

    /// Whether the weights are created at load time (no weight files).
    pub fn random_weights(self) -> bool {
        self == DemoSize::Full
    }

    /// The image areas of the demo: [`demo_areas`], or diffusers' 1024² / 384².
    pub fn areas(self) -> ImageAreas {
        match self {
            DemoSize::Tiny => demo_areas(),
            DemoSize::Full => ImageAreas::default(),
        }
    }

    /// The input image: the sample image, or its square centre crop (1024² outputs, 74×74 vision patches).
    pub fn sample_image(self) -> Result<RgbImage> {
        match self {
            DemoSize::Tiny => sample_image(),
            DemoSize::Full => square_sample_image(),
        }
    }
}

/// The published `transformer/config.json` of Qwen-Image-Edit (the 20 B DiT).
pub const FULL_TRANSFORMER_CONFIG: &str = qwen_image::published::TRANSFORMER_CONFIG;

/// The published `vae/config.json` of Qwen-Image-Edit.
pub const FULL_VAE_CONFIG: &str = qwen_image::published::VAE_CONFIG;

/// The special tokens of the demo's tiny tokenizer that the text encoder's config names: `<|endoftext|>` 0,
/// `<|im_end|>` 2, `<|vision_start|>` 9, `<|vision_end|>` 10, `<|vision_pad|>` 11, `<|image_pad|>` 12,
/// `<|video_pad|>` 13 (Qwen's are 151643…).
const DEMO_TOKEN_IDS: [(&str, u32); 7] = [
    ("bos_token_id", 0),
    ("eos_token_id", 2),
    ("vision_start_token_id", 9),
    ("vision_end_token_id", 10),
    ("vision_token_id", 11),
    ("image_token_id", 12),
    ("video_token_id", 13),
];

/// The published Qwen2.5-VL-7B `text_encoder/config.json` with the special token ids of the demo's tiny
/// tokenizer.
pub fn full_text_encoder_config() -> String {
    let mut config: serde_json::Value = serde_json::from_str(qwen_image::published::TEXT_ENCODER_CONFIG)
        .expect("the published config is JSON");
    for (key, id) in DEMO_TOKEN_IDS {
        config[key] = id.into();
    }
    serde_json::to_string_pretty(&config).expect("a JSON value serializes")
}

/// The Qwen2-VL image processor settings of the published snapshot (`min_pixels` 56², `max_pixels` 12 845 056).
pub const FULL_PROCESSOR_CONFIG: &str = r#"{
  "image_processor": {
    "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "merge_size": 2, "patch_size": 14, "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 12845056, "shortest_edge": 3136},
    "temporal_patch_size": 2
  },
  "processor_class": "Qwen2VLProcessor"
}"#;

/// Writes the full-size demo snapshot (configs, the tiny tokenizer, the scheduler; no weights) under `dir` and
/// returns its folder.
pub fn write_full_demo_snapshot(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("qwen-image-edit-demo-full");
    let bundled = |rel: &str| {
        SNAPSHOT_FILES.iter().find(|(p, _)| *p == rel).map(|(_, b)| *b).expect("a bundled snapshot file")
    };
    let text_encoder_config = full_text_encoder_config();
    let files: [(&str, &[u8]); 8] = [
        ("model_index.json", bundled("model_index.json")),
        ("processor/tokenizer.json", bundled("processor/tokenizer.json")),
        ("processor/tokenizer_config.json", bundled("processor/tokenizer_config.json")),
        ("processor/processor_config.json", FULL_PROCESSOR_CONFIG.as_bytes()),
        ("scheduler/scheduler_config.json", bundled("scheduler/scheduler_config.json")),
        ("text_encoder/config.json", text_encoder_config.as_bytes()),
        ("transformer/config.json", FULL_TRANSFORMER_CONFIG.as_bytes()),
        ("vae/config.json", FULL_VAE_CONFIG.as_bytes()),
    ];
    write_files(&root, &files)?;
    Ok(root)
}

/// The largest centred square of the sample image (256×256): at the 1024² area it gives a 1024×1024 output
/// (4096 latent tokens) and a 74×74-patch vision-language image, the sizes the benchmarks use.
pub fn square_sample_image() -> Result<RgbImage> {
    let img = sample_image()?;
    let side = img.width().min(img.height());
    let (x, y) = ((img.width() - side) / 2, (img.height() - side) / 2);
    Ok(image::imageops::crop_imm(&img, x, y, side, side).to_image())
}

/// Image areas for the demo: 128² pixels for the VAE and output (instead of 1024²), 64² for Edit-Plus's
/// vision-language images, so that a whole edit takes well under a second on a CPU.
pub fn demo_areas() -> ImageAreas {
    ImageAreas { vae: 128 * 128, condition: 64 * 64 }
}
