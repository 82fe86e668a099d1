//! Loading a snapshot into a [`QwenImageEditPipeline`]: [`LoadOptions`] and the constructors.
//!
//! Cheap checks come first (scheduler config, DiT config, LoRA files), so that a bad option fails before gigabytes
//! are read; then each component is loaded as a timed [`Stage`]; last, the components are checked against each other.

use std::path::PathBuf;

use burn::tensor::{backend::Backend, DType};
use qwen_image::{
    dit::{
        dit_linear_names, DitConfig, DitLoadOptions, ModulationMode, ModulationTable, QwenImageTransformer,
    },
    ops::QwenBackend,
    processor::{ImageProcessor, QwenTokenizer},
    quant::Fp8Options,
    text_encoder::{
        PositionMode, Qwen25VlConfig, Qwen25VlTextEncoder, TextEncoderLoadOptions, TEXT_ENCODER_FP8_KEEP,
    },
    vae::{AutoencoderKLQwenImage, TileConfig, VaeConfig},
    weights::{WeightBytes, WeightStore},
};
use serde::{Deserialize, Serialize};

use crate::{
    denoise::DenoiseCaches,
    lora::LoraWeights,
    memory::MemoryProbe,
    memory_plan::{ComponentWeights, LOW_MEMORY_CACHE_BUDGET},
    progress::{Progress, Stage, StageClock},
    scheduler::{FlowMatchEulerScheduler, SchedulerConfig},
    snapshot::Snapshot,
    PipelineError, QwenImageEditPipeline, Result,
};

/// Which scheduler config to use.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum SchedulerChoice {
    /// The snapshot's `scheduler/scheduler_config.json` (the base model's: dynamic shift, terminal stretch).
    #[default]
    Snapshot,
    /// The Qwen-Image-Lightning config (static shift 3, no stretch), for the Lightning LoRAs.
    Lightning,
    /// A given config.
    Config(SchedulerConfig),
}

/// A LoRA to apply at load time.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraOption {
    /// The safetensors file.
    pub path: PathBuf,
    /// Strength (1 = as trained).
    pub multiplier: f32,
    /// Merge into the weights (no run-time cost) instead of attaching a runtime adapter.
    pub merge: bool,
}

/// How much of the model stays on the device (issue 13, item 4; see docs/memory.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryMode {
    /// Every network resident as [`LoadOptions`] says (the default).
    #[default]
    Resident,
    /// The smallest footprint (aimed at 24 GB cards, docs/memory.md): the DiT in FP8 ([`Fp8Options::low_memory`]'s
    /// keep list unless [`LoadOptions::fp8`] gives one) with its modulation weights on the host (table mode), the
    /// text encoder's linear layers in FP8 (all but [`TEXT_ENCODER_FP8_KEEP`]) with its decoder layers streamed from
    /// host memory, a default cache budget ([`LOW_MEMORY_CACHE_BUDGET`]) for requests without one, and VAE tiling
    /// for images whose untiled decode the [memory plan](crate::memory_plan) says would not fit. Every stage
    /// allocates exactly ([`ExactAllocation::All`] unless set) and gives its memory back after it, and the pruning
    /// cache is dropped when the denoising loop ends ([`LoadOptions::drop_cache_after_denoise`]).
    Low,
}

/// Which stages of an edit give their tensors device allocations of their own size
/// ([`QwenBackend::allocate_exactly`]) instead of slices of the allocator's shared pages, each stage's freed right
/// after it. burn's CUDA pool opens a page of a sixteenth to a quarter of the card's memory for each large request
/// it cannot place (the VAE's 0.5–1.1 GB activations and cuDNN workspaces at 1024²), which is most of what it
/// reserves beyond what is in use (docs/memory.md, "How the allocator holds memory").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExactAllocation {
    /// Every stage in pooled pages (burn's default).
    #[default]
    None,
    /// The VAE's stages (encoding the condition images and decoding the result).
    Vae,
    /// Every stage of an edit.
    All,
}

impl ExactAllocation {
    /// Whether `stage` allocates exactly under this choice.
    pub fn covers(self, stage: Stage) -> bool {
        match self {
            ExactAllocation::None => false,
            ExactAllocation::Vae => matches!(stage, Stage::EncodeImage | Stage::Decode),
            ExactAllocation::All => true,
        }
    }
}

/// How to load a snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    /// Weights and activations dtype of all three networks (bf16 on GPUs; f32 on CPUs and for parity tests).
    pub dtype: DType,
    /// LoRAs applied to the DiT.
    pub loras: Vec<LoraOption>,
    /// The scheduler config.
    pub scheduler: SchedulerChoice,
    /// Rotary positions of the text encoder: [`PositionMode::Multimodal`] (what Qwen2.5-VL was trained with, and
    /// what diffusers computed with transformers 4) or [`PositionMode::Sequential`] (what diffusers computes with
    /// transformers 5, which no longer passes the image grid positions).
    pub text_positions: PositionMode,
    /// Encode and decode with the VAE in tiles (large images).
    pub vae_tiling: Option<TileConfig>,
    /// Where the DiT's modulation weights live: on the host, with the rows of the timesteps seen so far in a table
    /// (the default; 12.7 GiB less device memory at full size in bf16, same outputs), or on the device.
    pub modulation: ModulationMode,
    /// FP8 weights for the DiT's linear layers on the device, all but a keep list (default: none). LoRAs to merge are
    /// merged into the unquantized weights before each layer is quantized (see docs/fp8.md).
    pub fp8: Option<Fp8Options>,
    /// FP8 weights for the text encoder's linear layers too (all but [`TEXT_ENCODER_FP8_KEEP`]): 6.3 GiB less device
    /// memory at full size. Implied by [`MemoryMode::Low`].
    pub fp8_text_encoder: bool,
    /// How much stays on the device ([`MemoryMode::Low`] implies FP8 and table mode: see [`LoadOptions::resolved`]).
    pub memory: MemoryMode,
    /// After every stage of an edit, give the device memory the allocator holds but no tensor uses back to the driver
    /// ([`QwenBackend::release_unused_memory`]): each stage's activation pages no longer stay reserved beside the
    /// next stage's, at the cost of fresh allocations in every stage. On an H100 (FP8) this lowered the memory held
    /// after an edit from 34.9 to 28.5 GiB but not the peak, which is inside the denoise stage (docs/memory.md).
    /// Implied by [`MemoryMode::Low`].
    pub release_memory: bool,
    /// Which stages of an edit allocate their tensors exactly, each stage's allocations given back after it
    /// (see [`ExactAllocation`]).
    pub exact_allocation: ExactAllocation,
    /// Drop the pruning cache when the denoising loop ends instead of keeping it for the next edit's
    /// [`EditRequest::keep_cache`](crate::EditRequest::keep_cache): the VAE decode, the peak stage of an FP8 or
    /// low-memory edit at 1024², then runs without it (2–3 GB less at full size with `cat`), and nothing is held
    /// between edits; a next request's `keep_cache` finds no cache and computes afresh. Implied by
    /// [`MemoryMode::Low`].
    pub drop_cache_after_denoise: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            loras: Vec::new(),
            scheduler: SchedulerChoice::Snapshot,
            text_positions: PositionMode::Multimodal,
            vae_tiling: None,
            modulation: ModulationMode::default(),
            fp8: None,
            fp8_text_encoder: false,
            memory: MemoryMode::Resident,
            release_memory: false,
            exact_allocation: ExactAllocation::None,
            drop_cache_after_denoise: false,
        }
    }
}

impl LoadOptions {
    /// The options a load uses: under [`MemoryMode::Low`], FP8 for the DiT ([`Fp8Options::low_memory`]'s keep list
    /// unless [`fp8`](Self::fp8) names one) and memory released after every stage. Errors for a combination low-memory mode
    /// cannot honour (resident modulation weights).
    pub fn resolved(&self) -> Result<LoadOptions> {
        let mut options = self.clone();
        if self.memory == MemoryMode::Low {
            if self.modulation == ModulationMode::Resident {
                return Err(PipelineError::invalid(
                    "low-memory mode keeps the DiT's modulation weights on the host (the modulation table); it cannot \
                     be combined with resident modulation weights (--modulation resident)",
                ));
            }
            options.fp8 = Some(self.fp8.clone().unwrap_or_else(Fp8Options::low_memory));
            options.release_memory = true;
            options.drop_cache_after_denoise = true;
            // Every stage exact: no cost on an H100 (docs/memory.md), and the pages a 24 GB card's pool would open
            // for the VAE's 0.5–1.1 GB requests are 1.6–6.3 GB.
            if options.exact_allocation == ExactAllocation::None {
                options.exact_allocation = ExactAllocation::All;
            }
        }
        Ok(options)
    }

    /// The FP8 options of the text encoder's linear layers: [`TEXT_ENCODER_FP8_KEEP`] with
    /// [`fp8_text_encoder`](Self::fp8_text_encoder) or under [`MemoryMode::Low`], none otherwise.
    pub fn text_encoder_fp8(&self) -> Option<Fp8Options> {
        (self.fp8_text_encoder || self.memory == MemoryMode::Low)
            .then(|| Fp8Options::keeping(TEXT_ENCODER_FP8_KEEP))
    }

    /// How the text encoder places its weights: its token embeddings stay on the host whenever its linear layers
    /// are FP8 ([`text_encoder_fp8`](Self::text_encoder_fp8)), the modes that trade a little time for memory
    /// (1.02 GiB less on the device at full size, ≈ 10 MB gathered and uploaded per prompt); under
    /// [`MemoryMode::Low`] its decoder layers are streamed from host memory too (5.9 GiB less, ≈ 6.5 GB uploaded
    /// per prompt).
    pub fn text_encoder_load(&self) -> TextEncoderLoadOptions {
        TextEncoderLoadOptions {
            host_embeddings: self.text_encoder_fp8().is_some(),
            stream_layers: self.memory == MemoryMode::Low,
        }
    }

    /// The cache budget of requests that set none: [`LOW_MEMORY_CACHE_BUDGET`] under [`MemoryMode::Low`].
    pub fn default_cache_budget(&self) -> Option<u64> {
        (self.memory == MemoryMode::Low).then_some(LOW_MEMORY_CACHE_BUDGET)
    }
}

/// Where the networks' weights come from: the snapshot's files, or a seeded random store per network.
struct WeightSource<'a> {
    snapshot: &'a Snapshot,
    dtype: DType,
    random_seed: Option<u64>,
    dit: DitLoadOptions,
    text_fp8: Option<Fp8Options>,
    text_load: TextEncoderLoadOptions,
}

impl WeightSource<'_> {
    /// The random store of network `n` (each network from its own seed, so that changing one config leaves the
    /// others' weights alone), or `None` to read the files.
    fn random(&self, n: u64) -> Option<WeightStore> {
        self.random_seed.map(|s| WeightStore::random(self.dtype, s.wrapping_mul(3).wrapping_add(n)))
    }

    /// The text encoder and the bytes its weights took on the device.
    fn text_encoder<B: QwenBackend>(
        &self,
        device: &B::Device,
    ) -> Result<(Qwen25VlTextEncoder<B>, WeightBytes)> {
        let dir = self.snapshot.root.join("text_encoder");
        let config = Qwen25VlConfig::from_file(&dir.join("config.json"))?;
        let mut store = match self.random(0) {
            None => Qwen25VlTextEncoder::<B>::open_store(&dir, self.dtype)?,
            Some(store) => store,
        };
        store.quantize_linears(self.text_fp8.clone());
        let model = Qwen25VlTextEncoder::from_store_with(config, &mut store, &self.text_load, device)?;
        store.finish()?;
        Ok((model, loaded_bytes(&store)))
    }

    /// The VAE and the bytes its weights took on the device.
    fn vae<B: QwenBackend>(&self, device: &B::Device) -> Result<(AutoencoderKLQwenImage<B>, WeightBytes)> {
        let dir = self.snapshot.root.join("vae");
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let mut store = match self.random(1) {
            None => WeightStore::open_dir(&dir, "diffusion_pytorch_model", self.dtype)?,
            Some(store) => store,
        };
        let model = AutoencoderKLQwenImage::from_store(config, &mut store, device)?;
        store.finish()?;
        Ok((model, loaded_bytes(&store)))
    }

    /// The DiT and the bytes its weights took on the device (and left on the host).
    fn transformer<B: QwenBackend>(
        &self,
        config: DitConfig,
        device: &B::Device,
    ) -> Result<(QwenImageTransformer<B>, WeightBytes)> {
        let mut store = match self.random(2) {
            None => WeightStore::open_dir(
                &self.snapshot.root.join("transformer"),
                "diffusion_pytorch_model",
                self.dtype,
            )?,
            Some(store) => store,
        };
        let model = QwenImageTransformer::from_store_with(config, &mut store, &self.dit, device)?;
        store.finish()?;
        Ok((model, loaded_bytes(&store)))
    }
}

/// Runs `load` with the backend's allocator in persistent mode (`Backend::memory_persistent_allocations`): on
/// burn's CUDA backend every tensor it makes gets an allocation of its own size, instead of a slice of a shared page
/// whose rest would stay reserved beside the weights for as long as they live. Only the weights are made this way;
/// activations keep the pooled pages, which a weight left in them could never give back.
fn persistent<B: Backend, I: Send, T: Send>(device: &B::Device, input: I, load: impl Fn(I) -> T + Send) -> T {
    B::memory_persistent_allocations(device, input, load)
}

/// The weight bytes a load from `store` put on the device (counted from the tensors made) and left on the host.
fn loaded_bytes(store: &WeightStore) -> WeightBytes {
    WeightBytes { device: store.device_bytes() as u64, host: store.planned_bytes().host }
}

impl<B: QwenBackend> QwenImageEditPipeline<B> {
    /// Loads a snapshot folder, or a repo id (`Qwen/Qwen-Image-Edit`) from the Hugging Face cache.
    pub fn load(
        spec: &str,
        options: &LoadOptions,
        device: &B::Device,
        progress: &mut dyn Progress,
    ) -> Result<Self> {
        Self::from_snapshot(Snapshot::locate(spec)?, options, device, progress)
    }

    /// Loads the components of `snapshot`.
    pub fn from_snapshot(
        snapshot: Snapshot,
        options: &LoadOptions,
        device: &B::Device,
        progress: &mut dyn Progress,
    ) -> Result<Self> {
        Self::build(snapshot, options, None, device, progress)
    }

    /// Builds the three networks of `snapshot` from their configs alone, with random weights created on `device`
    /// (see [`WeightStore::random`]; deterministic per `seed`); the snapshot needs no weight files. Tokenizer,
    /// image processor and scheduler come from the snapshot as usual. For benchmarks and demos of the full-size
    /// model without its 58 GB of checkpoints ([`crate::demo::DemoSize::Full`]); the images it makes are noise.
    pub fn from_snapshot_random(
        snapshot: Snapshot,
        options: &LoadOptions,
        seed: u64,
        device: &B::Device,
        progress: &mut dyn Progress,
    ) -> Result<Self> {
        Self::build(snapshot, options, Some(seed), device, progress)
    }

    /// [`Self::from_snapshot`] (weights from files) or [`Self::from_snapshot_random`] (`random_seed`).
    fn build(
        snapshot: Snapshot,
        options: &LoadOptions,
        random_seed: Option<u64>,
        device: &B::Device,
        progress: &mut dyn Progress,
    ) -> Result<Self> {
        let options = &options.resolved()?;
        let scheduler = FlowMatchEulerScheduler::new(scheduler_config(&snapshot, &options.scheduler)?)?;
        let dit_config = snapshot.dit_config()?;
        let loras = options
            .loras
            .iter()
            .map(|l| LoraWeights::load(&l.path, dit_config.num_layers))
            .collect::<Result<Vec<_>>>()?;
        if let Some(fp8) = &options.fp8 {
            fp8.check(&dit_linear_names(&dit_config)?)?;
        }
        let dit = DitLoadOptions { modulation: options.modulation, fp8: options.fp8.clone() };
        let (text_fp8, text_load) = (options.text_encoder_fp8(), options.text_encoder_load());
        let weights =
            WeightSource { snapshot: &snapshot, dtype: options.dtype, random_seed, dit, text_fp8, text_load };
        let mut clock = StageClock::<B>::new(device, progress);
        let (tokenizer, image_processor) = clock.run(Stage::LoadProcessor, |_| load_processor(&snapshot))?;
        let (text_encoder, text_bytes) = clock.run(Stage::LoadTextEncoder, |_| {
            persistent::<B, _, _>(device, (), |()| weights.text_encoder(device))
        })?;
        let (vae, vae_bytes) =
            clock.run(Stage::LoadVae, |_| persistent::<B, _, _>(device, (), |()| weights.vae(device)))?;
        let (mut transformer, dit_bytes) = clock.run(Stage::LoadTransformer, |_| {
            persistent::<B, _, _>(device, dit_config.clone(), |config| weights.transformer(config, device))
        })?;
        let weight_bytes = ComponentWeights {
            text_encoder: text_bytes,
            vae: vae_bytes,
            transformer: dit_bytes,
            text_encoder_streamed_layer: text_encoder.language.streamed_layer_bytes(),
        };
        if !loras.is_empty() {
            clock.run(Stage::LoadLora, |_| {
                persistent::<B, _, _>(device, &mut transformer, |t| apply_loras(&loras, &options.loras, t))
            })?;
        }
        // What the loads allocated and dropped (bf16 weights before their FP8 quantization, upload staging) goes
        // back: the persistent allocations of those sizes would otherwise stay reserved.
        B::release_unused_memory(device);
        let pipe = QwenImageEditPipeline {
            snapshot,
            transformer,
            vae,
            text_encoder,
            tokenizer,
            image_processor,
            scheduler,
            caches: DenoiseCaches::default(),
            modulation: ModulationTable::new(),
            options: options.clone(),
            load_stages: clock.into_timings(),
            memory_probe: MemoryProbe::default(),
            weight_bytes,
            device: device.clone(),
        };
        pipe.check_components()?;
        Ok(pipe)
    }

    /// Checks that the networks fit together (channels, widths, VAE compression).
    fn check_components(&self) -> Result<()> {
        let dit = &self.transformer.config;
        let z = self.vae.z_dim();
        let bad = |reason: String| Err(PipelineError::Snapshot { path: self.snapshot.root.clone(), reason });
        if dit.in_channels != 4 * z || dit.out_features() != 4 * z {
            return bad(format!(
                "the transformer takes {} channels per token but the VAE has {z} latent channels (4·{z} expected)",
                dit.in_channels
            ));
        }
        if dit.joint_attention_dim != self.text_encoder.hidden_size() {
            return bad(format!(
                "the transformer expects {}-wide text embeddings but the text encoder gives {}",
                dit.joint_attention_dim,
                self.text_encoder.hidden_size()
            ));
        }
        if self.vae.spatial_compression() != 8 {
            return bad(format!("the VAE compresses by {} (8 expected)", self.vae.spatial_compression()));
        }
        Ok(())
    }
}

/// The scheduler config `choice` names.
fn scheduler_config(snapshot: &Snapshot, choice: &SchedulerChoice) -> Result<SchedulerConfig> {
    Ok(match choice {
        SchedulerChoice::Snapshot => {
            SchedulerConfig::from_file(&snapshot.root.join("scheduler/scheduler_config.json"))?
        }
        SchedulerChoice::Lightning => SchedulerConfig::lightning(),
        SchedulerChoice::Config(c) => c.clone(),
    })
}

/// The tokenizer and the image processor of `snapshot`.
pub(crate) fn load_processor(snapshot: &Snapshot) -> Result<(QwenTokenizer, ImageProcessor)> {
    let tokenizer = QwenTokenizer::from_dir(&snapshot.processor_dir()?)?;
    let image_processor = ImageProcessor::new(snapshot.image_processor_config()?)?;
    Ok((tokenizer, image_processor))
}

/// Merges or attaches each of `loras` as its option says.
fn apply_loras<B: QwenBackend>(
    loras: &[LoraWeights],
    options: &[LoraOption],
    transformer: &mut QwenImageTransformer<B>,
) -> Result<()> {
    for (lora, opt) in loras.iter().zip(options) {
        if opt.merge {
            lora.merge_into(transformer, opt.multiplier)?;
        } else {
            lora.attach(transformer, opt.multiplier)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_allocation_covers_the_stages_it_names() {
        for stage in Stage::EDIT {
            assert!(!ExactAllocation::None.covers(stage), "{stage:?}");
            assert!(ExactAllocation::All.covers(stage), "{stage:?}");
            let vae = matches!(stage, Stage::EncodeImage | Stage::Decode);
            assert_eq!(ExactAllocation::Vae.covers(stage), vae, "{stage:?}");
        }
        assert_eq!(LoadOptions::default().exact_allocation, ExactAllocation::None);
    }

    #[test]
    fn low_memory_mode_implies_releasing_exact_allocations_and_dropping_the_cache() {
        let low = LoadOptions { memory: MemoryMode::Low, ..LoadOptions::default() }.resolved().unwrap();
        assert!(low.release_memory && low.drop_cache_after_denoise);
        assert_eq!(low.exact_allocation, ExactAllocation::All);
        let vae = LoadOptions {
            memory: MemoryMode::Low,
            exact_allocation: ExactAllocation::Vae,
            ..LoadOptions::default()
        };
        assert_eq!(vae.resolved().unwrap().exact_allocation, ExactAllocation::Vae);
        let resident = LoadOptions::default().resolved().unwrap();
        assert!(!resident.release_memory && !resident.drop_cache_after_denoise);
        assert_eq!(resident.exact_allocation, ExactAllocation::None);
    }
}
