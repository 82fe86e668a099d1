//! The language model (`Qwen2_5_VLTextModel`): token embedding, pre-norm decoder layers with causal grouped-query
//! attention under M-RoPE and a SiLU-gated MLP, and the final RMSNorm.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use super::{config::TextConfig, TextEncoderLoadOptions};
use crate::{
    nn::{Linear, LinearInput, ParkedLinear, RmsNorm},
    ops::{AttentionOptions, KvSegment, QwenBackend},
    weights::{DeferredTensor, WeightPath},
    ModelError, Result,
};

/// Self-attention of one decoder layer (`self_attn`): biased Q/K/V projections, GQA, output projection without bias.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L593
#[derive(Clone, Debug)]
pub struct TextAttention<B: Backend> {
    /// `hidden → heads·head_dim`, with bias.
    pub q_proj: Linear<B>,
    /// `hidden → kv_heads·head_dim`, with bias.
    pub k_proj: Linear<B>,
    /// `hidden → kv_heads·head_dim`, with bias.
    pub v_proj: Linear<B>,
    /// `heads·head_dim → hidden`, no bias.
    pub o_proj: Linear<B>,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// The SiLU-gated MLP: `down(silu(gate(x)) · up(x))`.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L550
#[derive(Clone, Debug)]
pub struct GatedMlp<B: Backend> {
    /// `dim → intermediate`.
    pub gate_proj: Linear<B>,
    /// `dim → intermediate`.
    pub up_proj: Linear<B>,
    /// `intermediate → dim`.
    pub down_proj: Linear<B>,
}

impl<B: QwenBackend> GatedMlp<B> {
    /// Loads `gate_proj`, `up_proj`, `down_proj` under `path` (with biases when `bias`).
    pub fn load(
        path: &mut WeightPath<'_>,
        dim: usize,
        intermediate: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(GatedMlp {
            gate_proj: Linear::load(&mut path.pp("gate_proj"), dim, intermediate, bias, device)?,
            up_proj: Linear::load(&mut path.pp("up_proj"), dim, intermediate, bias, device)?,
            down_proj: Linear::load(&mut path.pp("down_proj"), intermediate, dim, bias, device)?,
        })
    }

    /// The same MLP with its intermediate width padded with zero features to a multiple of `multiple`
    /// ([`QwenBackend::dense_width_multiple`]): zero rows and biases in `gate_proj` and `up_proj` give
    /// `silu(0) · 0 = 0` there, and zero columns in `down_proj` read them, so the output is the same sum (nn/pad.rs).
    /// Unchanged when the width is a multiple already, when the layers disagree on it (a shape-only build) or when
    /// one of them cannot be padded (an FP8 weight, runtime adapters).
    pub fn pad_intermediate(self, multiple: usize) -> Self {
        let width = self.gate_proj.out_dim();
        let pad = width.next_multiple_of(multiple.max(1)) - width;
        let agree = self.up_proj.out_dim() == width && self.down_proj.in_dim() == width;
        let padded = [&self.gate_proj, &self.up_proj, &self.down_proj].map(Linear::paddable);
        if pad == 0 || !agree || padded.contains(&false) {
            return self;
        }
        GatedMlp {
            gate_proj: self.gate_proj.pad_outputs(pad),
            up_proj: self.up_proj.pad_outputs(pad),
            down_proj: self.down_proj.pad_inputs(pad),
        }
    }

    /// `[batch, tokens, dim] → [batch, tokens, dim]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // One input for both projections: quantized once when they are FP8.
        let x = LinearInput::for_layers(x, &[&self.gate_proj, &self.up_proj]);
        let (gate, up) = (self.gate_proj.forward_input(&x), self.up_proj.forward_input(&x));
        drop(x);
        self.down_proj.forward(B::silu_mul(gate, up))
    }
}

/// One decoder layer: `x + attn(input_layernorm(x))`, then `x + mlp(post_attention_layernorm(x))`.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L680
#[derive(Clone, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Pre-attention RMSNorm.
    pub input_layernorm: RmsNorm<B>,
    /// Causal self-attention.
    pub self_attn: TextAttention<B>,
    /// Pre-MLP RMSNorm.
    pub post_attention_layernorm: RmsNorm<B>,
    /// MLP without biases.
    pub mlp: GatedMlp<B>,
}

/// cos/sin of the M-RoPE angles on the device, `[tokens, head_dim]`, in the activation dtype.
#[derive(Clone, Debug)]
pub struct RopeCosSin<B: Backend> {
    /// Cosines.
    pub cos: Tensor<B, 2>,
    /// Sines.
    pub sin: Tensor<B, 2>,
}

impl<B: QwenBackend> DecoderLayer<B> {
    /// Loads layer `path` (`model.layers.{i}`).
    pub fn load(path: &mut WeightPath<'_>, cfg: &TextConfig, device: &B::Device) -> Result<Self> {
        let (dim, hd) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut attn = path.pp("self_attn");
        let self_attn = TextAttention {
            q_proj: Linear::load(&mut attn.pp("q_proj"), dim, heads * hd, true, device)?,
            k_proj: Linear::load(&mut attn.pp("k_proj"), dim, kv_heads * hd, true, device)?,
            v_proj: Linear::load(&mut attn.pp("v_proj"), dim, kv_heads * hd, true, device)?,
            o_proj: Linear::load(&mut attn.pp("o_proj"), heads * hd, dim, false, device)?,
            heads,
            kv_heads,
            head_dim: hd,
        };
        let eps = cfg.rms_norm_eps;
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(&mut path.pp("input_layernorm"), dim, eps, device)?,
            self_attn,
            post_attention_layernorm: RmsNorm::load(
                &mut path.pp("post_attention_layernorm"),
                dim,
                eps,
                device,
            )?,
            mlp: GatedMlp::load(&mut path.pp("mlp"), dim, cfg.intermediate_size, false, device)?,
        })
    }

    /// `[1, tokens, hidden] → [1, tokens, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>, rope: &RopeCosSin<B>) -> Tensor<B, 3> {
        let h = self.input_layernorm.forward(x.clone());
        let x = x + self.self_attn.forward(h, rope);
        let h = self.post_attention_layernorm.forward(x.clone());
        x + self.mlp.forward(h)
    }
}

/// A decoder layer kept in host memory between uses ([`DecoderLayers::Streamed`]): its seven linear layers parked
/// ([`ParkedLinear`]: FP8 weights stay quantized), its two norms on the device (7 KB each at full size).
#[derive(Clone, Debug)]
pub struct ParkedDecoderLayer<B: Backend> {
    input_layernorm: RmsNorm<B>,
    post_attention_layernorm: RmsNorm<B>,
    /// `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`.
    linears: [ParkedLinear; 7],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl<B: QwenBackend> ParkedDecoderLayer<B> {
    /// Moves `layer`'s linear layers to host memory.
    pub fn park(layer: DecoderLayer<B>) -> Result<Self> {
        let DecoderLayer { input_layernorm, self_attn: a, post_attention_layernorm, mlp } = layer;
        let (heads, kv_heads, head_dim) = (a.heads, a.kv_heads, a.head_dim);
        let linears = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            .map(ParkedLinear::park);
        let [q, k, v, o, gate, up, down] = linears;
        Ok(ParkedDecoderLayer {
            input_layernorm,
            post_attention_layernorm,
            linears: [q?, k?, v?, o?, gate?, up?, down?],
            heads,
            kv_heads,
            head_dim,
        })
    }

    /// The layer on `device`, bit-identical to the one parked.
    pub fn to_device(&self, device: &B::Device) -> Result<DecoderLayer<B>> {
        let [q, k, v, o, gate, up, down] = &self.linears;
        let self_attn = TextAttention {
            q_proj: q.to_device(device)?,
            k_proj: k.to_device(device)?,
            v_proj: v.to_device(device)?,
            o_proj: o.to_device(device)?,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        };
        let mlp = GatedMlp {
            gate_proj: gate.to_device(device)?,
            up_proj: up.to_device(device)?,
            down_proj: down.to_device(device)?,
        };
        Ok(DecoderLayer {
            input_layernorm: self.input_layernorm.clone(),
            self_attn,
            post_attention_layernorm: self.post_attention_layernorm.clone(),
            mlp,
        })
    }

    /// Bytes of the parked linear layers (uploaded for each use).
    pub fn size_bytes(&self) -> usize {
        self.linears.iter().map(ParkedLinear::size_bytes).sum()
    }
}

/// Where the decoder layers live.
#[derive(Clone, Debug)]
pub enum DecoderLayers<B: Backend> {
    /// On the device.
    Device(Vec<DecoderLayer<B>>),
    /// In host memory ([`TextEncoderLoadOptions::stream_layers`]): each layer is uploaded for its turn and dropped
    /// after it, so the device holds one layer at a time (≈ 0.22 GiB in FP8 at full size instead of 6.1 GiB).
    Streamed {
        /// The parked layers.
        layers: Vec<ParkedDecoderLayer<B>>,
        /// The device they are uploaded to.
        device: B::Device,
        /// Device bytes of the largest layer while it runs, at the shapes the loader asked for (what the memory
        /// plan counts; also right for a shape-only load, whose tensors are empty).
        largest_bytes: u64,
    },
}

impl<B: QwenBackend> TextAttention<B> {
    /// Causal attention of `[batch, tokens, hidden]` under the rotary angles `rope`.
    pub fn forward(&self, x: Tensor<B, 3>, rope: &RopeCosSin<B>) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let x = LinearInput::for_layers(x, &[&self.q_proj, &self.k_proj, &self.v_proj]);
        let q = self.q_proj.forward_input(&x).reshape([b, s, self.heads, self.head_dim]);
        let k = self.k_proj.forward_input(&x).reshape([b, s, self.kv_heads, self.head_dim]);
        let v = self.v_proj.forward_input(&x).reshape([b, s, self.kv_heads, self.head_dim]);
        drop(x);
        let q = B::rotary_half(q, &rope.cos, &rope.sin);
        let key = B::rotary_half(k, &rope.cos, &rope.sin);
        let options = AttentionOptions { causal: true, ..Default::default() };
        let out = B::attend(q, &[KvSegment { key, value: v }], &options);
        self.o_proj.forward(out.reshape([b, s, self.heads * self.head_dim]))
    }
}

/// Where the token embedding table (`embed_tokens.weight`, `[vocab, hidden]`) lives.
#[derive(Clone, Debug)]
pub enum TokenEmbeddings<B: Backend> {
    /// On the device; a lookup selects rows there.
    Device(Tensor<B, 2>),
    /// Left on the host (the checkpoint's memory map): a lookup gathers the prompt's rows there and uploads them,
    /// ≈ 10 MB for a full-size prompt instead of 1.02 GiB held on the device
    /// ([`TextEncoderLoadOptions::host_embeddings`](super::TextEncoderLoadOptions)).
    Host {
        /// The table.
        table: DeferredTensor,
        /// The device the looked-up rows go to.
        device: B::Device,
    },
}

/// The language model's weights.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L750
#[derive(Clone, Debug)]
pub struct LanguageModel<B: Backend> {
    /// `embed_tokens.weight`, `[vocab, hidden]`.
    pub embed_tokens: TokenEmbeddings<B>,
    /// The decoder layers.
    pub layers: DecoderLayers<B>,
    /// The final RMSNorm (`norm`).
    pub norm: RmsNorm<B>,
}

impl<B: QwenBackend> LanguageModel<B> {
    /// Loads the language model under `path` (`model` in the legacy naming), its token embeddings left on the host
    /// and its decoder layers parked there as `options` say.
    pub fn load(
        path: &mut WeightPath<'_>,
        cfg: &TextConfig,
        options: &TextEncoderLoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        let shape = [cfg.vocab_size, cfg.hidden_size];
        let mut table = path.pp("embed_tokens");
        let embed_tokens = match options.host_embeddings {
            true => {
                TokenEmbeddings::Host { table: table.deferred("weight", &shape)?, device: device.clone() }
            }
            false => TokenEmbeddings::Device(table.tensor("weight", shape, device)?),
        };
        let load_layer = |path: &mut WeightPath<'_>, i: usize| {
            DecoderLayer::load(&mut path.pp(format!("layers.{i}")), cfg, device)
        };
        let layers = if options.stream_layers {
            let (mut layers, mut largest_bytes) = (Vec::with_capacity(cfg.num_hidden_layers), 0);
            for i in 0..cfg.num_hidden_layers {
                // Each layer is loaded (and quantized) on the device as usual, read back and dropped there: the
                // device never holds more than one.
                let before = (path.store().planned_bytes().device, path.store().device_bytes());
                let layer = ParkedDecoderLayer::park(load_layer(path, i)?)?;
                // What moved to the host: the layer's bytes but its two norms' (which stay).
                let norms = 2 * cfg.hidden_size * path.store().dtype().size();
                let planned = (path.store().planned_bytes().device - before.0).saturating_sub(norms as u64);
                let actual = (path.store().device_bytes() - before.1).saturating_sub(norms);
                path.store().count_parked(planned, actual);
                largest_bytes = largest_bytes.max(planned);
                layers.push(layer);
            }
            DecoderLayers::Streamed { layers, device: device.clone(), largest_bytes }
        } else {
            DecoderLayers::Device(
                (0..cfg.num_hidden_layers).map(|i| load_layer(path, i)).collect::<Result<_>>()?,
            )
        };
        let norm = RmsNorm::load(&mut path.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps, device)?;
        Ok(LanguageModel { embed_tokens, layers, norm })
    }

    /// Device bytes of the decoder layer that is uploaded while it runs when the layers are streamed (the largest
    /// one), 0 when they are resident.
    pub fn streamed_layer_bytes(&self) -> u64 {
        match &self.layers {
            DecoderLayers::Device(_) => 0,
            DecoderLayers::Streamed { largest_bytes, .. } => *largest_bytes,
        }
    }

    /// Rows of the embedding table.
    pub fn vocab_size(&self) -> usize {
        match &self.embed_tokens {
            TokenEmbeddings::Device(t) => t.dims()[0],
            TokenEmbeddings::Host { table, .. } => table.shape()[0],
        }
    }

    /// Embeddings of `ids` (each in `0..vocab_size`), `[ids.len(), hidden]`.
    pub fn embed(&self, ids: &[i64]) -> Result<Tensor<B, 2>> {
        let vocab = self.vocab_size();
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= vocab) {
            return Err(ModelError::invalid(format!(
                "token id {id} at position {i} is outside the vocabulary of {vocab} tokens"
            )));
        }
        match &self.embed_tokens {
            TokenEmbeddings::Device(table) => {
                let index: Vec<i32> = ids.iter().map(|&id| id as i32).collect();
                let index =
                    Tensor::<B, 1, Int>::from_data(TensorData::new(index, [ids.len()]), &table.device());
                Ok(table.clone().select(0, index))
            }
            TokenEmbeddings::Host { table, device } => {
                let rows: Vec<usize> = ids.iter().map(|&id| id as usize).collect();
                table.select_rows(&rows, device)
            }
        }
    }

    /// The decoder layers and the final norm on `[1, tokens, hidden]` input embeddings (streamed layers uploaded
    /// one at a time).
    pub fn forward(&self, embeds: Tensor<B, 3>, rope: &RopeCosSin<B>) -> Result<Tensor<B, 3>> {
        let x = match &self.layers {
            DecoderLayers::Device(layers) => layers.iter().fold(embeds, |x, layer| layer.forward(x, rope)),
            DecoderLayers::Streamed { layers, device, .. } => {
                let mut x = embeds;
                for parked in layers {
                    x = parked.to_device(device)?.forward(x, rope);
                }
                x
            }
        };
        Ok(self.norm.forward(x))
    }
}
