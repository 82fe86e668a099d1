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
//! The steps follow §2–3 of the reference exactly: `calculate_dimensions` (half-to-even), Pillow-exact Lanczos
//! resizes, the vision-language condition images per variant (Edit v1: the ~1 MP image; Edit-Plus: ~384² per
//! image), the Qwen2.5-VL prompt embeddings (first 64 template tokens dropped), VAE encode (posterior mean) +
//! per-channel normalization + 2×2 packing, noise from a seed (or supplied), the flow-matching Euler scheduler with
//! μ from the noisy-token count, true CFG with per-token norm rescaling when a negative prompt is given and the scale
//! is above 1, then unpacking, de-normalization and VAE decode. The pruning cache of the DiT belongs to the
//! pipeline: it is cleared before every edit unless the request keeps it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use qwen_image::{
    dit::{DitLoadOptions, ImageShape, ModulationMode, ModulationTable, QwenImageTransformer},
    ops::QwenBackend,
    processor::{
        calculate_dimensions, encode_prompt, extract_prompt_embeds, resize, Filter, ImageProcessor,
        PromptTemplate, QwenTokenizer, RgbImage, DROP_IDX,
    },
    text_encoder::{PositionMode, Qwen25VlConfig, Qwen25VlTextEncoder, TextEncoderInput},
    vae::{AutoencoderKLQwenImage, TileConfig, VaeConfig},
    weights::WeightStore,
};
use qwen_image_pruning::{dry_run, PruneError, PruningSchedule, ScheduleSpec, TokenLayout};

use crate::{
    denoise::{denoise, DenoiseCaches, DenoiseInputs, TextConditioning},
    latents::{image_to_tensor, pack, tensor_to_image, unpack},
    lora::LoraWeights,
    noise::gaussian_noise,
    progress::{Progress, Stage},
    report::{EditReport, StageTiming, StepEntry},
    scheduler::{linspace, FlowMatchEulerScheduler, SchedulerConfig},
    snapshot::{Snapshot, Variant},
    PipelineError, Result,
};

/// Builds a fresh pruning schedule for each edit (the pipeline builds one to check it with
/// [`dry_run`] before anything runs, and another for the run itself).
pub trait ScheduleFactory {
    /// A new schedule in its initial state.
    fn build(&self) -> std::result::Result<Box<dyn PruningSchedule>, PruneError>;
}

impl ScheduleFactory for ScheduleSpec {
    fn build(&self) -> std::result::Result<Box<dyn PruningSchedule>, PruneError> {
        ScheduleSpec::build(self)
    }
}

impl<F: Fn() -> Box<dyn PruningSchedule>> ScheduleFactory for F {
    fn build(&self) -> std::result::Result<Box<dyn PruningSchedule>, PruneError> {
        Ok(self())
    }
}

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
        }
    }
}

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

/// One edit.
#[derive(Clone, Debug, PartialEq)]
pub struct EditRequest {
    /// Input images (Edit v1: exactly one; Edit-Plus: 1–3).
    pub images: Vec<RgbImage>,
    /// The instruction.
    pub prompt: String,
    /// Negative prompt for true CFG (Qwen uses `" "`).
    pub negative_prompt: Option<String>,
    /// True-CFG scale; CFG runs when it is above 1 and a negative prompt is given.
    pub true_cfg_scale: f32,
    /// Denoising steps.
    pub num_steps: usize,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Packed initial noise `[target_tokens · 4·z_dim]` instead of seeded noise (e.g. from a PyTorch run).
    pub noise: Option<Vec<f32>>,
    /// Output width (default: from the last image's aspect ratio); floored to a multiple of 16.
    pub width: Option<u32>,
    /// Output height (default: from the last image's aspect ratio); floored to a multiple of 16.
    pub height: Option<u32>,
    /// Image areas.
    pub areas: ImageAreas,
    /// Keep the pruning cache of the previous edit (same image and size) instead of clearing it.
    pub keep_cache: bool,
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
        }
    }
}

/// The result of an edit.
#[derive(Clone, Debug)]
pub struct EditOutput {
    /// The edited image.
    pub image: RgbImage,
    /// Final packed latents `[1, target_tokens, 4·z_dim]` as f32 (before unpacking and decoding).
    pub latents: Vec<f32>,
    /// The prompt embeddings that conditioned the DiT, `[1, text_tokens, hidden]`, as f32.
    pub prompt_embeds: Vec<f32>,
    /// Timings and per-step details.
    pub report: EditReport,
}

/// The loaded pipeline.
#[derive(Debug)]
pub struct QwenImageEditPipeline<B: QwenBackend> {
    snapshot: Snapshot,
    transformer: QwenImageTransformer<B>,
    vae: AutoencoderKLQwenImage<B>,
    text_encoder: Qwen25VlTextEncoder<B>,
    tokenizer: QwenTokenizer,
    image_processor: ImageProcessor,
    scheduler: FlowMatchEulerScheduler,
    caches: DenoiseCaches<B>,
    /// The DiT's modulation rows of every timestep seen so far, in table mode (kept across edits; emptied when the
    /// DiT is lent out mutably).
    modulation: ModulationTable<B>,
    options: LoadOptions,
    load_stages: Vec<StageTiming>,
    device: B::Device,
}

fn sync<B: Backend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| PipelineError::Device(format!("{e:?}")))
}

/// Runs `f` as `stage`: reports it to `progress`, synchronizes the device before stopping the clock, records it.
fn timed<B: Backend, T>(
    stage: Stage,
    device: &B::Device,
    progress: &mut dyn Progress,
    stages: &mut Vec<StageTiming>,
    f: impl FnOnce(&mut dyn Progress) -> Result<T>,
) -> Result<T> {
    progress.stage_started(stage);
    let start = Instant::now();
    let out = f(progress)?;
    sync::<B>(device)?;
    let time = start.elapsed();
    stages.push(StageTiming { stage, seconds: time.as_secs_f64() });
    progress.stage_finished(stage, time);
    Ok(out)
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

/// Sizes of one edit.
struct Plan {
    /// Output (width, height), multiples of 16.
    output: (u32, u32),
    /// Vision-language images.
    vl_images: Vec<RgbImage>,
    /// VAE images.
    vae_images: Vec<RgbImage>,
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
        let root = snapshot.root.clone();
        let dtype = options.dtype;
        let mut stages = Vec::new();
        // Cheap checks first, so that a bad LoRA or scheduler fails before gigabytes are read.
        let scheduler = FlowMatchEulerScheduler::new(match &options.scheduler {
            SchedulerChoice::Snapshot => {
                SchedulerConfig::from_file(&root.join("scheduler/scheduler_config.json"))?
            }
            SchedulerChoice::Lightning => SchedulerConfig::lightning(),
            SchedulerChoice::Config(c) => c.clone(),
        })?;
        let dit_config = qwen_image::dit::DitConfig::from_file(&root.join("transformer/config.json"))?;
        let loras = options
            .loras
            .iter()
            .map(|l| LoraWeights::load(&l.path, dit_config.num_layers))
            .collect::<Result<Vec<_>>>()?;
        let (tokenizer, image_processor) =
            timed::<B, _>(Stage::LoadProcessor, device, progress, &mut stages, |_| {
                let tokenizer = QwenTokenizer::from_dir(&snapshot.processor_dir()?)?;
                let image_processor = ImageProcessor::new(snapshot.image_processor_config()?)?;
                Ok((tokenizer, image_processor))
            })?;
        // Each network from its own seed, so that changing one config leaves the others' weights alone.
        let random =
            |n: u64| random_seed.map(|s| WeightStore::random(dtype, s.wrapping_mul(3).wrapping_add(n)));
        let text_encoder = timed::<B, _>(Stage::LoadTextEncoder, device, progress, &mut stages, |_| {
            let dir = root.join("text_encoder");
            Ok(match random(0) {
                None => Qwen25VlTextEncoder::load(&dir, dtype, device)?,
                Some(mut store) => Qwen25VlTextEncoder::from_store(
                    Qwen25VlConfig::from_file(&dir.join("config.json"))?,
                    &mut store,
                    device,
                )?,
            })
        })?;
        let vae = timed::<B, _>(Stage::LoadVae, device, progress, &mut stages, |_| {
            let dir = root.join("vae");
            Ok(match random(1) {
                None => AutoencoderKLQwenImage::load(&dir, dtype, device)?,
                Some(mut store) => AutoencoderKLQwenImage::from_store(
                    VaeConfig::from_file(&dir.join("config.json"))?,
                    &mut store,
                    device,
                )?,
            })
        })?;
        let mut transformer = timed::<B, _>(Stage::LoadTransformer, device, progress, &mut stages, |_| {
            let dir = root.join("transformer");
            let dit_options = DitLoadOptions { modulation: options.modulation };
            Ok(match random(2) {
                None => QwenImageTransformer::load_with(&dir, dtype, &dit_options, device)?,
                Some(mut store) => QwenImageTransformer::from_store_with(
                    dit_config.clone(),
                    &mut store,
                    &dit_options,
                    device,
                )?,
            })
        })?;
        if !loras.is_empty() {
            timed::<B, _>(Stage::LoadLora, device, progress, &mut stages, |_| {
                for (lora, opt) in loras.iter().zip(&options.loras) {
                    if opt.merge {
                        lora.merge_into(&mut transformer, opt.multiplier)?;
                    } else {
                        lora.attach(&mut transformer, opt.multiplier)?;
                    }
                }
                Ok(())
            })?;
        }
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
            load_stages: stages,
            device: device.clone(),
        };
        pipe.check_components()?;
        Ok(pipe)
    }

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

    /// The variant (Edit v1 or Edit-Plus).
    pub fn variant(&self) -> Variant {
        self.snapshot.variant
    }

    /// The snapshot folder.
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

    /// The DiT, mutably: attach or detach runtime LoRAs between edits (see [`LoraWeights::attach`]). Empties the
    /// modulation table (the weights may change): the next edit computes its rows again.
    pub fn transformer_mut(&mut self) -> &mut QwenImageTransformer<B> {
        self.modulation.clear();
        &mut self.transformer
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &FlowMatchEulerScheduler {
        &self.scheduler
    }

    /// Replaces the scheduler (e.g. Lightning after attaching a Lightning LoRA).
    pub fn set_scheduler(&mut self, scheduler: FlowMatchEulerScheduler) {
        self.scheduler = scheduler;
    }

    /// The options the pipeline was loaded with.
    pub fn options(&self) -> &LoadOptions {
        &self.options
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

    fn validate(&self, req: &EditRequest) -> Result<()> {
        let variant = self.variant();
        if req.prompt.trim().is_empty() {
            return Err(PipelineError::invalid("the prompt is empty"));
        }
        if req.num_steps == 0 {
            return Err(PipelineError::invalid("the number of steps must be at least 1"));
        }
        if req.num_steps > 1000 {
            return Err(PipelineError::invalid(format!("{} steps is more than 1000", req.num_steps)));
        }
        if !req.true_cfg_scale.is_finite() || req.true_cfg_scale < 0.0 {
            return Err(PipelineError::invalid(format!("the CFG scale {} must be ≥ 0", req.true_cfg_scale)));
        }
        if let Some(neg) = &req.negative_prompt {
            if neg.is_empty() {
                return Err(PipelineError::invalid(
                    "the negative prompt is empty (use \" \" for a blank one)",
                ));
            }
        }
        let n = req.images.len();
        if n == 0 || n > variant.max_images() {
            return Err(PipelineError::invalid(match variant {
                Variant::Edit => format!("Qwen-Image-Edit takes exactly 1 input image, got {n}"),
                Variant::EditPlus => format!("Qwen-Image-Edit-Plus takes 1 to 3 input images, got {n}"),
            }));
        }
        if let Some(img) = req.images.iter().find(|i| i.width() == 0 || i.height() == 0) {
            return Err(PipelineError::invalid(format!(
                "an input image is empty ({}×{})",
                img.width(),
                img.height()
            )));
        }
        for (name, v) in [("width", req.width), ("height", req.height)] {
            if let Some(v) = v {
                if !(16..=8192).contains(&v) {
                    return Err(PipelineError::invalid(format!("{name} {v} must be between 16 and 8192")));
                }
            }
        }
        if req.areas.vae < 32 * 32 || req.areas.condition < 32 * 32 {
            return Err(PipelineError::invalid("image areas must be at least 32×32 pixels"));
        }
        Ok(())
    }

    /// Resized images and sizes of `req` (diffusers' preprocessing, per variant).
    fn plan_sizes(&self, req: &EditRequest) -> Result<Plan> {
        let ratio = |img: &RgbImage| img.width() as f64 / img.height() as f64;
        let last = req.images.last().expect("validated");
        let (dw, dh) = calculate_dimensions(req.areas.vae, ratio(last))?;
        let w = req.width.unwrap_or(dw) / 16 * 16;
        let h = req.height.unwrap_or(dh) / 16 * 16;
        let (mut vl_images, mut vae_images) = (Vec::new(), Vec::new());
        for img in &req.images {
            let (vw, vh) = calculate_dimensions(req.areas.vae, ratio(img))?;
            let vae_img = resize(img, vw, vh, Filter::Lanczos)?;
            match self.variant() {
                Variant::Edit => vl_images.push(vae_img.clone()),
                Variant::EditPlus => {
                    let (cw, ch) = calculate_dimensions(req.areas.condition, ratio(img))?;
                    vl_images.push(resize(img, cw, ch, Filter::Lanczos)?);
                }
            }
            vae_images.push(vae_img);
        }
        Ok(Plan { output: (w, h), vl_images, vae_images })
    }

    fn template(&self) -> PromptTemplate {
        match self.variant() {
            Variant::Edit => PromptTemplate::Edit,
            Variant::EditPlus => PromptTemplate::EditPlus,
        }
    }

    /// The DiT's text conditioning for `prompt` with the condition images' pixels.
    /// The vision tower's embeddings of the condition images, computed once per edit and shared by the prompt and
    /// the negative prompt.
    fn encode_images(&self, pixels: &qwen_image::processor::PixelValues) -> Result<Tensor<B, 2>> {
        let pv = Tensor::<B, 2>::from_data(
            TensorData::new(pixels.values.clone(), pixels.shape()),
            (&self.device, DType::F32),
        )
        .cast(self.text_encoder.dtype());
        Ok(self.text_encoder.vision_forward(pv, &pixels.grid_thw())?)
    }

    fn encode_text(
        &self,
        ids: &[u32],
        image_embeds: &Tensor<B, 2>,
        pixels: &qwen_image::processor::PixelValues,
    ) -> Result<(TextConditioning<B>, Tensor<B, 3>)> {
        let input = TextEncoderInput::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>())
            .with_image_embeds(image_embeds.clone(), pixels.grid_thw())
            .with_positions(self.options.text_positions);
        let hidden = self.text_encoder.forward(&input)?;
        let embeds = extract_prompt_embeds(hidden, &[vec![1; ids.len()]], DROP_IDX)?;
        let mask = embeds.mask_if_padded();
        Ok((TextConditioning { embeds: embeds.embeds.clone(), mask }, embeds.embeds))
    }

    /// Runs one edit under a fresh schedule from `schedule`.
    ///
    /// Errors before any heavy work for an invalid request (empty prompt, 0 steps, wrong number of images, …) and
    /// for a schedule that would reuse condition tokens before caching them.
    pub fn edit(
        &mut self,
        req: &EditRequest,
        schedule: &dyn ScheduleFactory,
        progress: &mut dyn Progress,
    ) -> Result<EditOutput> {
        let start = Instant::now();
        self.validate(req)?;
        let device = self.device.clone();
        let mut stages = Vec::new();
        let dtype = self.transformer.dtype();
        let z_dim = self.vae.z_dim();

        // Sizes, resized images, tokens.
        let (plan, pixels, prompt_ids, negative_ids) =
            timed::<B, _>(Stage::Preprocess, &device, progress, &mut stages, |_| {
                let plan = self.plan_sizes(req)?;
                let pixels = self.image_processor.preprocess_all(&plan.vl_images)?;
                let merge = self.image_processor.config().merge_size;
                let encode = |p: &str| -> Result<Vec<u32>> {
                    let ids =
                        encode_prompt(&self.tokenizer, self.template(), p, &pixels.grids, merge)?.input_ids;
                    if ids.len() <= DROP_IDX {
                        return Err(PipelineError::invalid(format!(
                            "the prompt template gave only {} tokens (more than {DROP_IDX} are needed)",
                            ids.len()
                        )));
                    }
                    Ok(ids)
                };
                let prompt_ids = encode(&req.prompt)?;
                let cfg = req.true_cfg_scale > 1.0 && req.negative_prompt.is_some();
                let negative_ids =
                    if cfg { Some(encode(req.negative_prompt.as_deref().expect("checked"))?) } else { None };
                Ok((plan, pixels, prompt_ids, negative_ids))
            })?;
        let (out_w, out_h) = plan.output;
        let (lh, lw) = (2 * (out_h as usize / 16), 2 * (out_w as usize / 16));
        let target = ImageShape::new(lh / 2, lw / 2);
        let conditions: Vec<ImageShape> = plan
            .vae_images
            .iter()
            .map(|i| ImageShape::new(i.height() as usize / 16, i.width() as usize / 16))
            .collect();
        let target_tokens = target.tokens();

        // Sigmas, and the schedule checked against them before anything heavy runs.
        let sched = self.scheduler.set_timesteps_with_sigmas(
            &linspace(1.0, 1.0 / req.num_steps as f64, req.num_steps),
            Some(self.scheduler.mu(target_tokens)),
        )?;
        let layouts: Vec<TokenLayout> = std::iter::once(&prompt_ids)
            .chain(negative_ids.as_ref())
            .map(|ids| {
                TokenLayout::new(
                    ids.len() - DROP_IDX,
                    target_tokens,
                    conditions.iter().map(ImageShape::tokens).collect(),
                )
            })
            .collect();
        // With a kept cache the schedule may reuse from the start (the previous edit cached); each step's plan is
        // still checked against the real cache before it runs.
        let warm = req.keep_cache && self.caches.size_bytes() > 0;
        if !warm {
            for layout in &layouts {
                let mut fresh = schedule.build()?;
                dry_run(fresh.as_mut(), &sched.sigmas, self.transformer.num_layers(), layout)?;
            }
        }
        let noise = match &req.noise {
            Some(n) => {
                let want = target_tokens * 4 * z_dim;
                if n.len() != want || n.iter().any(|v| !v.is_finite()) {
                    return Err(PipelineError::invalid(format!(
                        "the supplied noise has {} values; {want} finite values ([1, {target_tokens}, {}]) are needed",
                        n.len(),
                        4 * z_dim
                    )));
                }
                Tensor::<B, 3>::from_data(
                    TensorData::new(n.clone(), [1, target_tokens, 4 * z_dim]),
                    (&device, DType::F32),
                )
            }
            None => {
                let z = TensorData::new(gaussian_noise(req.seed, z_dim * lh * lw), [1, z_dim, lh, lw]);
                pack(Tensor::<B, 4>::from_data(z, (&device, DType::F32)))?
            }
        };

        // Text encoder.
        let (prompt, negative, prompt_embeds) =
            timed::<B, _>(Stage::EncodePrompt, &device, progress, &mut stages, |_| {
                let image_embeds = self.encode_images(&pixels)?;
                let (prompt, embeds) = self.encode_text(&prompt_ids, &image_embeds, &pixels)?;
                let negative = match &negative_ids {
                    Some(ids) => Some(self.encode_text(ids, &image_embeds, &pixels)?.0),
                    None => None,
                };
                Ok((prompt, negative, embeds))
            })?;

        // VAE encode of the condition images.
        let image_latents = timed::<B, _>(Stage::EncodeImage, &device, progress, &mut stages, |_| {
            let mut parts = Vec::new();
            for img in &plan.vae_images {
                let x = image_to_tensor::<B>(img, &device).cast(self.vae.dtype());
                let z = match &self.options.vae_tiling {
                    Some(t) => self.vae.encode_mode_tiled(x, t)?,
                    None => self.vae.encode_mode(x)?,
                };
                parts.push(pack(self.vae.normalize_latents(z)?)?);
            }
            Ok(Tensor::cat(parts, 1))
        })?;

        // Denoising.
        if !req.keep_cache {
            self.caches.clear();
        }
        let img_shapes: Vec<ImageShape> = std::iter::once(target).chain(conditions.iter().copied()).collect();
        let timesteps = sched.dit_timesteps(dtype, self.scheduler.config().num_train_timesteps);
        let table_mode = self.transformer.modulation_mode() == ModulationMode::Table;
        if table_mode {
            let (transformer, modulation) = (&self.transformer, &mut self.modulation);
            timed::<B, _>(Stage::ModulationTable, &device, progress, &mut stages, |_| {
                let calls: Vec<&[f32]> = timesteps.iter().map(std::slice::from_ref).collect();
                Ok(transformer.extend_modulation_table(modulation, &calls)?)
            })?;
        }
        let inputs = DenoiseInputs {
            latents: noise,
            image_latents,
            prompt,
            negative,
            cfg_scale: req.true_cfg_scale,
            img_shapes,
            timesteps,
            sigmas: sched.sigmas.clone(),
            modulation: table_mode.then(|| self.modulation.clone()),
        };
        let mut run_schedule = schedule.build()?;
        let schedule_name = run_schedule.name();
        let (transformer, caches) = (&self.transformer, &mut self.caches);
        let (latents, step_reports) =
            timed::<B, _>(Stage::Denoise, &device, progress, &mut stages, |progress| {
                progress.denoise_started(req.num_steps);
                denoise(transformer, &inputs, run_schedule.as_mut(), caches, &mut |r| {
                    progress.step_finished(r)
                })
            })?;

        // Decode.
        let image = timed::<B, _>(Stage::Decode, &device, progress, &mut stages, |_| {
            let z = unpack(latents.clone(), lh, lw)?.cast(self.vae.dtype());
            let z = self.vae.denormalize_latents(z)?;
            let x = match &self.options.vae_tiling {
                Some(t) => self.vae.decode_tiled(z, t)?,
                None => self.vae.decode(z)?,
            };
            tensor_to_image(x)
        })?;

        let to_f32 = |t: Tensor<B, 3>| -> Result<Vec<f32>> {
            t.cast(DType::F32).into_data().to_vec().map_err(|e| PipelineError::Device(format!("{e:?}")))
        };
        let steps: Vec<StepEntry> = step_reports.iter().map(StepEntry::from).collect();
        let report = EditReport {
            variant: self.variant(),
            schedule: schedule_name,
            width: out_w,
            height: out_h,
            num_steps: req.num_steps,
            true_cfg: inputs.negative.is_some() && req.true_cfg_scale > 1.0,
            cfg_scale: req.true_cfg_scale,
            seed: req.noise.is_none().then_some(req.seed),
            text_tokens: prompt_ids.len() - DROP_IDX,
            target_tokens,
            condition_tokens: conditions.iter().map(ImageShape::tokens).collect(),
            sigmas: sched.sigmas.clone(),
            cache_peak_bytes: steps.iter().map(|s| s.cache_bytes).max().unwrap_or(0),
            cache_bytes: self.caches.size_bytes(),
            steps,
            stages,
            total_seconds: Duration::as_secs_f64(&start.elapsed()),
        };
        Ok(EditOutput { image, latents: to_f32(latents)?, prompt_embeds: to_f32(prompt_embeds)?, report })
    }
}
