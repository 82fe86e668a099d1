//! The Qwen2.5-VL text encoder of Qwen-Image(-Edit) (`Qwen2_5_VLForConditionalGeneration` without `lm_head`),
//! generic over the burn backend.
//!
//! [`Qwen25VlTextEncoder::forward`] returns what diffusers reads as `hidden_states[-1]`: the output of the language
//! model's final norm, `[batch, tokens, hidden]`. Images enter as `pixel_values` (`[patches, 1176]` from the image
//! processor) with their `image_grid_thw`; the vision tower turns every `merge²` patches into one embedding that
//! replaces one `<|image_pad|>` token of the prompt, in order.
//!
//! - [`config`](mod@config): `config.json` (flat and nested layouts).
//! - [`vision`]: the vision tower; [`window`]: its window permutation and attention blocks; [`vision_rope`]: its 2-D
//!   rotary embedding.
//! - [`language`]: the decoder; [`mrope`]: the multimodal position ids and rotary tables; [`rotary`]: the
//!   rotate-half application both towers share.
//!
//! Weights load in both key namings, the checkpoint's legacy one (`model.layers.*`, `model.embed_tokens`,
//! `model.norm`, `visual.*`) and transformers 5's (`model.language_model.*`, `model.visual.*`); `lm_head.*` is
//! ignored. Padding (`attention_mask` zeros) is dropped before the model runs, exactly as transformers' masks
//! exclude it; the rows of padded positions in the output are zero.

pub mod config;
pub mod language;
pub mod mrope;
pub mod rotary;
pub mod vision;
pub mod vision_rope;
pub mod window;

use std::path::Path;

use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};

pub use crate::processor::GridThw;
pub use config::{Qwen25VlConfig, TextConfig, VisionConfig};
pub use mrope::PositionMode;

use self::{
    language::{LanguageModel, RopeCosSin},
    mrope::{multimodal_positions, sequential_positions, MropeTable, Positions},
    vision::VisionTower,
};
use crate::{ops::QwenBackend, weights::WeightStore, ModelError, Result};

/// A `[batch, tokens]` integer tensor (token ids or an attention mask), on the host or on the device.
#[derive(Clone, Debug)]
pub enum TokenTensor<B: Backend> {
    /// Row-major values and their shape.
    Host {
        /// `batch · tokens` values.
        values: Vec<i64>,
        /// `[batch, tokens]`.
        shape: [usize; 2],
    },
    /// A device tensor (read back to the host: positions and image placement are computed there).
    Device(Tensor<B, 2, Int>),
}

impl<B: Backend> TokenTensor<B> {
    /// Values and shape on the host; errors if `values` does not fill `shape`.
    pub fn to_host(&self) -> Result<(Vec<i64>, [usize; 2])> {
        match self {
            TokenTensor::Host { values, shape } => {
                if values.len() != shape[0] * shape[1] {
                    return Err(ModelError::invalid(format!(
                        "{} token values do not fill the shape {shape:?}",
                        values.len()
                    )));
                }
                Ok((values.clone(), *shape))
            }
            TokenTensor::Device(t) => {
                let shape = t.dims();
                let values =
                    t.clone().into_data().convert::<i64>().into_vec::<i64>().map_err(|e| {
                        ModelError::invalid(format!("cannot read the token tensor back: {e:?}"))
                    })?;
                Ok((values, shape))
            }
        }
    }
}

impl<B: Backend> From<Vec<i64>> for TokenTensor<B> {
    /// One sequence (`[1, tokens]`).
    fn from(values: Vec<i64>) -> Self {
        let shape = [1, values.len()];
        TokenTensor::Host { values, shape }
    }
}

impl<B: Backend> From<Tensor<B, 2, Int>> for TokenTensor<B> {
    fn from(t: Tensor<B, 2, Int>) -> Self {
        TokenTensor::Device(t)
    }
}

/// Inputs of one text-encoder call (the processor's `input_ids`, `attention_mask`, `pixel_values`,
/// `image_grid_thw`).
#[derive(Clone, Debug)]
pub struct TextEncoderInput<B: Backend> {
    /// Token ids `[batch, tokens]`, with one `<|image_pad|>` per image embedding.
    pub input_ids: TokenTensor<B>,
    /// `1` = real token, `0` = padding; `[batch, tokens]`. `None` = no padding.
    pub attention_mask: Option<TokenTensor<B>>,
    /// Flattened patches `[patches, C·T·p·p]` of all images, in `image_grid_thw` order.
    pub pixel_values: Option<Tensor<B, 2>>,
    /// Image embeddings computed earlier by [`Qwen25VlTextEncoder::vision_forward`] (instead of `pixel_values`),
    /// `[patches / merge², hidden]`.
    pub image_embeds: Option<Tensor<B, 2>>,
    /// `[frames, height, width]` in patches of every image, in prompt order (images of the batch rows in turn).
    pub image_grid_thw: Vec<GridThw>,
    /// How rotary positions are assigned.
    pub positions: PositionMode,
}

impl<B: Backend> TextEncoderInput<B> {
    /// A prompt without images.
    pub fn new(input_ids: impl Into<TokenTensor<B>>) -> Self {
        TextEncoderInput {
            input_ids: input_ids.into(),
            attention_mask: None,
            pixel_values: None,
            image_embeds: None,
            image_grid_thw: Vec::new(),
            positions: PositionMode::default(),
        }
    }

    /// Adds the images' patches and grids.
    pub fn with_images(mut self, pixel_values: Tensor<B, 2>, image_grid_thw: Vec<GridThw>) -> Self {
        self.pixel_values = Some(pixel_values);
        self.image_grid_thw = image_grid_thw;
        self
    }

    /// Adds precomputed image embeddings and the grids they came from.
    pub fn with_image_embeds(mut self, image_embeds: Tensor<B, 2>, image_grid_thw: Vec<GridThw>) -> Self {
        self.image_embeds = Some(image_embeds);
        self.image_grid_thw = image_grid_thw;
        self
    }

    /// Adds an attention mask.
    pub fn with_attention_mask(mut self, mask: impl Into<TokenTensor<B>>) -> Self {
        self.attention_mask = Some(mask.into());
        self
    }

    /// Chooses how rotary positions are assigned.
    pub fn with_positions(mut self, positions: PositionMode) -> Self {
        self.positions = positions;
        self
    }
}

/// The linear layers of the text encoder kept in the model's dtype when its linears are quantized to FP8
/// ([`WeightStore::quantize_linears`]): the vision tower's patch merger, whose output is the language model's image
/// embeddings. The token embeddings, the norms and the patch embedding are not linear layers of
/// [`Linear::load`](crate::nn::Linear::load) and always stay in the model's dtype. Keeping the whole vision tower in
/// bf16 too was measured on an H100 (session 29): no measurable change of the FP8 edit's prompt stage (57–65 ms
/// against 52–82 ms in the same call) for 0.2 GB more device memory.
pub const TEXT_ENCODER_FP8_KEEP: [&str; 1] = ["merger"];

/// Which names a checkpoint uses for the two towers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyNaming {
    /// `model.layers.*`, `model.embed_tokens`, `model.norm`, `visual.*` (the published checkpoints).
    Legacy,
    /// `model.language_model.*`, `model.visual.*` (transformers 5's in-memory names).
    Transformers5,
}

const V5_TEXT: &str = "model.language_model.";
const V5_VISION: &str = "model.visual.";

/// Detects the key naming of `store` and renames transformers 5 names to the legacy ones the loader reads.
///
/// Errors if the checkpoint mixes both namings.
pub fn normalize_key_names(store: &mut WeightStore) -> Result<KeyNaming> {
    let keys = store.keys();
    let v5 = keys.iter().find(|k| k.starts_with(V5_TEXT) || k.starts_with(V5_VISION)).map(|k| k.to_string());
    let legacy = keys
        .iter()
        .find(|k| {
            k.starts_with("visual.")
                || (k.starts_with("model.") && !k.starts_with(V5_TEXT) && !k.starts_with(V5_VISION))
        })
        .map(|k| k.to_string());
    match (v5, legacy) {
        (Some(a), Some(b)) => Err(ModelError::config(
            "text encoder checkpoint",
            format!("it mixes transformers 5 names (`{a}`) with legacy names (`{b}`)"),
        )),
        (Some(_), None) => {
            store.rename_keys(|k| {
                if let Some(rest) = k.strip_prefix(V5_TEXT) {
                    format!("model.{rest}")
                } else if let Some(rest) = k.strip_prefix(V5_VISION) {
                    format!("visual.{rest}")
                } else {
                    k.to_string()
                }
            });
            Ok(KeyNaming::Transformers5)
        }
        (None, _) => Ok(KeyNaming::Legacy),
    }
}

/// How [`Qwen25VlTextEncoder::from_store_with`] places the weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TextEncoderLoadOptions {
    /// Leave the token embedding table (1.02 GiB at full size in bf16) on the host: each prompt's rows are gathered
    /// there and uploaded ([`language::TokenEmbeddings::Host`]). The same embeddings, ≈ 10 MB moved per full-size
    /// prompt.
    pub host_embeddings: bool,
    /// Keep the decoder layers in host memory (page-locked on CUDA) and upload each for its turn in every prompt
    /// ([`language::DecoderLayers::Streamed`]): the device holds one layer instead of all 28 (0.22 instead of
    /// 6.1 GiB in FP8 at full size), at the cost of moving the layers' bytes once per prompt (≈ 6.5 GB in FP8:
    /// ≈ 0.13 s at PCIe 5's ≈ 50 GB/s). The same outputs, bit for bit.
    pub stream_layers: bool,
}

/// The Qwen2.5-VL text encoder: vision tower and language model.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L866
#[derive(Clone, Debug)]
pub struct Qwen25VlTextEncoder<B: Backend> {
    /// The checkpoint's config.
    pub config: Qwen25VlConfig,
    /// The vision tower (`visual`).
    pub vision: VisionTower<B>,
    /// The language model (`model`).
    pub language: LanguageModel<B>,
    dtype: DType,
    device: B::Device,
}

impl<B: QwenBackend> Qwen25VlTextEncoder<B> {
    /// Loads a `text_encoder/` folder: `config.json` and `model.safetensors` (or its shards with
    /// `model.safetensors.index.json`), in either key naming, converting weights to `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &B::Device) -> Result<Self> {
        let config = Qwen25VlConfig::from_file(&dir.join("config.json"))?;
        let mut store = Self::open_store(dir, dtype)?;
        let model = Self::from_store(config, &mut store, device)?;
        store.finish()?;
        Ok(model)
    }

    /// The store of a `text_encoder/` folder as [`Self::load`] reads it: key names normalized, `lm_head` ignored.
    /// For loads that set more options on it (e.g. [`WeightStore::quantize_linears`] with
    /// [`TEXT_ENCODER_FP8_KEEP`]).
    pub fn open_store(dir: &Path, dtype: DType) -> Result<WeightStore> {
        let mut store = WeightStore::open_dir(dir, "model", dtype)?;
        normalize_key_names(&mut store)?;
        store.ignore_prefix("lm_head.");
        Ok(store)
    }

    /// Builds the model from an open store with legacy key names (see [`normalize_key_names`]). Does not check for
    /// leftover keys.
    pub fn from_store(config: Qwen25VlConfig, store: &mut WeightStore, device: &B::Device) -> Result<Self> {
        Self::from_store_with(config, store, &TextEncoderLoadOptions::default(), device)
    }

    /// [`Self::from_store`] with load options (token embeddings on the host, streamed decoder layers).
    pub fn from_store_with(
        config: Qwen25VlConfig,
        store: &mut WeightStore,
        options: &TextEncoderLoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        let mut root = store.root();
        let vision = VisionTower::load(&mut root.pp("visual"), &config.vision, device)?;
        let language = LanguageModel::load(&mut root.pp("model"), &config.text, options, device)?;
        Ok(Qwen25VlTextEncoder { config, vision, language, dtype: store.dtype(), device: device.clone() })
    }

    /// The dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Width of the output hidden states.
    pub fn hidden_size(&self) -> usize {
        self.config.text.hidden_size
    }

    /// Number of `<|image_pad|>` tokens (= embeddings) an image of `grid` takes.
    pub fn image_tokens(&self, grid: GridThw) -> usize {
        grid.num_patches() / self.config.vision.merge_unit()
    }

    /// The vision tower alone: `pixel_values [patches, C·T·p·p]` → image embeddings `[patches / merge², hidden]`,
    /// images in `grid_thw` order.
    pub fn vision_forward(&self, pixel_values: Tensor<B, 2>, grid_thw: &[GridThw]) -> Result<Tensor<B, 2>> {
        self.vision.forward(pixel_values, grid_thw)
    }

    /// The final-norm hidden states `[batch, tokens, hidden]` of `input` (zero rows at padded positions).
    pub fn forward(&self, input: &TextEncoderInput<B>) -> Result<Tensor<B, 3>> {
        let (ids, [batch, len]) = input.input_ids.to_host()?;
        if batch == 0 || len == 0 {
            return Err(ModelError::invalid(format!("input_ids has the empty shape [{batch}, {len}]")));
        }
        let mask = self.read_mask(input, [batch, len])?;
        let cfg = &self.config;
        if let Some(i) = ids.iter().position(|&id| id == cfg.video_token_id) {
            return Err(ModelError::invalid(format!(
                "input_ids holds the video token {} at flat position {i}; videos are not supported",
                cfg.video_token_id
            )));
        }
        if let Some(i) = ids.iter().zip(&mask).position(|(&id, &m)| id == cfg.image_token_id && !m) {
            return Err(ModelError::invalid(format!(
                "an image token at flat position {i} is masked out as padding"
            )));
        }
        let image_embeds = self.image_embeds(input)?;
        let grids = &input.image_grid_thw;
        let embeddings: usize = grids.iter().map(|&g| self.image_tokens(g)).sum();
        let placeholders = ids.iter().filter(|&&id| id == cfg.image_token_id).count();
        if placeholders != embeddings {
            return Err(ModelError::invalid(format!(
                "the prompt holds {placeholders} image tokens (id {}) but the images give {embeddings} embeddings \
                 (image_grid_thw {grids:?}); every image needs t·h·w / {} tokens",
                cfg.image_token_id,
                cfg.vision.merge_unit()
            )));
        }

        let mut rows = Vec::with_capacity(batch);
        let (mut next_image, mut next_embed) = (0usize, 0usize);
        for b in 0..batch {
            let row_ids = &ids[b * len..(b + 1) * len];
            let row_mask = &mask[b * len..(b + 1) * len];
            let valid: Vec<usize> = (0..len).filter(|&i| row_mask[i]).collect();
            let compact: Vec<i64> = valid.iter().map(|&i| row_ids[i]).collect();
            // The images of this row: the next ones whose tokens add up to the row's image tokens.
            let wanted = compact.iter().filter(|&&id| id == cfg.image_token_id).count();
            let first = next_image;
            let mut taken = 0;
            while taken < wanted && next_image < grids.len() {
                taken += self.image_tokens(grids[next_image]);
                next_image += 1;
            }
            if taken != wanted {
                return Err(ModelError::invalid(format!(
                    "row {b} holds {wanted} image tokens, which do not split into whole images of \
                     image_grid_thw {:?}",
                    &grids[first..]
                )));
            }
            let row_grids = &grids[first..next_image];
            let positions: Positions = match input.positions {
                PositionMode::Multimodal => multimodal_positions(
                    &compact,
                    cfg.image_token_id,
                    row_grids,
                    cfg.vision.spatial_merge_size,
                )?,
                PositionMode::Sequential => {
                    let all = sequential_positions(len);
                    all.map(|axis| valid.iter().map(|&i| axis[i]).collect())
                }
            };
            let row_images =
                image_embeds.as_ref().filter(|_| wanted > 0).map(|e| e.clone().narrow(0, next_embed, wanted));
            next_embed += wanted;
            let hidden = self.forward_sequence(&compact, row_images, &positions)?;
            rows.push(self.unpad(hidden, &valid, len));
        }
        Ok(Tensor::stack(rows, 0))
    }

    fn read_mask(&self, input: &TextEncoderInput<B>, shape: [usize; 2]) -> Result<Vec<bool>> {
        let Some(mask) = &input.attention_mask else {
            return Ok(vec![true; shape[0] * shape[1]]);
        };
        let (values, mask_shape) = mask.to_host()?;
        if mask_shape != shape {
            return Err(ModelError::invalid(format!(
                "attention_mask has shape {mask_shape:?} but input_ids has {shape:?}"
            )));
        }
        if let Some(v) = values.iter().find(|&&v| v != 0 && v != 1) {
            return Err(ModelError::invalid(format!("attention_mask holds {v}; only 0 and 1 are allowed")));
        }
        if let Some(b) =
            (0..shape[0]).find(|&b| values[b * shape[1]..(b + 1) * shape[1]].iter().all(|&v| v == 0))
        {
            return Err(ModelError::invalid(format!("row {b} of attention_mask masks every token")));
        }
        Ok(values.iter().map(|&v| v == 1).collect())
    }

    /// The image embeddings of `input` (running the vision tower on `pixel_values`), in the model dtype.
    fn image_embeds(&self, input: &TextEncoderInput<B>) -> Result<Option<Tensor<B, 2>>> {
        let grids = &input.image_grid_thw;
        match (&input.pixel_values, &input.image_embeds) {
            (Some(_), Some(_)) => Err(ModelError::invalid("give pixel_values or image_embeds, not both")),
            (Some(pixels), None) => Ok(Some(self.vision_forward(pixels.clone(), grids)?)),
            (None, Some(embeds)) => {
                let want: usize = grids.iter().map(|&g| self.image_tokens(g)).sum();
                let [rows, width] = embeds.dims();
                if rows != want || width != self.hidden_size() || grids.is_empty() {
                    return Err(ModelError::invalid(format!(
                        "image_embeds has shape [{rows}, {width}]; image_grid_thw {grids:?} needs [{want}, {}]",
                        self.hidden_size()
                    )));
                }
                Ok(Some(embeds.clone().cast(self.dtype)))
            }
            (None, None) if !grids.is_empty() => {
                Err(ModelError::invalid("image_grid_thw is given without pixel_values or image_embeds"))
            }
            (None, None) => Ok(None),
        }
    }

    /// The language model on one unpadded sequence: embeddings with the image rows scattered in, then the layers.
    fn forward_sequence(
        &self,
        ids: &[i64],
        images: Option<Tensor<B, 2>>,
        positions: &Positions,
    ) -> Result<Tensor<B, 2>> {
        let n = ids.len();
        let text = self.language.embed(ids)?;
        let embeds = match images {
            None => text,
            Some(images) => {
                // Row i of the result: token i's embedding, or the next image embedding for an image token.
                let mut next = n;
                let index: Vec<usize> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| {
                        if id == self.config.image_token_id {
                            next += 1;
                            next - 1
                        } else {
                            i
                        }
                    })
                    .collect();
                Tensor::cat(vec![text, images], 0).select(0, index_tensor::<B>(&index, &self.device))
            }
        };
        let t = &self.config.text;
        let table = MropeTable::new(positions, t.head_dim(), t.rope_theta, t.mrope_section);
        let upload = |v: Vec<f32>| {
            B::upload_activation::<2>(TensorData::new(v, [n, t.head_dim()]), &self.device).cast(self.dtype)
        };
        let rope = RopeCosSin { cos: upload(table.cos), sin: upload(table.sin) };
        let hidden = self.language.forward(embeds.unsqueeze_dim(0), &rope)?;
        Ok(hidden.reshape([n, t.hidden_size]))
    }

    /// Places the rows of `hidden` at the `valid` positions of a `len`-token sequence, zeros elsewhere.
    fn unpad(&self, hidden: Tensor<B, 2>, valid: &[usize], len: usize) -> Tensor<B, 2> {
        if valid.len() == len {
            return hidden;
        }
        let [n, width] = hidden.dims();
        let mut index = vec![n; len];
        for (rank, &pos) in valid.iter().enumerate() {
            index[pos] = rank;
        }
        let zero = Tensor::<B, 2>::zeros([1, width], (&self.device, self.dtype));
        Tensor::cat(vec![hidden, zero], 0).select(0, index_tensor::<B>(&index, &self.device))
    }
}

/// An index tensor of `values` (as i32) on `device`.
pub(crate) fn index_tensor<B: Backend>(values: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i32> = values.iter().map(|&i| i as i32).collect();
    Tensor::from_data(TensorData::new(v, [values.len()]), device)
}
