//! [`EditRequest`]: what one edit asks for, and [`EditOutput`]: what it gives back.
//!
//! A request is checked without any weights by [`EditRequest::validate`] (see [`validate`](crate::validate)); the
//! pipeline checks it again before it runs it.

use std::path::Path;

use qwen_image::processor::RgbImage;

use crate::{report::EditReport, PipelineError, Result};

/// Target areas of the resized images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageAreas {
    /// Area of the VAE images and of the default output (diffusers: 1024²). Edit v1's vision-language image too.
    pub vae: u32,
    /// Area of Edit-Plus's vision-language condition images (diffusers: 384²).
    pub condition: u32,
}

impl Default for ImageAreas {
    fn default() -> Self {
        ImageAreas { vae: 1024 * 1024, condition: 384 * 384 }
    }
}

/// One edit: the input images and the instruction, and every option of the run. [`EditRequest::new`] gives the
/// defaults; [`EditRequest::validate`] checks it without weights.
#[derive(Clone, Debug, PartialEq)]
pub struct EditRequest {
    /// Input images (Edit v1: exactly one; Edit-Plus: 1–3).
    pub images: Vec<RgbImage>,
    /// The edit instruction, put into the variant's chat template with the images (must not be blank).
    pub prompt: String,
    /// Negative prompt for true CFG (Qwen uses `" "`).
    pub negative_prompt: Option<String>,
    /// True-CFG scale; CFG runs when it is above 1 and a negative prompt is given.
    pub true_cfg_scale: f32,
    /// Denoising steps, from 1 to [`MAX_STEPS`](crate::validate::MAX_STEPS): one DiT call each, two under true CFG.
    pub num_steps: usize,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Packed initial noise `[target_tokens · 4·z_dim]` instead of seeded noise (e.g. from a PyTorch run).
    pub noise: Option<Vec<f32>>,
    /// Output width (default: from the last image's aspect ratio); floored to a multiple of 16, which the report
    /// states ([`EditRequest::size_adjustments`]).
    pub width: Option<u32>,
    /// Output height (default: from the last image's aspect ratio); floored to a multiple of 16 (as the width).
    pub height: Option<u32>,
    /// The pixel areas the inputs are resized to (VAE and default output; Edit-Plus's vision-language images).
    pub areas: ImageAreas,
    /// Keep the pruning cache of the previous edit (same image and size) instead of clearing it.
    pub keep_cache: bool,
    /// Fit the pruning schedule's plans to this many bytes of cache, both CFG branches together
    /// ([`CacheBudget`](qwen_image_pruning::CacheBudget); the report's schedule name says what was dropped).
    pub cache_budget: Option<u64>,
    /// Guard reuse by the drift signal: a reuse step whose velocity changed by more than this is run again with
    /// everything computed ([`Guardrail`](qwen_image_pruning::Guardrail); the step report says so). Off by default.
    pub guardrail: Option<f32>,
}

impl EditRequest {
    /// A request with the seed prototype's defaults: 4 steps, CFG 1 (off), seed 0.
    pub fn new(images: Vec<RgbImage>, prompt: impl Into<String>) -> Self {
        EditRequest {
            images,
            prompt: prompt.into(),
            negative_prompt: None,
            true_cfg_scale: 1.0,
            num_steps: 4,
            seed: 0,
            noise: None,
            width: None,
            height: None,
            areas: ImageAreas::default(),
            keep_cache: false,
            cache_budget: None,
            guardrail: None,
        }
    }

    /// Whether the edit runs true CFG: a scale above 1 and a negative prompt
    /// ([diffusers](https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L678)).
    pub fn true_cfg(&self) -> bool {
        self.true_cfg_scale > 1.0 && self.negative_prompt.is_some()
    }
}

/// What [`QwenImageEditPipeline::edit`](crate::QwenImageEditPipeline::edit) gives back: the image, the final
/// latents and prompt embeddings (for comparisons with a reference run), and the report.
#[derive(Clone, Debug)]
pub struct EditOutput {
    /// The edited image, at the output size of the report ([`EditReport::width`] × [`EditReport::height`]).
    pub image: RgbImage,
    /// Final packed latents `[1, target_tokens, 4·z_dim]` as f32 (before unpacking and decoding).
    pub latents: Vec<f32>,
    /// The prompt embeddings that conditioned the DiT, `[1, text_tokens, hidden]`, as f32.
    pub prompt_embeds: Vec<f32>,
    /// Timings and per-step details.
    pub report: EditReport,
}

/// Encodes `image` as PNG or JPEG (from the extension of `path`) and writes it atomically.
pub fn save_image(image: &RgbImage, path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    let format = match ext.as_str() {
        "png" => image::ImageFormat::Png,
        "jpg" | "jpeg" => image::ImageFormat::Jpeg,
        _ => {
            return Err(PipelineError::Image {
                path: path.to_path_buf(),
                reason: "unsupported output format; use .png, .jpg or .jpeg".into(),
            })
        }
    };
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, format)
        .map_err(|e| PipelineError::Image { path: path.to_path_buf(), reason: e.to_string() })?;
    qwen_image::tensor_io::write_atomic(path, bytes.get_ref())?;
    Ok(())
}
