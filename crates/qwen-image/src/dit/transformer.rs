//! `QwenImageTransformer2DModel`: embeddings, the blocks, the output layer, and the plain forward pass.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::{backend::Backend, bf16, f16, Bool, DType, Tensor};
use qwen_image_pruning::TokenLayout;

use super::{
    block::{temb_activation, BlockContext, BlockModulation, TransformerBlock},
    config::DitConfig,
    linears::linear_layers,
    modulation::ModRuns,
    modulation_table::{CallModulation, ModulationMode, ModulationTable},
    rope::{check_layout, AxisTables, ImageRopes, ImageShape, QwenRope, RopeTensors},
    timestep::TimestepEmbedder,
};
use crate::{
    nn::{layer_norm, Linear, RmsNorm},
    ops::QwenBackend,
    quant::Fp8Options,
    weights::WeightStore,
    ModelError, Result,
};

/// Inputs of one DiT call, as diffusers' `QwenImageTransformer2DModel.forward` takes them.
#[derive(Clone, Debug)]
pub struct DitInput<B: Backend> {
    /// Packed latent tokens `[batch, image_tokens, in_channels]`: the noisy target first, then each condition image.
    pub hidden_states: Tensor<B, 3>,
    /// Text-encoder hidden states `[batch, text_tokens, joint_attention_dim]`.
    pub encoder_hidden_states: Tensor<B, 3>,
    /// Optional text mask `[batch, text_tokens]`, `true` = valid token.
    pub encoder_hidden_states_mask: Option<Tensor<B, 2, Bool>>,
    /// σ per batch item (the scheduler timestep / 1000), in `[0, 1]`.
    pub timestep: Vec<f32>,
    /// Token grid of each image of the image stream: the target first, then the condition images.
    pub img_shapes: Vec<ImageShape>,
    /// The modulation rows of this call's timesteps, precomputed ([`ModulationTable`]; the call fails if they are
    /// missing). Without a table each block computes its rows itself, which in
    /// [table mode](ModulationMode::Table) puts every modulation layer on the device for this call: fine on a CPU,
    /// slow on a GPU (13.6 GB of uploads per call at full size).
    pub modulation: Option<ModulationTable<B>>,
}

impl<B: Backend> DitInput<B> {
    /// Sizes of the token groups.
    pub fn layout(&self) -> TokenLayout {
        let text = self.encoder_hidden_states.dims()[1];
        let target = self.img_shapes.first().map_or(0, ImageShape::tokens);
        TokenLayout::new(text, target, self.img_shapes.iter().skip(1).map(ImageShape::tokens).collect())
    }
}

/// What both forward passes share once the inputs are embedded.
pub(crate) struct Prepared<B: Backend> {
    pub img: Tensor<B, 3>,
    pub txt: Tensor<B, 3>,
    /// `silu(temb)`, `[rows·batch, dim]`: row block 0 is the real timestep, block 1 (zero_cond_t) t = 0.
    pub temb_act: Tensor<B, 2>,
    pub rows: usize,
    pub txt_rope: RopeTensors<B>,
    /// RoPE tables of the images (target first) and of the image sets asked for during this call.
    pub img_rope: ImageRopes<B>,
    pub key_mask: Option<Tensor<B, 2, Bool>>,
    /// Where the blocks' modulations come from.
    pub modulation: CallModulation<B>,
}

impl<B: QwenBackend> Prepared<B> {
    /// Modulation row of image `i` (0 = target).
    pub fn row_of(&self, image: usize) -> usize {
        usize::from(self.rows == 2 && image > 0)
    }

    /// The modulations of `block` (block number `layer`) for this call.
    pub fn block_modulation(&self, layer: usize, block: &TransformerBlock<B>) -> Result<BlockModulation<B>> {
        self.modulation.block(layer, block, &self.temb_act, self.rows)
    }
}

/// How to load the DiT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DitLoadOptions {
    /// Where the modulation weights live (default: on the host, see [`ModulationTable`]).
    pub modulation: ModulationMode,
    /// FP8 weights for the linear layers on the device, all but a keep list (default: none; see
    /// [`crate::quant`]). Each layer is quantized as it is loaded (its unquantized weight is on the device only
    /// meanwhile); a LoRA merged later is merged into the unquantized weight and the layer quantized again. Layers a
    /// checkpoint stores already quantized stay so, also without this option.
    pub fp8: Option<Fp8Options>,
}

/// A new identity for a model's weights (see [`QwenImageTransformer::extend_modulation_table`]).
fn next_weights_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The Qwen-Image MMDiT.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/transformers/transformer_qwenimage.py#L748
#[derive(Clone, Debug)]
pub struct QwenImageTransformer<B: Backend> {
    /// The checkpoint's config.
    pub config: DitConfig,
    /// `img_in`: packed latent token → model width.
    pub img_in: Linear<B>,
    /// `txt_norm`: RMSNorm of the text embeddings.
    pub txt_norm: RmsNorm<B>,
    /// `txt_in`: text width → model width.
    pub txt_in: Linear<B>,
    /// `time_text_embed.timestep_embedder`.
    pub time_embed: TimestepEmbedder<B>,
    /// `transformer_blocks`.
    pub blocks: Vec<TransformerBlock<B>>,
    /// `norm_out.linear`: `dim → 2·dim` as (scale, shift).
    pub norm_out: Linear<B>,
    /// `proj_out`: model width → packed latent token.
    pub proj_out: Linear<B>,
    /// cos/sin of every RoPE position of each axis, on the device: each call gathers its tables from them.
    rope: AxisTables<B>,
    dtype: DType,
    device: B::Device,
    /// Identifies the weights: a new value whenever they may have changed (the mutable layer visitor), so that a
    /// [`ModulationTable`] computed from other weights is recognized.
    weights_id: u64,
    /// The FP8 options it was loaded with.
    fp8: Option<Fp8Options>,
}

linear_layers!(QwenImageTransformer {
    img_in => "img_in",
    txt_in => "txt_in",
    time_embed => "time_text_embed.timestep_embedder",
    blocks => "transformer_blocks",
    norm_out => "norm_out.linear",
    proj_out => "proj_out",
} without { config, txt_norm, rope, dtype, device, weights_id, fp8 });

impl<B: QwenBackend> QwenImageTransformer<B> {
    /// Loads a diffusers `transformer/` folder: `config.json` and `diffusion_pytorch_model.safetensors` (or its
    /// shards with the index), converting weights to `dtype`, with the default [`DitLoadOptions`].
    pub fn load(dir: &Path, dtype: DType, device: &B::Device) -> Result<Self> {
        Self::load_with(dir, dtype, &DitLoadOptions::default(), device)
    }

    /// [`load`](Self::load) with `options`.
    pub fn load_with(dir: &Path, dtype: DType, options: &DitLoadOptions, device: &B::Device) -> Result<Self> {
        let config = DitConfig::from_file(&dir.join("config.json"))?;
        let mut store = WeightStore::open_dir(dir, "diffusion_pytorch_model", dtype)?;
        let model = Self::from_store_with(config, &mut store, options, device)?;
        store.finish()?;
        Ok(model)
    }

    /// Builds the model from an open store (keys exactly as diffusers names them) with the default
    /// [`DitLoadOptions`]. Does not check for leftover keys.
    pub fn from_store(config: DitConfig, store: &mut WeightStore, device: &B::Device) -> Result<Self> {
        Self::from_store_with(config, store, &DitLoadOptions::default(), device)
    }

    /// [`from_store`](Self::from_store) with `options`.
    pub fn from_store_with(
        config: DitConfig,
        store: &mut WeightStore,
        options: &DitLoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        if let Some(fp8) = &options.fp8 {
            fp8.check(&super::dit_linear_names(&config)?)?;
        }
        let outer = store.fp8_options().cloned();
        store.quantize_linears(options.fp8.clone());
        let model = Self::read(config, store, options, device);
        store.quantize_linears(outer);
        store.read_past_fp8_marker();
        model
    }

    /// The loader proper: every tensor by name and shape, in checkpoint order.
    fn read(
        config: DitConfig,
        store: &mut WeightStore,
        options: &DitLoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        let (heads, head_dim) = (config.num_attention_heads, config.attention_head_dim);
        let dim = config.inner_dim();
        let mut root = store.root();
        // In checkpoint order: top-level layers, the blocks, the output layers.
        Ok(QwenImageTransformer {
            img_in: Linear::load(&mut root.pp("img_in"), config.in_channels, dim, true, device)?,
            txt_norm: RmsNorm::load(&mut root.pp("txt_norm"), config.joint_attention_dim, 1e-6, device)?,
            txt_in: Linear::load(&mut root.pp("txt_in"), config.joint_attention_dim, dim, true, device)?,
            time_embed: TimestepEmbedder::load(
                &mut root.pp("time_text_embed.timestep_embedder"),
                dim,
                device,
            )?,
            blocks: (0..config.num_layers)
                .map(|i| {
                    let mut path = root.pp(format!("transformer_blocks.{i}"));
                    TransformerBlock::load(&mut path, heads, head_dim, options.modulation, device)
                })
                .collect::<Result<Vec<_>>>()?,
            norm_out: Linear::load(&mut root.pp("norm_out.linear"), dim, 2 * dim, true, device)?,
            proj_out: Linear::load(&mut root.pp("proj_out"), dim, config.out_features(), true, device)?,
            rope: QwenRope::new(&config.axes_dims_rope).axis_tables(device),
            dtype: store.dtype(),
            device: device.clone(),
            config,
            weights_id: next_weights_id(),
            fp8: options.fp8.clone(),
        })
    }

    /// A model of `config` with random weights created on `device` in `dtype` (benchmarks and smoke tests of the
    /// full-size model need no 40 GB checkpoint this way): the normal loader on a
    /// [random store](WeightStore::random), so every tensor has the shape and initialization
    /// ([`crate::synthetic::init_for`]) it would get from a synthetic checkpoint of the same seed.
    pub fn random(config: DitConfig, dtype: DType, device: &B::Device, seed: u64) -> Result<Self> {
        Self::from_store(config, &mut WeightStore::random(dtype, seed), device)
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The FP8 options it was loaded with ([`DitLoadOptions::fp8`]).
    pub fn fp8_options(&self) -> Option<&Fp8Options> {
        self.fp8.as_ref()
    }

    /// Whether the joint attention runs in FP8 ([`Fp8Options::attention`]).
    pub fn fp8_attention(&self) -> bool {
        self.fp8.as_ref().is_some_and(|o| o.attention)
    }

    /// Whether the pruning cache holds keys and values in 8 bits ([`Fp8Options::cache`]).
    pub fn fp8_cache(&self) -> bool {
        self.fp8.as_ref().is_some_and(|o| o.cache)
    }

    /// Number of transformer blocks.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// [`ModulationMode::Resident`] when every block's modulation layers are on the device, else
    /// [`ModulationMode::Table`].
    pub fn modulation_mode(&self) -> ModulationMode {
        let resident =
            |b: &TransformerBlock<B>| b.img_mod.layer().is_resident() && b.txt_mod.layer().is_resident();
        if self.blocks.iter().all(resident) {
            ModulationMode::Resident
        } else {
            ModulationMode::Table
        }
    }

    /// The identity of the current weights.
    pub(crate) fn weights_id(&self) -> u64 {
        self.weights_id
    }

    /// Gives the weights a new identity (they may be about to change).
    pub(crate) fn mark_weights_changed(&mut self) {
        self.weights_id = next_weights_id();
    }

    fn check_input(&self, input: &DitInput<B>) -> Result<()> {
        let cfg = &self.config;
        let [b, s, c] = input.hidden_states.dims();
        let [bt, t, ct] = input.encoder_hidden_states.dims();
        let expected: usize = input.img_shapes.iter().map(ImageShape::tokens).sum();
        let bad = |m: String| Err(ModelError::invalid(m));
        if input.img_shapes.is_empty() || input.img_shapes.iter().any(|s| s.tokens() == 0) {
            return bad("img_shapes must list the target and its condition images, each non-empty".into());
        }
        if c != cfg.in_channels || s != expected {
            return bad(format!(
                "hidden_states is {:?}; expected [batch, {expected}, {}] for img_shapes {:?}",
                [b, s, c],
                cfg.in_channels,
                input.img_shapes
            ));
        }
        if bt != b || ct != cfg.joint_attention_dim || t == 0 {
            return bad(format!(
                "encoder_hidden_states is {:?}; expected [{b}, text_tokens > 0, {}]",
                [bt, t, ct],
                cfg.joint_attention_dim
            ));
        }
        if let Some(mask) = &input.encoder_hidden_states_mask {
            if mask.dims() != [b, t] {
                return bad(format!(
                    "encoder_hidden_states_mask is {:?}; expected {:?}",
                    mask.dims(),
                    [b, t]
                ));
            }
        }
        if input.timestep.len() != b || input.timestep.iter().any(|t| !t.is_finite()) {
            return bad(format!("timestep must hold {b} finite values, got {:?}", input.timestep));
        }
        check_layout(&input.img_shapes, t)
    }

    /// Rounds σ to the model dtype, as diffusers' `timestep.to(hidden_states.dtype)` does.
    pub(crate) fn round_timestep(&self, t: f32) -> f32 {
        match self.dtype {
            DType::BF16 => bf16::from_f32(t).to_f32(),
            DType::F16 => f16::from_f32(t).to_f32(),
            _ => t,
        }
    }

    /// Modulation rows per call: 1, or 2 with `zero_cond_t` (row 1 is t = 0, for the condition images).
    pub(crate) fn modulation_rows(&self) -> usize {
        if self.config.zero_cond_t {
            2
        } else {
            1
        }
    }

    /// `silu(temb)` of one call, `[rows·batch, dim]`, from its rounded timesteps: row block 0 the timesteps, block 1
    /// (`zero_cond_t`) t = 0.
    pub(crate) fn temb_act(&self, rounded: &[f32]) -> Tensor<B, 2> {
        let mut timesteps = rounded.to_vec();
        if self.modulation_rows() == 2 {
            timesteps.extend(std::iter::repeat_n(0.0, rounded.len()));
        }
        temb_activation(self.time_embed.forward(&timesteps, self.dtype, &self.device))
    }

    pub(crate) fn prepare(&self, input: &DitInput<B>) -> Result<Prepared<B>> {
        self.check_input(input)?;
        let dev = &self.device;
        let batch = input.timestep.len();
        let rounded: Vec<f32> = input.timestep.iter().map(|&t| self.round_timestep(t)).collect();
        let modulation = self.call_modulation(input, &rounded)?;
        let img = self.img_in.forward(input.hidden_states.clone().cast(self.dtype));
        let txt =
            self.txt_in.forward(self.txt_norm.forward(input.encoder_hidden_states.clone().cast(self.dtype)));
        let n_txt = input.encoder_hidden_states.dims()[1];
        let n_img = input.hidden_states.dims()[1];
        let key_mask = input.encoder_hidden_states_mask.clone().map(|m| {
            let ones = Tensor::<B, 2, Bool>::full([batch, n_img], true, dev);
            Tensor::cat(vec![m, ones], 1)
        });
        Ok(Prepared {
            img,
            txt,
            temb_act: self.temb_act(&rounded),
            rows: self.modulation_rows(),
            txt_rope: self.rope.text(&input.img_shapes, n_txt),
            img_rope: self.rope.images(&input.img_shapes),
            key_mask,
            modulation,
        })
    }

    /// RoPE table of the images `set` (indices into the input's images), gathered once per call and set.
    pub(crate) fn image_rope(&self, p: &Prepared<B>, set: &[usize]) -> RopeTensors<B> {
        p.img_rope.set(set)
    }

    /// `norm_out` (scale first, then shift) and `proj_out`.
    pub(crate) fn final_layer(&self, x: Tensor<B, 3>, p: &Prepared<B>) -> Tensor<B, 3> {
        let [rb, dim] = p.temb_act.dims();
        let batch = rb / p.rows;
        let emb = self.norm_out.forward_2d(p.temb_act.clone().narrow(0, 0, batch));
        let scale = emb.clone().narrow(1, 0, dim).reshape([batch, 1, dim]);
        let shift = emb.narrow(1, dim, dim).reshape([batch, 1, dim]);
        self.proj_out.forward(layer_norm(x, 1e-6) * (scale + 1.0) + shift)
    }

    /// The plain forward pass, exactly as diffusers computes it: returns `[batch, image_tokens, out_features]`
    /// (predictions for every image token; the pipeline keeps the target's).
    pub fn forward(&self, input: &DitInput<B>) -> Result<Tensor<B, 3>> {
        let p = self.prepare(input)?;
        let runs = ModRuns::new(input.img_shapes.iter().enumerate().map(|(i, s)| (s.tokens(), p.row_of(i))));
        let all: Vec<usize> = (0..input.img_shapes.len()).collect();
        let img_rope = self.image_rope(&p, &all);
        let ctx = BlockContext {
            txt_rope: &p.txt_rope,
            img_rope: &img_rope,
            runs: &runs,
            extra_kv: &[],
            key_mask: p.key_mask.as_ref(),
            fp8_attention: self.fp8_attention(),
        };
        let (mut img, mut txt) = (p.img.clone(), p.txt.clone());
        for (layer, block) in self.blocks.iter().enumerate() {
            let m = p.block_modulation(layer, block)?;
            let out = block.forward(img, txt, &m, &ctx);
            (img, txt) = (out.img, out.txt);
        }
        Ok(self.final_layer(img, &p))
    }
}
