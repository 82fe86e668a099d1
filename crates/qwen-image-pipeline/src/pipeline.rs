//! [`QwenImageEditPipeline`]: diffusers' `QwenImageEditPipeline` and `QwenImageEditPlusPipeline` in Rust, with a
//! pruning schedule per edit.
//!
//! How to use:
//!
//! ```no_run
//! use qwen_image::CpuBackend;
//! use qwen_image_pipeline::{EditRequest, LoadOptions, NoProgress, QwenImageEditPipeline};
//! use qwen_image_pruning::ScheduleSpec;
//!
//! # fn main() -> qwen_image_pipeline::Result<()> {
//! let device = Default::default();
//! let mut pipe = QwenImageEditPipeline::<CpuBackend>::load(
//!     "Qwen/Qwen-Image-Edit", // a snapshot folder, or a repo id found in the Hugging Face cache
//!     &LoadOptions::default(),
//!     &device,
//!     &mut NoProgress,
//! )?;
//! let image = qwen_image::processor::load_image("input.png".as_ref())?;
//! let request = EditRequest::new(vec![image], "Make it purple");
//! let out = pipe.edit(&request, &"cat".parse::<ScheduleSpec>()?, &mut NoProgress)?;
//! qwen_image_pipeline::save_image(&out.image, "out.png".as_ref())?;
//! println!("{:.2} s, {} condition tokens reused", out.report.total_seconds, out.report.reused_tokens());
//! # Ok(()) }
//! ```
//!
//! The pipeline is spread over one module per concern: [`load`](crate::load) (options and loading), [`request`]
//! (what an edit asks for), [`validate`] (checks that need no weights), [`edit`](crate::edit) (the edit, one method
//! per stage) and [`report`] (what it gives back). This module holds the loaded pipeline and its accessors.
//!
//! [`request`]: crate::request
//! [`validate`]: crate::validate
//! [`report`]: crate::report

use qwen_image::{
    dit::{ModulationTable, QwenImageTransformer},
    ops::QwenBackend,
    processor::{ImageProcessor, QwenTokenizer},
    text_encoder::Qwen25VlTextEncoder,
    vae::AutoencoderKLQwenImage,
};

use crate::{
    denoise::DenoiseCaches,
    load::LoadOptions,
    memory::MemoryProbe,
    report::StageTiming,
    scheduler::FlowMatchEulerScheduler,
    snapshot::{Snapshot, Variant},
};

/// The loaded pipeline: the three networks, tokenizer, image processor and scheduler of one snapshot, the pruning
/// caches it keeps between edits, and the DiT's modulation table (rows per timestep, kept for the process).
#[derive(Debug)]
pub struct QwenImageEditPipeline<B: QwenBackend> {
    pub(crate) snapshot: Snapshot,
    pub(crate) transformer: QwenImageTransformer<B>,
    pub(crate) vae: AutoencoderKLQwenImage<B>,
    pub(crate) text_encoder: Qwen25VlTextEncoder<B>,
    pub(crate) tokenizer: QwenTokenizer,
    pub(crate) image_processor: ImageProcessor,
    pub(crate) scheduler: FlowMatchEulerScheduler,
    pub(crate) caches: DenoiseCaches<B>,
    /// The DiT's modulation rows of every timestep seen so far, in table mode (kept across edits; emptied when the
    /// DiT is lent out mutably).
    pub(crate) modulation: ModulationTable<B>,
    pub(crate) options: LoadOptions,
    /// The weight bytes each network's load put on the device (counted from the tensors made) and left on the host.
    pub(crate) weight_bytes: crate::memory_plan::ComponentWeights,
    pub(crate) load_stages: Vec<StageTiming>,
    pub(crate) memory_probe: MemoryProbe,
    pub(crate) device: B::Device,
}

impl<B: QwenBackend> QwenImageEditPipeline<B> {
    /// The variant (Edit v1 or Edit-Plus).
    pub fn variant(&self) -> Variant {
        self.snapshot.variant
    }

    /// The snapshot the pipeline was loaded from: its folder and variant.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Load time per stage.
    pub fn load_stages(&self) -> &[StageTiming] {
        &self.load_stages
    }

    /// The DiT (e.g. to read its config).
    pub fn transformer(&self) -> &QwenImageTransformer<B> {
        &self.transformer
    }

    /// The DiT, mutably: attach or detach runtime LoRAs between edits (see
    /// [`LoraWeights::attach`](crate::lora::LoraWeights::attach)). Empties the modulation table (the weights may
    /// change): the next edit computes its rows again.
    pub fn transformer_mut(&mut self) -> &mut QwenImageTransformer<B> {
        self.modulation.clear();
        &mut self.transformer
    }

    /// The scheduler that sets each edit's σ values and timesteps (the snapshot's config, or Lightning's).
    pub fn scheduler(&self) -> &FlowMatchEulerScheduler {
        &self.scheduler
    }

    /// Replaces the scheduler (e.g. Lightning after attaching a Lightning LoRA).
    pub fn set_scheduler(&mut self, scheduler: FlowMatchEulerScheduler) {
        self.scheduler = scheduler;
    }

    /// The weight bytes each network's load put on the device (counted from the tensors made) and left on the host:
    /// what the [memory plan](crate::memory_plan)'s weight part predicts.
    pub fn weight_bytes(&self) -> crate::memory_plan::ComponentWeights {
        self.weight_bytes
    }

    /// The options it was loaded with ([`LoadOptions::resolved`]: what low-memory mode implies filled in).
    pub fn options(&self) -> &LoadOptions {
        &self.options
    }

    /// The device the networks are on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Bytes held by the pruning caches (non-zero between edits only when a request kept them).
    pub fn cache_bytes(&self) -> usize {
        self.caches.size_bytes()
    }

    /// Drops the pruning caches.
    pub fn clear_cache(&mut self) {
        self.caches.clear();
    }

    /// The DiT's modulation rows of the timesteps seen so far (empty in resident mode).
    pub fn modulation_table(&self) -> &ModulationTable<B> {
        &self.modulation
    }

    /// How the memory in each edit's report is read (default: [`MemoryProbe::host`]).
    pub fn memory_probe(&self) -> &MemoryProbe {
        &self.memory_probe
    }

    /// Reads the memory in each edit's report with `probe` (e.g. one that adds the GPU's memory).
    pub fn set_memory_probe(&mut self, probe: MemoryProbe) {
        self.memory_probe = probe;
    }
}
