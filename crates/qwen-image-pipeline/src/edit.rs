//! [`QwenImageEditPipeline::edit`]: one edit as a sequence of stages, one method each, every one run the same way
//! by the stage clock (progress event, device sync, timing).
//!
//! The stages follow diffusers v0.42.1's `QwenImageEditPipeline.__call__` and `QwenImageEditPlusPipeline.__call__`
//! (permalinks below: `edit.py` = [`pipeline_qwenimage_edit.py`][edit], `plus.py` = [`pipeline_qwenimage_edit_plus.py`][plus]):
//!
//! 1. **Preprocess** ([`Stage::Preprocess`]): the sizes ([`EditSizes`]: [`calculate_dimensions`][dims] rounding half
//!    to even, the output floored to multiples of 16 [edit.py#L623-L630][out]), Pillow-exact Lanczos resizes (the
//!    vision-language image per variant: Edit v1 the ~1 MP image [edit.py#L662][resize], Edit-Plus ~384² per image
//!    [plus.py#L693-L706][plus-sizes]), the vision tower's patch grids, the prompts' token ids, the σ schedule with μ
//!    from the noisy-token count [edit.py#L720-L735][sigmas] (the pruning schedule is dry-run against it here,
//!    before anything heavy runs), and the initial noise from a seed or supplied.
//! 2. **Encode image**: VAE encode (posterior mean), per-channel normalization and 2×2 packing
//!    ([edit.py#L406-L427][vae], [edit.py#L382-L388][pack]). Diffusers runs it after the prompt; the two are
//!    independent, and here it comes first and is only queued (`StageClock::queue`): the device computes it while
//!    the host prepares the vision tower's patches and queues the text encoder, whose queueing is what bounds the
//!    vision tower's time. Under a memory release or exact allocations after every stage it is awaited as the
//!    other stages are.
//! 3. **Encode prompt**: the image processor's patches (made on another thread while image encoding is queued, or
//!    here on a miss of per-image reuse) and the vision tower once for the condition images, then the Qwen2.5-VL
//!    text encoder for the prompt and, under true CFG ([edit.py#L678][cfg]), the negative prompt; the first 64
//!    template tokens are dropped ([edit.py#L225-L270][embeds]).
//! 4. **Modulation table** (table mode only, [`ModulationMode::Table`]): the DiT's modulation rows of this edit's
//!    timesteps that the pipeline's table does not hold yet (the first edit of a schedule; nothing afterwards).
//! 5. **Denoise**: the flow-matching Euler loop under the pruning schedule, with true CFG and per-token norm
//!    rescaling ([edit.py#L797-L801][cfg-norm]); see [`denoise`](crate::denoise()).
//! 6. **Decode**: unpacking, de-normalization and VAE decode ([edit.py#L832-L843][decode]); under a `mask:FILE`
//!    schedule the unmasked pixels are then copied from the source ([`keep_unmasked`]).
//! 7. The report ([`EditReport`]), untimed.
//!
//! The pruning cache of the DiT belongs to the pipeline: it is cleared before every edit unless the request keeps it.
//! The image-encoding stage and the vision-tower part of prompt encoding depend on the input images only: with
//! [`QwenImageEditPipeline::edit_with`] their results come from and go to an [`ImageReuse`] (see
//! [`reuse`](crate::reuse)). Cancellation ([`Progress::cancelled`]) is checked before each stage and after each
//! denoising step.
//!
//! [edit]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py
//! [plus]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py
//! [dims]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L155-L162
//! [out]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L623-L630
//! [resize]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L662
//! [plus-sizes]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py#L693-L706
//! [sigmas]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L720-L735
//! [cfg]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L678
//! [embeds]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L225-L270
//! [vae]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L406-L427
//! [pack]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L382-L388
//! [cfg-norm]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L797-L801
//! [decode]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L832-L843

use std::time::{Duration, Instant};

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use qwen_image::{
    dit::{ImageShape, ModulationMode, ModulationTableUpdate},
    ops::QwenBackend,
    processor::{
        encode_prompt, extract_prompt_embeds, GridThw, PixelValues, PromptTemplate, RgbImage, DROP_IDX,
    },
    text_encoder::TextEncoderInput,
    transfer::{read_f32, upload_as},
};
use qwen_image_pruning::{ScheduleFactory, TokenLayout};

use crate::{
    compose::RequestSchedule,
    denoise::{denoise_with, DenoiseInputs, TextConditioning},
    latents::{pack, tensor_to_image, unpack, upload_image},
    noise::gaussian_noise,
    progress::{check_cancelled, Progress, Stage, StageClock},
    region::keep_unmasked,
    report::{EditReport, StageTiming, StepReport},
    request::{EditOutput, EditRequest},
    reuse::{ImageReuse, NoReuse, ReuseCounts},
    scheduler::{linspace, Schedule},
    sizes::{EditSizes, ResizedImages},
    snapshot::Variant,
    validate::dry_run_each,
    PipelineError, QwenImageEditPipeline, Result,
};

/// What the preprocessing stage prepares for the networks.
pub(crate) struct EditInputs<B: Backend> {
    pub(crate) sizes: EditSizes,
    pub(crate) images: ResizedImages,
    /// The vision tower's patch grid of each vision-language image (its patches are made in the prompt stage, only
    /// when the tower runs).
    pub(crate) grids: Vec<GridThw>,
    pub(crate) prompt_ids: Vec<u32>,
    /// Under true CFG only.
    pub(crate) negative_ids: Option<Vec<u32>>,
    /// σ and timesteps of the run.
    pub(crate) schedule: Schedule,
    /// Packed initial noise `[1, target_tokens, 4·z_dim]`.
    pub(crate) noise: Tensor<B, 3>,
}

/// The text conditioning of the DiT: the prompt, and the negative prompt under true CFG.
pub(crate) struct EncodedPrompts<B: Backend> {
    prompt: TextConditioning<B>,
    negative: Option<TextConditioning<B>>,
}

/// What the denoising stage gives.
struct Denoised<B: Backend> {
    /// Final packed latents, in the model dtype.
    latents: Tensor<B, 3>,
    steps: Vec<StepReport>,
    /// The name of the schedule that ran.
    schedule: String,
}

impl<B: QwenBackend> QwenImageEditPipeline<B> {
    /// Runs one edit under fresh schedules from `schedule` (a [`ScheduleSpec`](qwen_image_pruning::ScheduleSpec), a
    /// `Clone` schedule, or [`from_fn`](qwen_image_pruning::from_fn)).
    ///
    /// Errors before any heavy work for an invalid request ([`EditRequest::validate`]: empty prompt, 0 steps, wrong
    /// number of images, …) and for a schedule that would reuse condition tokens before caching them; with
    /// [`PipelineError::Cancelled`] when `progress` asks to stop ([`Progress::cancelled`]).
    pub fn edit(
        &mut self,
        req: &EditRequest,
        schedule: &dyn ScheduleFactory,
        progress: &mut dyn Progress,
    ) -> Result<EditOutput> {
        self.edit_with(req, schedule, progress, &mut NoReuse)
    }

    /// [`Self::edit`] with the per-image encodings (VAE latents, vision-tower embeddings) taken from and given to
    /// `reuse` (e.g. a [`ReuseCache`](crate::ReuseCache) kept across edits of the same images). Reused encodings
    /// are the very tensors an earlier edit computed, so the result is bit-identical to [`Self::edit`]'s; the
    /// report's [`image_reuse`](EditReport::image_reuse) counts hits and misses. A `reuse` belongs to one pipeline.
    pub fn edit_with(
        &mut self,
        req: &EditRequest,
        schedule: &dyn ScheduleFactory,
        progress: &mut dyn Progress,
        reuse: &mut dyn ImageReuse<B>,
    ) -> Result<EditOutput> {
        let start = Instant::now();
        req.validate(self.variant())?;
        let mut counts = ReuseCounts::default();
        let dit = &self.transformer;
        let per_token = crate::compose::cached_token_bytes(
            schedule,
            dit.config.inner_dim(),
            dit.dtype(),
            dit.fp8_cache(),
        )?;
        let budgeted;
        let req = match (req.cache_budget, self.options.default_cache_budget()) {
            (None, Some(budget)) => {
                budgeted = EditRequest { cache_budget: Some(budget), ..req.clone() };
                &budgeted
            }
            _ => req,
        };
        let fitted = RequestSchedule::new(schedule, req, per_token);
        let schedule: &dyn ScheduleFactory = &fitted;
        // Off by default: with the pool trim it lowers what is held between stages but not the peak, and costs each
        // VAE stage 20–60 ms on an H100 (docs/memory.md).
        let mut clock = StageClock::<B>::new(&self.device, progress)
            .releasing_memory(self.options.release_memory)
            .allocating_exactly(self.options.exact_allocation);
        let inputs = clock.run(Stage::Preprocess, |_| self.preprocess(req, schedule))?;
        let (image_latents, text) = std::thread::scope(|scope| -> Result<_> {
            // Without per-image reuse the vision tower runs: its patches are made on another thread while this one
            // queues the image encoding (with reuse, only on a miss, in the prompt stage).
            let (processor, vision) = (&self.image_processor, &inputs.images.vision);
            let ahead = (!reuse.enabled()).then(|| scope.spawn(move || processor.preprocess_all(vision)));
            let latents = clock.queue(Stage::EncodeImage, |_| {
                self.encode_images_reused(&inputs.images.vae, reuse, &mut counts)
            })?;
            let text = clock.run(Stage::EncodePrompt, |_| {
                self.encode_prompt_stage(&inputs, joined(ahead)?, reuse, &mut counts)
            })?;
            Ok((latents, text))
        })?;
        if self.table_mode() {
            clock.run(Stage::ModulationTable, |_| self.extend_modulation_table(&inputs))?;
        }
        let denoised =
            clock.run(Stage::Denoise, |p| self.denoise(req, schedule, &inputs, &text, image_latents, p))?;
        let image = clock.run(Stage::Decode, |_| {
            let image = self.decode(&denoised.latents, &inputs.sizes)?;
            match (schedule.output_mask()?, req.images.last()) {
                (Some(mask), Some(source)) => keep_unmasked(image, source, &mask),
                _ => Ok(image),
            }
        })?;
        let mut report = self.report(req, &inputs, &denoised, clock.into_timings(), start.elapsed());
        report.image_reuse = counts;
        Ok(EditOutput {
            image,
            latents: to_f32(denoised.latents)?,
            prompt_embeds: to_f32(text.prompt.embeds)?,
            report,
        })
    }

    /// [`Stage::Preprocess`]: sizes, resized images, the vision tower's patch grids, token ids, σ (with the pruning
    /// schedule checked against them) and noise.
    pub(crate) fn preprocess(
        &self,
        req: &EditRequest,
        schedule: &dyn ScheduleFactory,
    ) -> Result<EditInputs<B>> {
        let sizes = EditSizes::new(req, self.variant())?;
        let images = sizes.resize(&req.images)?;
        let grids = self.image_processor.grids(&images.vision)?;
        let prompt_ids = self.tokenize(&req.prompt, &grids)?;
        let negative_ids = match &req.negative_prompt {
            Some(negative) if req.true_cfg() => Some(self.tokenize(negative, &grids)?),
            _ => None,
        };
        let sigmas = self.scheduler.set_timesteps_with_sigmas(
            &linspace(1.0, 1.0 / req.num_steps as f64, req.num_steps),
            Some(self.scheduler.mu(sizes.target().tokens())),
        )?;
        let inputs = EditInputs {
            noise: self.initial_noise(req, &sizes)?,
            sizes,
            images,
            grids,
            prompt_ids,
            negative_ids,
            schedule: sigmas,
        };
        self.check_schedule(req, schedule, &inputs)?;
        Ok(inputs)
    }

    /// The token ids of `prompt` in the variant's template, with the placeholders of the condition images, whose
    /// patch grids are `grids`.
    pub(crate) fn tokenize(&self, prompt: &str, grids: &[GridThw]) -> Result<Vec<u32>> {
        let template = match self.variant() {
            Variant::Edit => PromptTemplate::Edit,
            Variant::EditPlus => PromptTemplate::EditPlus,
        };
        let merge = self.image_processor.config().merge_size;
        let ids = encode_prompt(&self.tokenizer, template, prompt, grids, merge)?.input_ids;
        if ids.len() <= DROP_IDX {
            return Err(PipelineError::invalid(format!(
                "the prompt template gave only {} tokens (more than {DROP_IDX} are needed)",
                ids.len()
            )));
        }
        Ok(ids)
    }

    /// Dry-runs fresh schedules against the real σ values and token layout of each CFG branch. With a kept cache
    /// the schedule may reuse from the start (the previous edit cached), so the check is left to the model, which
    /// checks each step's plan against the real cache before it runs.
    fn check_schedule(
        &self,
        req: &EditRequest,
        schedule: &dyn ScheduleFactory,
        inputs: &EditInputs<B>,
    ) -> Result<()> {
        if req.keep_cache && self.caches.size_bytes() > 0 {
            return Ok(());
        }
        let conditions: Vec<usize> = inputs.sizes.conditions().iter().map(ImageShape::tokens).collect();
        let target = inputs.sizes.target().tokens();
        let layouts: Vec<TokenLayout> = std::iter::once(&inputs.prompt_ids)
            .chain(inputs.negative_ids.as_ref())
            .map(|ids| TokenLayout::new(ids.len() - DROP_IDX, target, conditions.clone()))
            .collect();
        dry_run_each(schedule, &inputs.schedule.sigmas, self.transformer.num_layers(), &layouts)
    }

    /// The packed initial noise: the request's, checked, or drawn from its seed.
    pub(crate) fn initial_noise(&self, req: &EditRequest, sizes: &EditSizes) -> Result<Tensor<B, 3>> {
        let z_dim = self.vae.z_dim();
        let target_tokens = sizes.target().tokens();
        match &req.noise {
            Some(n) => {
                let want = target_tokens * 4 * z_dim;
                if n.len() != want || n.iter().any(|v| !v.is_finite()) {
                    return Err(PipelineError::invalid(format!(
                        "the supplied noise has {} values; {want} finite values ([1, {target_tokens}, {}]) are needed",
                        n.len(),
                        4 * z_dim
                    )));
                }
                let data = TensorData::new(n.clone(), [1, target_tokens, 4 * z_dim]);
                Ok(Tensor::<B, 3>::from_data(data, (&self.device, DType::F32)))
            }
            None => {
                let (lh, lw) = sizes.latent_grid();
                let z = TensorData::new(gaussian_noise(req.seed, z_dim * lh * lw), [1, z_dim, lh, lw]);
                pack(Tensor::<B, 4>::from_data(z, (&self.device, DType::F32)))
            }
        }
    }

    /// [`Stage::EncodePrompt`]: the vision tower's embeddings of the condition images (from `reuse` or computed,
    /// from their patches `pixels` when these were made ahead), then the text encoder per prompt.
    pub(crate) fn encode_prompt_stage(
        &self,
        inputs: &EditInputs<B>,
        pixels: Option<PixelValues>,
        reuse: &mut dyn ImageReuse<B>,
        counts: &mut ReuseCounts,
    ) -> Result<EncodedPrompts<B>> {
        let image_embeds = self.vision_embeds_reused(&inputs.images.vision, pixels, reuse, counts)?;
        self.encode_prompts(inputs, &image_embeds)
    }

    /// [`Stage::EncodePrompt`] after the vision tower (`image_embeds`): the text encoder per prompt.
    fn encode_prompts(
        &self,
        inputs: &EditInputs<B>,
        image_embeds: &Tensor<B, 2>,
    ) -> Result<EncodedPrompts<B>> {
        let encode = |ids: &Vec<u32>| self.encode_text(ids, image_embeds, &inputs.grids);
        Ok(EncodedPrompts {
            prompt: encode(&inputs.prompt_ids)?,
            negative: inputs.negative_ids.as_ref().map(encode).transpose()?,
        })
    }

    /// The vision tower's embeddings of the vision-language `images` (shared by the prompt and the negative
    /// prompt): the image processor's patches (`ahead`, when made already), then the tower.
    pub(crate) fn vision_embeds(
        &self,
        images: &[RgbImage],
        ahead: Option<PixelValues>,
    ) -> Result<Tensor<B, 2>> {
        let pixels = match ahead {
            Some(pixels) => pixels,
            None => self.image_processor.preprocess_all(images)?,
        };
        Ok(self.text_encoder.vision_forward(self.upload_pixels(&pixels), &pixels.grid_thw())?)
    }

    /// The vision-language images' patches on the device in the text encoder's dtype (converted on the host: no
    /// copy of the f32 values, half the bytes to upload in bf16).
    pub(crate) fn upload_pixels(&self, pixels: &PixelValues) -> Tensor<B, 2> {
        upload_as::<B, 2>(&pixels.values, pixels.shape(), self.text_encoder.dtype(), &self.device)
    }

    /// The DiT's text conditioning for the token ids `ids` with the condition images' embeddings.
    fn encode_text(
        &self,
        ids: &[u32],
        image_embeds: &Tensor<B, 2>,
        grids: &[GridThw],
    ) -> Result<TextConditioning<B>> {
        prompt_conditioning(self.text_hidden(ids, image_embeds, grids)?, ids.len())
    }

    /// The text encoder's last hidden states `[1, ids.len(), hidden]` for the token ids `ids` with the condition
    /// images' embeddings.
    pub(crate) fn text_hidden(
        &self,
        ids: &[u32],
        image_embeds: &Tensor<B, 2>,
        grids: &[GridThw],
    ) -> Result<Tensor<B, 3>> {
        let input = TextEncoderInput::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>())
            .with_image_embeds(image_embeds.clone(), grids.to_vec())
            .with_positions(self.options.text_positions);
        Ok(self.text_encoder.forward(&input)?)
    }

    /// [`Stage::EncodeImage`]: the VAE latents of the condition images, normalized and packed, concatenated.
    pub(crate) fn encode_images(&self, images: &[RgbImage]) -> Result<Tensor<B, 3>> {
        let mut parts = Vec::new();
        for img in images {
            let z = self.vae_encode(self.upload_image(img)?)?;
            parts.push(self.pack_latents(z)?);
        }
        Ok(Tensor::cat(parts, 1))
    }

    /// `image` as the VAE's `[1, 3, H, W]` input in `[-1, 1]`, in the VAE's dtype.
    pub(crate) fn upload_image(&self, image: &RgbImage) -> Result<Tensor<B, 4>> {
        upload_image(image, self.vae.dtype(), &self.device)
    }

    /// The VAE's posterior mode of `x` (tiled when the options ask for it).
    pub(crate) fn vae_encode(&self, x: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        let [_, _, h, w] = x.dims();
        Ok(match &self.vae_tiling(w * h) {
            Some(t) => self.vae.encode_mode_tiled(x, t)?,
            None => self.vae.encode_mode(x)?,
        })
    }

    /// VAE latents `[1, z_dim, h, w]` normalized and packed into the DiT's tokens.
    pub(crate) fn pack_latents(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 3>> {
        pack(self.vae.normalize_latents(z)?)
    }

    /// Whether the DiT's modulation rows come from the pipeline's table (its weights are on the host).
    fn table_mode(&self) -> bool {
        self.transformer.modulation_mode() == ModulationMode::Table
    }

    /// The timestep the DiT gets at each step.
    fn dit_timesteps(&self, inputs: &EditInputs<B>) -> Vec<f32> {
        let num_train_timesteps = self.scheduler.config().num_train_timesteps;
        inputs.schedule.dit_timesteps(self.transformer.dtype(), num_train_timesteps)
    }

    /// [`Stage::ModulationTable`]: adds the rows of this edit's timesteps to the pipeline's table.
    fn extend_modulation_table(&mut self, inputs: &EditInputs<B>) -> Result<ModulationTableUpdate> {
        let timesteps = self.dit_timesteps(inputs);
        let calls: Vec<&[f32]> = timesteps.iter().map(std::slice::from_ref).collect();
        Ok(self.transformer.extend_modulation_table(&mut self.modulation, &calls)?)
    }

    /// [`Stage::Denoise`]: the Euler loop under a fresh schedule, on the pipeline's pruning caches (cleared first
    /// unless the request keeps them; dropped at the end under
    /// [`LoadOptions::drop_cache_after_denoise`](crate::LoadOptions::drop_cache_after_denoise)).
    fn denoise(
        &mut self,
        req: &EditRequest,
        schedule: &dyn ScheduleFactory,
        inputs: &EditInputs<B>,
        text: &EncodedPrompts<B>,
        image_latents: Tensor<B, 3>,
        progress: &mut dyn Progress,
    ) -> Result<Denoised<B>> {
        if !req.keep_cache {
            self.caches.clear();
        }
        let img_shapes = std::iter::once(inputs.sizes.target()).chain(inputs.sizes.conditions()).collect();
        let dit_inputs = DenoiseInputs {
            latents: inputs.noise.clone(),
            image_latents,
            prompt: text.prompt.clone(),
            negative: text.negative.clone(),
            cfg_scale: req.true_cfg_scale,
            img_shapes,
            timesteps: self.dit_timesteps(inputs),
            sigmas: inputs.schedule.sigmas.clone(),
            modulation: self.table_mode().then(|| self.modulation.clone()),
        };
        let mut run = schedule.build()?;
        progress.denoise_started(req.num_steps);
        let (latents, steps) =
            denoise_with(&self.transformer, &dit_inputs, run.as_mut(), &mut self.caches, &mut |r| {
                progress.step_finished(r);
                check_cancelled(&*progress)
            })?;
        if self.options.drop_cache_after_denoise {
            self.caches.clear();
        }
        // Named after the run: a fitted schedule's name says what its budget dropped.
        Ok(Denoised { latents, steps, schedule: run.name() })
    }

    /// [`Stage::Decode`]: the final latents unpacked, de-normalized and decoded to an image.
    pub(crate) fn decode(&self, latents: &Tensor<B, 3>, sizes: &EditSizes) -> Result<RgbImage> {
        tensor_to_image(self.vae_decode(self.decoder_input(latents, sizes)?)?)
    }

    /// The final packed latents unpacked and de-normalized: the VAE decoder's input.
    pub(crate) fn decoder_input(&self, latents: &Tensor<B, 3>, sizes: &EditSizes) -> Result<Tensor<B, 4>> {
        let (lh, lw) = sizes.latent_grid();
        let z = unpack(latents.clone(), lh, lw)?.cast(self.vae.dtype());
        Ok(self.vae.denormalize_latents(z)?)
    }

    /// The VAE decoder (tiled when the options ask for it).
    pub(crate) fn vae_decode(&self, z: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        let [_, _, h, w] = z.dims();
        let scale = self.vae.spatial_compression();
        Ok(match &self.vae_tiling(w * h * scale * scale) {
            Some(t) => self.vae.decode_tiled(z, t)?,
            None => self.vae.decode(z)?,
        })
    }

    /// The VAE tiling of an image of `pixels`: the options', or under [`MemoryMode::Low`](crate::MemoryMode::Low)
    /// the default tiles when the weights, the cache budget and the untiled VAE's activations would not fit the
    /// mode's target ([`crate::memory_plan`]).
    fn vae_tiling(&self, pixels: usize) -> Option<qwen_image::vae::TileConfig> {
        use crate::memory_plan::{vae_bytes, LOW_MEMORY_TARGET, RUNTIME_OVERHEAD};
        if self.options.vae_tiling.is_some() {
            return self.options.vae_tiling;
        }
        let budget = self.options.default_cache_budget()?;
        let side = (pixels as f64).sqrt() as u32;
        let untiled = vae_bytes(&self.vae.config, (side, side), self.vae.dtype().size() as u64);
        let need = self.weight_bytes.device() + budget + untiled + RUNTIME_OVERHEAD;
        (need > LOW_MEMORY_TARGET).then(Default::default)
    }

    /// The report of an edit that took `total` and ran `stages`.
    fn report(
        &self,
        req: &EditRequest,
        inputs: &EditInputs<B>,
        denoised: &Denoised<B>,
        stages: Vec<StageTiming>,
        total: Duration,
    ) -> EditReport {
        let (width, height) = inputs.sizes.output;
        EditReport {
            variant: self.variant(),
            schedule: denoised.schedule.clone(),
            width,
            height,
            size_adjustments: inputs.sizes.adjustments.clone(),
            num_steps: req.num_steps,
            true_cfg: req.true_cfg(),
            cfg_scale: req.true_cfg_scale,
            seed: req.noise.is_none().then_some(req.seed),
            text_tokens: inputs.prompt_ids.len() - DROP_IDX,
            target_tokens: inputs.sizes.target().tokens(),
            condition_tokens: inputs.sizes.conditions().iter().map(ImageShape::tokens).collect(),
            sigmas: inputs.schedule.sigmas.clone(),
            stages,
            cache_peak_bytes: denoised.steps.iter().map(|s| s.cache_bytes).max().unwrap_or(0),
            steps: denoised.steps.clone(),
            total_seconds: total.as_secs_f64(),
            cache_bytes: self.caches.size_bytes(),
            memory: Some(self.memory_probe.read()),
            fast_path: B::fast_path_report(&self.device),
            comparison: None,
            image_reuse: ReuseCounts::default(),
        }
    }
}

/// The DiT's text conditioning from the text encoder's last hidden states of one `len`-token prompt: the template
/// tokens dropped, the mask kept only when padded.
pub(crate) fn prompt_conditioning<B: Backend>(
    hidden: Tensor<B, 3>,
    len: usize,
) -> Result<TextConditioning<B>> {
    let embeds = extract_prompt_embeds(hidden, &[vec![1; len]], DROP_IDX)?;
    let mask = embeds.mask_if_padded();
    Ok(TextConditioning { embeds: embeds.embeds, mask })
}

/// A tensor's values as f32 (read back in its own dtype, converted on the host: the values of an f32 cast).
fn to_f32<B: Backend>(t: Tensor<B, 3>) -> Result<Vec<f32>> {
    read_f32(t).map_err(|e| PipelineError::Device(e.to_string()))
}

/// The patches an image-processor thread made ahead, if one was started (its panic, if any, goes on here).
pub(crate) fn joined(
    thread: Option<std::thread::ScopedJoinHandle<'_, qwen_image::Result<PixelValues>>>,
) -> Result<Option<PixelValues>> {
    let pixels = thread.map(|t| t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
    Ok(pixels.transpose()?)
}
