//! [`Progress`]: how the pipeline tells its caller what it is doing (loading, stages, denoising steps).
//!
//! How to use: implement the methods you care about (all default to doing nothing) and pass `&mut your_progress` to
//! [`QwenImageEditPipeline::load`](crate::QwenImageEditPipeline::load) and
//! [`edit`](crate::QwenImageEditPipeline::edit); pass [`NoProgress`] to stay silent. The library never prints.

use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use qwen_image::ops::QwenBackend;
use serde::{Deserialize, Serialize};

use crate::{load::ExactAllocation, report::StageTiming, PipelineError, Result, StepReport};

/// A named part of loading or of an edit, timed separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// Everything cheap that comes before the networks run: the sizes, resizing the input images, their patch grids,
    /// tokenizing the prompts, the σ schedule and the pruning schedule's check against it, and the initial noise.
    Preprocess,
    /// The image processor's patches of the condition images and the Qwen2.5-VL text encoder (prompt and negative
    /// prompt).
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
    /// The stages of an edit, in the order they run ([`Stage::ModulationTable`] in table mode only; image encoding
    /// is queued ahead of prompt encoding, which runs while the device computes it).
    pub const EDIT: [Stage; 6] = [
        Stage::Preprocess,
        Stage::EncodeImage,
        Stage::EncodePrompt,
        Stage::ModulationTable,
        Stage::Denoise,
        Stage::Decode,
    ];

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
    /// A stage ended after `_time` (the device was synchronized before the clock stopped, unless the stage was
    /// only queued: see [`StageTiming::queued`]).
    fn stage_finished(&mut self, _stage: Stage, _time: Duration) {}
    /// The denoising loop starts `_num_steps` steps.
    fn denoise_started(&mut self, _num_steps: usize) {}
    /// A denoising step ended.
    fn step_finished(&mut self, _report: &StepReport) {}
    /// Whether the caller wants the edit stopped: asked before every stage and after every denoising step, and
    /// the edit then ends with [`PipelineError::Cancelled`]. Default: never.
    fn cancelled(&self) -> bool {
        false
    }
}

/// [`PipelineError::Cancelled`] when `progress` asks for the edit to stop.
pub(crate) fn check_cancelled(progress: &dyn Progress) -> Result<()> {
    if progress.cancelled() {
        Err(PipelineError::Cancelled)
    } else {
        Ok(())
    }
}

/// A [`Progress`] that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// Waits for the device's queued work (so that a clock stopped afterwards measures it).
pub(crate) fn sync<B: Backend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| PipelineError::Device(format!("{e:?}")))
}

/// Exact-size allocations on a device ([`QwenBackend::allocate_exactly`]) while it lives: switched back to pooled
/// pages when dropped, also when the stage fails or panics.
struct ExactAllocations<'d, B: QwenBackend> {
    device: &'d B::Device,
}

impl<'d, B: QwenBackend> ExactAllocations<'d, B> {
    fn start(device: &'d B::Device) -> Self {
        B::allocate_exactly(device, true);
        ExactAllocations { device }
    }
}

impl<B: QwenBackend> Drop for ExactAllocations<'_, B> {
    fn drop(&mut self) {
        B::allocate_exactly(self.device, false);
    }
}

/// Runs the stages of a load or an edit, each the same way: tells the [`Progress`] it starts, runs it, synchronizes
/// the device before stopping the clock, records a [`StageTiming`] and tells the `Progress` it finished.
pub(crate) struct StageClock<'a, B: Backend> {
    device: B::Device,
    progress: &'a mut dyn Progress,
    timings: Vec<StageTiming>,
    release_memory: bool,
    exact_allocation: ExactAllocation,
}

impl<'a, B: QwenBackend> StageClock<'a, B> {
    /// A clock for stages on `device`, reporting to `progress`.
    pub(crate) fn new(device: &B::Device, progress: &'a mut dyn Progress) -> Self {
        StageClock {
            device: device.clone(),
            progress,
            timings: Vec::new(),
            release_memory: false,
            exact_allocation: ExactAllocation::None,
        }
    }

    /// Runs the stages `exact` covers with exact-size allocations ([`QwenBackend::allocate_exactly`]), each
    /// followed by [`QwenBackend::release_unused_memory`] so that what they allocated does not outlive them.
    pub(crate) fn allocating_exactly(mut self, exact: ExactAllocation) -> Self {
        self.exact_allocation = exact;
        self
    }

    /// After each stage, give the device memory the backend's pool holds but no tensor uses back to the driver
    /// ([`QwenBackend::release_unused_memory`]; a no-op on the CPU), as
    /// [`LoadOptions::release_memory`](crate::LoadOptions::release_memory) asks (implied by low-memory mode), so that
    /// the pages one stage reserved (the VAE's activations, say) do not stay reserved beside the next stage's; it
    /// costs the next stage fresh allocations. Counted in the stage's time.
    pub(crate) fn releasing_memory(mut self, release: bool) -> Self {
        self.release_memory = release;
        self
    }

    /// Runs `f` as `stage` (`f` gets the `Progress`, e.g. for per-step events).
    pub(crate) fn run<T>(
        &mut self,
        stage: Stage,
        f: impl FnOnce(&mut dyn Progress) -> Result<T>,
    ) -> Result<T> {
        check_cancelled(&*self.progress)?;
        self.progress.stage_started(stage);
        let start = Instant::now();
        let exact = self.exact_allocation.covers(stage);
        let guard = exact.then(|| ExactAllocations::<B>::start(&self.device));
        let out = f(&mut *self.progress);
        drop(guard);
        // Released after a failed stage too: exact allocations stay reserved until an explicit cleanup.
        let out = out.and_then(|out| sync::<B>(&self.device).map(|()| out));
        if self.release_memory || exact {
            B::release_unused_memory(&self.device);
        }
        let out = out?;
        self.finish(stage, start, false);
        Ok(out)
    }

    /// Runs `f` as `stage` without waiting for the device: its work stays queued while the next stage's host work
    /// runs and queues more, so that the device computes both back to back instead of idling while the host
    /// prepares the next stage. The stage's time is then the host's time to queue it ([`StageTiming::queued`]);
    /// the device time it still needs falls into the next stage, which waits. Under a memory release after every
    /// stage or exact allocations the stage is awaited as [`run`](Self::run) awaits it: those give back what a
    /// stage held once it is done.
    pub(crate) fn queue<T>(
        &mut self,
        stage: Stage,
        f: impl FnOnce(&mut dyn Progress) -> Result<T>,
    ) -> Result<T> {
        if self.release_memory || self.exact_allocation != ExactAllocation::None {
            return self.run(stage, f);
        }
        check_cancelled(&*self.progress)?;
        self.progress.stage_started(stage);
        let start = Instant::now();
        let out = f(&mut *self.progress)?;
        self.finish(stage, start, true);
        Ok(out)
    }

    /// Records `stage`, started at `start`, and tells the `Progress` it finished.
    fn finish(&mut self, stage: Stage, start: Instant, queued: bool) {
        let time = start.elapsed();
        self.timings.push(StageTiming { stage, seconds: time.as_secs_f64(), queued });
        self.progress.stage_finished(stage, time);
    }

    /// The timings of the stages that ran, in order.
    pub(crate) fn into_timings(self) -> Vec<StageTiming> {
        self.timings
    }
}
