//! [`Progress`]: how the pipeline tells its caller what it is doing (loading, stages, denoising steps).
//!
//! How to use: implement the methods you care about (all default to doing nothing) and pass `&mut your_progress` to
//! [`QwenImageEditPipeline::load`](crate::QwenImageEditPipeline::load) and
//! [`edit`](crate::QwenImageEditPipeline::edit); pass [`NoProgress`] to stay silent. The library never prints.

use std::time::Duration;

use serde::Serialize;

use crate::StepReport;

/// A named part of loading or of an edit, timed separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Reading `transformer/`.
    LoadTransformer,
    /// Reading `vae/`.
    LoadVae,
    /// Reading `text_encoder/`.
    LoadTextEncoder,
    /// Reading the tokenizer and image-processor config.
    LoadProcessor,
    /// Reading and applying LoRA files.
    LoadLora,
    /// Resizing the input images and tokenizing the prompts.
    Preprocess,
    /// The Qwen2.5-VL text encoder (prompt and negative prompt).
    EncodePrompt,
    /// VAE encoding of the condition images.
    EncodeImage,
    /// The DiT's modulation rows of this edit's timesteps that are not in the pipeline's table yet (the first edit
    /// of a schedule; nearly nothing afterwards).
    ModulationTable,
    /// The denoising loop.
    Denoise,
    /// VAE decoding of the result.
    Decode,
}

impl Stage {
    /// A short label.
    pub fn label(self) -> &'static str {
        match self {
            Stage::LoadTransformer => "load transformer",
            Stage::LoadVae => "load VAE",
            Stage::LoadTextEncoder => "load text encoder",
            Stage::LoadProcessor => "load processor",
            Stage::LoadLora => "load LoRA",
            Stage::Preprocess => "preprocess",
            Stage::EncodePrompt => "encode prompt",
            Stage::EncodeImage => "encode image",
            Stage::ModulationTable => "modulation table",
            Stage::Denoise => "denoise",
            Stage::Decode => "decode",
        }
    }
}

/// Receives progress events. Every method has a no-op default.
pub trait Progress {
    /// A stage starts.
    fn stage_started(&mut self, _stage: Stage) {}
    /// A stage ended after `_time` (the device was synchronized before the clock stopped).
    fn stage_finished(&mut self, _stage: Stage, _time: Duration) {}
    /// The denoising loop starts `_num_steps` steps.
    fn denoise_started(&mut self, _num_steps: usize) {}
    /// A denoising step ended.
    fn step_finished(&mut self, _report: &StepReport) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}
