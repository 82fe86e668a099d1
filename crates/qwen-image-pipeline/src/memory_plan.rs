//! [`MemoryPlan`]: what an edit keeps on the device, per component, predicted from the snapshot's configs and the
//! request without reading a weight (issue 13, item 4; docs/memory.md).
//!
//! **Model and its assumptions.**
//!
//! - **Weights** are exact: each network is built on a [shape-only store](WeightStore::shape_only) with the load
//!   options the real load uses, and [`WeightStore::planned_bytes`] sums the shapes the loaders ask for: in the
//!   model's dtype, FP8 layers at one byte per weight plus an f32 scale per output channel, the DiT's modulation
//!   layers on the host in table mode. A real load counts the tensors it makes
//!   ([`QwenImageEditPipeline::weight_bytes`](crate::QwenImageEditPipeline::weight_bytes)); tests check both agree.
//! - **Pruning cache**: the request's schedule (fitted to its cache budget) is dry-run on the request's token layout;
//!   every (block, image) entry it ever caches holds K and V, and the block input when the schedule reads it
//!   (`compose::cached_token_bytes`): `2` or `3 · tokens · inner_dim` values per CFG branch, in the model's dtype
//!   (K and V at a byte per value and an f32 scale per token with [`Fp8Options::cache`](qwen_image::quant::Fp8Options)).
//! - **Activations** are estimates of the live tensors at each stage's largest point, in the model's dtype, with the
//!   CUDA fast path's kernels (flash attention: no score matrix, except the VAE's one-head attention, which runs as
//!   two GEMMs per chunk of query rows):
//!   - DiT block at `N = text + computed image` tokens of width `D`: the attention phase holds the two residual
//!     streams, their normalized copies, Q, K, V, the joint query copy, the attention output and its projection
//!     (9 · N · D); the image MLP holds the residual, its normalized input, the 4·D hidden and the output;
//!   - text encoder at `T` tokens: the hidden state, its norm, Q/K/V and the MLP's gate, up and product (width
//!     `I`): `T · (4·H + 3·I)`, plus the decoder layer uploaded for its turn when the layers are streamed
//!     (under [`MemoryMode::Low`]); the vision tower the same at its patches, widths of the tower;
//!   - VAE decode at `H × W` pixels (per tile when tiled): the largest level is the last upsampler's input at full
//!     resolution, `2·base_dim` channels, with its output and the last block's residual and normalized copies
//!     (`H·W·(2 + 1 + 2)·base_dim`), or the mid-block attention's scores (`L = H·W/64` latent pixels; computed in
//!     chunks of query rows, each holding `rows · L` scores in the model's dtype and three f32 copies), whichever is
//!     larger; the encode likewise at its input size.
//! - **Convolution workspace**: cuDNN's scratch for the VAE's convolutions, at most [`CONV_WORKSPACE`] (the limit
//!   the CUDA fast path puts on the algorithms it picks), counted on both VAE stages.
//! - **Runtime**: the CUDA context, cuBLASLt's workspace and the allocator's slack, a constant
//!   ([`RUNTIME_OVERHEAD`], from the H100 measurement of the DiT alone: 28.7 GiB used with 25.4 GiB of weights).
//! - The stages run one after the other and every network stays resident (under [`MemoryMode::Low`] but the text
//!   encoder's decoder layers, which stay in host memory and pass through the device one at a time). Burn's pool
//!   keeps what it reserved, so the device's *used* memory after an edit is closer to the sum of the stages'
//!   reservations than to their maximum; the plan predicts the peak *in use*, and docs/memory.md compares both.

use qwen_image::{
    dit::{DitConfig, DitLoadOptions, QwenImageTransformer},
    ops::lowered,
    text_encoder::{Qwen25VlConfig, Qwen25VlTextEncoder},
    vae::{AutoencoderKLQwenImage, VaeConfig},
    weights::{WeightBytes, WeightStore},
    CpuBackend,
};
use qwen_image_pruning::{dry_run, GroupAction, ScheduleFactory, TokenLayout};
use serde::{Deserialize, Serialize};

use crate::{
    compose::RequestSchedule, load::MemoryMode, sizes::EditSizes, snapshot::Snapshot, EditRequest,
    LoadOptions, Result,
};

/// One GiB.
pub const GIB: u64 = 1 << 30;
/// What `--low-memory` aims at: a 24 GB card with room for the display and other processes.
pub const LOW_MEMORY_TARGET: u64 = 22 * GIB;
/// The cache budget [`MemoryMode::Low`] gives requests that set none.
pub const LOW_MEMORY_CACHE_BUDGET: u64 = 2 * GIB;
/// CUDA context, cuBLASLt workspace and allocator slack (see the module docs).
pub const RUNTIME_OVERHEAD: u64 = 3 * GIB;

/// The most workspace a VAE convolution takes on the CUDA fast path: cuDNN algorithms that need more are not
/// considered (`qwen_image::cuda::conv`'s `WORKSPACE_MAX`).
pub const CONV_WORKSPACE: u64 = 1 << 30;

/// Weight bytes of the three networks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentWeights {
    /// Qwen2.5-VL (without `lm_head`).
    pub text_encoder: WeightBytes,
    /// The VAE.
    pub vae: WeightBytes,
    /// The DiT (its modulation layers on the host in table mode).
    pub transformer: WeightBytes,
    /// The text encoder's decoder layer on the device while it runs when the layers are streamed from the host
    /// (the largest; counted in the prompt stage), 0 when they are resident.
    #[serde(default)]
    pub text_encoder_streamed_layer: u64,
}

impl ComponentWeights {
    /// Device bytes of all three.
    pub fn device(&self) -> u64 {
        self.text_encoder.device + self.vae.device + self.transformer.device
    }

    /// The weights a load of `snapshot` with `options` (already [resolved](LoadOptions::resolved)) would hold, from
    /// shape-only builds of the three networks: nothing is read or allocated.
    pub fn plan(snapshot: &Snapshot, options: &LoadOptions) -> Result<Self> {
        let dtype = options.dtype;
        let cpu = Default::default();
        let mut te = WeightStore::shape_only(dtype);
        te.quantize_linears(options.text_encoder_fp8());
        let te_config = Qwen25VlConfig::from_file(&snapshot.root.join("text_encoder/config.json"))?;
        let text_encoder = Qwen25VlTextEncoder::<CpuBackend>::from_store_with(
            te_config,
            &mut te,
            &options.text_encoder_load(),
            &cpu,
        )?;
        let mut vae = WeightStore::shape_only(dtype);
        let vae_config = VaeConfig::from_file(&snapshot.root.join("vae/config.json"))?;
        AutoencoderKLQwenImage::<CpuBackend>::from_store(vae_config, &mut vae, &cpu)?;
        let mut dit = WeightStore::shape_only(dtype);
        let dit_options = DitLoadOptions { modulation: options.modulation, fp8: options.fp8.clone() };
        QwenImageTransformer::<CpuBackend>::from_store_with(
            snapshot.dit_config()?,
            &mut dit,
            &dit_options,
            &cpu,
        )?;
        Ok(ComponentWeights {
            text_encoder: te.planned_bytes(),
            vae: vae.planned_bytes(),
            transformer: dit.planned_bytes(),
            text_encoder_streamed_layer: text_encoder.language.streamed_layer_bytes(),
        })
    }
}

/// The shapes of one edit that decide its activations and its cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanShape {
    /// Tokens of the text encoder's sequence (prompt template, image placeholders).
    pub text_encoder_tokens: usize,
    /// Patches of the vision tower (all condition images).
    pub vision_patches: usize,
    /// Text tokens the DiT sees (the encoder's minus the dropped template prefix).
    pub dit_text_tokens: usize,
    /// Target (noisy latent) tokens.
    pub target_tokens: usize,
    /// Tokens of each condition image.
    pub condition_tokens: Vec<usize>,
    /// Output size `(width, height)`, pixels.
    pub output: (u32, u32),
    /// The largest VAE input, `(width, height)`.
    pub vae_input: (u32, u32),
    /// Cache bytes the schedule keeps at its largest (all CFG branches), from its dry run.
    pub cache_bytes: u64,
}

impl PlanShape {
    /// The shapes of `req` under `schedule` on `snapshot` (tokenizer and image processor only; no weights): the
    /// schedule is fitted to the request's cache budget (or the mode's default) and dry-run on evenly spaced σ.
    pub fn for_request(
        snapshot: &Snapshot,
        req: &EditRequest,
        schedule: &dyn ScheduleFactory,
        options: &LoadOptions,
    ) -> Result<Self> {
        use qwen_image::processor::{encode_prompt, PromptTemplate, DROP_IDX};
        let variant = snapshot.variant;
        let sizes = EditSizes::new(req, variant)?;
        let images = sizes.resize(&req.images)?;
        let (tokenizer, processor) = crate::load::load_processor(snapshot)?;
        let grids = processor.grids(&images.vision)?;
        let template = match variant {
            crate::Variant::Edit => PromptTemplate::Edit,
            crate::Variant::EditPlus => PromptTemplate::EditPlus,
        };
        let merge = processor.config().merge_size;
        let tokens = encode_prompt(&tokenizer, template, &req.prompt, &grids, merge)?.input_ids.len();
        let dit = snapshot.dit_config()?;
        let conditions: Vec<usize> = sizes.conditions().iter().map(|c| c.tokens()).collect();
        let target = sizes.target().tokens();
        let mut budgeted = req.clone();
        budgeted.cache_budget = req.cache_budget.or(options.default_cache_budget());
        let fp8_kv = options.fp8.as_ref().is_some_and(|o| o.cache);
        let per_token = crate::compose::cached_token_bytes(schedule, dit.inner_dim(), options.dtype, fp8_kv)?;
        let fitted = RequestSchedule::new(schedule, &budgeted, per_token);
        let n = req.num_steps.max(1);
        let sigmas: Vec<f32> = (0..=n).map(|i| 1.0 - i as f32 / n as f32).collect();
        let branches = if req.true_cfg() { 2 } else { 1 };
        let text = tokens.saturating_sub(DROP_IDX);
        let layouts = vec![TokenLayout::new(text, target, conditions.clone()); branches];
        let cache_bytes = planned_cache_bytes(&fitted, &sigmas, dit.num_layers, &layouts, per_token)?;
        let vae_input = sizes
            .vae
            .iter()
            .copied()
            .max_by_key(|&(w, h)| u64::from(w) * u64::from(h))
            .unwrap_or(sizes.output);
        Ok(PlanShape {
            text_encoder_tokens: tokens,
            vision_patches: grids.iter().map(|g| g.num_patches()).sum(),
            dit_text_tokens: text,
            target_tokens: target,
            condition_tokens: conditions,
            output: sizes.output,
            vae_input,
            cache_bytes,
        })
    }
}

/// The plan of `req` under `schedule` on `snapshot` loaded with `options`: weights from shape-only builds, nothing
/// read or allocated.
pub fn plan_request(
    snapshot: &Snapshot,
    req: &EditRequest,
    schedule: &dyn ScheduleFactory,
    options: &LoadOptions,
) -> Result<MemoryPlan> {
    let options = options.resolved()?;
    let weights = ComponentWeights::plan(snapshot, &options)?;
    let shape = PlanShape::for_request(snapshot, req, schedule, &options)?;
    let dit = snapshot.dit_config()?;
    let text_encoder = Qwen25VlConfig::from_file(&snapshot.root.join("text_encoder/config.json"))?;
    let vae = VaeConfig::from_file(&snapshot.root.join("vae/config.json"))?;
    let configs = PlanConfigs { dit: &dit, text_encoder: &text_encoder, vae: &vae };
    Ok(MemoryPlan::new(&configs, weights, &shape, &options))
}

/// Bytes of the pruning cache the plans of a dry run of `schedule` keep: every (block, image) entry cached at some
/// step, `bytes_per_token` per token, summed over `layouts` (one per CFG branch).
pub fn planned_cache_bytes(
    schedule: &dyn ScheduleFactory,
    sigmas: &[f32],
    num_layers: usize,
    layouts: &[TokenLayout],
    bytes_per_token: u64,
) -> Result<u64> {
    let mut total = 0u64;
    for layout in layouts {
        let plans = dry_run(schedule.build()?.as_mut(), sigmas, num_layers, layout)?;
        let groups = layout.condition_tokens.len() + 1;
        let mut cached = vec![false; num_layers * groups];
        for plan in &plans {
            for (layer, lp) in plan.layers.iter().enumerate() {
                for (group, gp) in lp.groups() {
                    let slot = match group {
                        qwen_image_pruning::TokenGroup::Text => continue,
                        qwen_image_pruning::TokenGroup::Target => 0,
                        qwen_image_pruning::TokenGroup::Condition(k) => k + 1,
                    };
                    if gp.action == GroupAction::ComputeAndCache && !cached[layer * groups + slot] {
                        cached[layer * groups + slot] = true;
                        total += layout.group_len(group).unwrap_or(0) as u64 * bytes_per_token;
                    }
                }
            }
        }
    }
    Ok(total)
}

/// One stage's predicted peak.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePeak {
    /// The stage (`encode prompt`, `encode image`, `denoise`, `decode`).
    pub stage: String,
    /// Its largest live activations.
    pub activation_bytes: u64,
    /// Weights, cache and runtime overhead under it, plus the activations.
    pub total_bytes: u64,
}

/// What an edit keeps on the device, per component and stage (see the module docs for the model).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// The memory mode planned for.
    pub mode: MemoryMode,
    /// Weights per network.
    pub weights: ComponentWeights,
    /// The pruning cache at its largest.
    pub cache_bytes: u64,
    /// Whether the VAE runs in tiles (asked for, or chosen by low-memory mode).
    pub vae_tiled: bool,
    /// The untiled VAE decode's activations (what decides tiling in low-memory mode).
    pub vae_decode_untiled_bytes: u64,
    /// CUDA context, workspace, allocator slack.
    pub runtime_overhead: u64,
    /// Each stage's peak.
    pub stages: Vec<StagePeak>,
    /// The largest stage total.
    pub peak_bytes: u64,
    /// The budget the mode aims at (low-memory mode: [`LOW_MEMORY_TARGET`]).
    pub target_bytes: Option<u64>,
}

/// The network configs the activation estimates read.
pub struct PlanConfigs<'a> {
    /// The DiT's.
    pub dit: &'a DitConfig,
    /// The text encoder's.
    pub text_encoder: &'a Qwen25VlConfig,
    /// The VAE's.
    pub vae: &'a VaeConfig,
}

impl MemoryPlan {
    /// The plan of an edit of `shape` with `weights` (from [`ComponentWeights::plan`] or a real load) under
    /// `options` ([resolved](LoadOptions::resolved)).
    pub fn new(
        configs: &PlanConfigs<'_>,
        weights: ComponentWeights,
        shape: &PlanShape,
        options: &LoadOptions,
    ) -> Self {
        let s = options.dtype.size() as u64;
        let (d, ff) = (configs.dit.inner_dim() as u64, 4 * configs.dit.inner_dim() as u64);
        let n_img = (shape.target_tokens + shape.condition_tokens.iter().sum::<usize>()) as u64;
        let n = n_img + shape.dit_text_tokens as u64;
        let dit = s * (9 * n * d).max(n * d + n_img * (2 * d + ff));
        let text = &configs.text_encoder.text;
        let vision = &configs.text_encoder.vision;
        let lm = shape.text_encoder_tokens as u64
            * (4 * text.hidden_size as u64 + 3 * text.intermediate_size as u64);
        let tower = shape.vision_patches as u64
            * (4 * vision.hidden_size as u64 + 3 * vision.intermediate_size as u64);
        let te = s * lm.max(tower);
        let untiled = vae_bytes(configs.vae, shape.output, s);
        let weights_device = weights.device();
        // The cache the decode runs beside: none when it is dropped after the denoising loop.
        let decode_cache = if options.drop_cache_after_denoise { 0 } else { shape.cache_bytes };
        let fits =
            weights_device + decode_cache + untiled + CONV_WORKSPACE + RUNTIME_OVERHEAD <= LOW_MEMORY_TARGET;
        let vae_tiled = options.vae_tiling.is_some() || (options.memory == MemoryMode::Low && !fits);
        let tile = options.vae_tiling.unwrap_or_default();
        let per_tile = |(w, h): (u32, u32)| {
            if vae_tiled {
                vae_bytes(configs.vae, (w.min(tile.tile as u32), h.min(tile.tile as u32)), s)
            } else {
                vae_bytes(configs.vae, (w, h), s)
            }
        };
        let base = weights_device + RUNTIME_OVERHEAD;
        let stage = |name: &str, act: u64, cache: u64| StagePeak {
            stage: name.into(),
            activation_bytes: act,
            total_bytes: base + cache + act,
        };
        let stages = vec![
            stage("encode image", per_tile(shape.vae_input) + CONV_WORKSPACE, 0),
            stage("encode prompt", te + weights.text_encoder_streamed_layer, 0),
            stage("denoise", dit, shape.cache_bytes),
            stage("decode", per_tile(shape.output) + CONV_WORKSPACE, decode_cache),
        ];
        let peak_bytes = stages.iter().map(|p| p.total_bytes).max().unwrap_or(base);
        MemoryPlan {
            mode: options.memory,
            weights,
            cache_bytes: shape.cache_bytes,
            vae_tiled,
            vae_decode_untiled_bytes: untiled,
            runtime_overhead: RUNTIME_OVERHEAD,
            stages,
            peak_bytes,
            target_bytes: (options.memory == MemoryMode::Low).then_some(LOW_MEMORY_TARGET),
        }
    }

    /// The plan for people, one line per part.
    pub fn describe(&self) -> String {
        let g = |b: u64| format!("{:.2} GiB", b as f64 / GIB as f64);
        let w = &self.weights;
        let mut lines = vec![
            format!("memory plan ({:?} mode):", self.mode),
            format!(
                "  weights on the device: text encoder {}, VAE {}, DiT {} (on the host: DiT {}, text encoder {}); \
                 total {}",
                g(w.text_encoder.device),
                g(w.vae.device),
                g(w.transformer.device),
                g(w.transformer.host),
                g(w.text_encoder.host),
                g(w.device())
            ),
            format!(
                "  pruning cache {}, runtime overhead {}, VAE {} (untiled decode {})",
                g(self.cache_bytes),
                g(self.runtime_overhead),
                if self.vae_tiled { "tiled" } else { "untiled" },
                g(self.vae_decode_untiled_bytes)
            ),
        ];
        for p in &self.stages {
            lines.push(format!(
                "  {:<14} activations {:>10}, total {}",
                p.stage,
                g(p.activation_bytes),
                g(p.total_bytes)
            ));
        }
        let verdict = match self.target_bytes {
            Some(t) if self.peak_bytes <= t => format!(" (within the {} target)", g(t)),
            Some(t) => format!(" (misses the {} target by {})", g(t), g(self.peak_bytes - t)),
            None => String::new(),
        };
        lines.push(format!("  predicted peak {}{verdict}", g(self.peak_bytes)));
        lines.join("\n")
    }
}

/// The VAE's largest activations at `(w, h)` pixels (see the module docs), in bytes of `s` each.
pub(crate) fn vae_bytes(config: &VaeConfig, (w, h): (u32, u32), s: u64) -> u64 {
    let pixels = u64::from(w) * u64::from(h);
    let convs = pixels * 5 * config.base_dim as u64;
    (s * convs).max(attention_bytes(pixels / 64, s))
}

/// The mid-block attention at `latent` pixels: one chunk of query rows ([`lowered::attention`]) holds its scores in
/// the model's dtype (`s` bytes) and in f32, and the softmax's f32 temporaries: `rows · L · (2·s + 3·4)` bytes.
fn attention_bytes(latent: u64, s: u64) -> u64 {
    let rows = lowered::attention_rows_per_chunk(latent as usize, lowered::ATTENTION_SCORES_BYTES) as u64;
    rows.min(latent) * latent * (2 * s + 12)
}
