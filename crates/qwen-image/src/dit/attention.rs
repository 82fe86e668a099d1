//! Joint attention projections (`attn.*`): Q/K/V of both streams, per-head QK-RMSNorm, RoPE, output projections.

use burn::tensor::{backend::Backend, Tensor};

use super::{linears::linear_layers, rope::RopeTensors};
use crate::{
    nn::{InputNeeds, Linear, LinearInput, RmsNorm},
    ops::{NormRope, QwenBackend},
    weights::WeightPath,
    Result,
};

/// The attention weights of one block (`transformer_blocks.{i}.attn`).
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/transformers/transformer_qwenimage.py#L473
#[derive(Clone, Debug)]
pub struct JointAttention<B: Backend> {
    /// Image-stream query projection.
    pub to_q: Linear<B>,
    /// Image-stream key projection.
    pub to_k: Linear<B>,
    /// Image-stream value projection.
    pub to_v: Linear<B>,
    /// Text-stream query projection.
    pub add_q_proj: Linear<B>,
    /// Text-stream key projection.
    pub add_k_proj: Linear<B>,
    /// Text-stream value projection.
    pub add_v_proj: Linear<B>,
    /// Per-head RMSNorm of image queries.
    pub norm_q: RmsNorm<B>,
    /// Per-head RMSNorm of image keys.
    pub norm_k: RmsNorm<B>,
    /// Per-head RMSNorm of text queries.
    pub norm_added_q: RmsNorm<B>,
    /// Per-head RMSNorm of text keys.
    pub norm_added_k: RmsNorm<B>,
    /// Image-stream output projection (`to_out.0`).
    pub to_out: Linear<B>,
    /// Text-stream output projection.
    pub to_add_out: Linear<B>,
    /// Number of heads.
    pub heads: usize,
    /// Dimension of a head.
    pub head_dim: usize,
}

linear_layers!(JointAttention {
    to_q => "to_q",
    to_k => "to_k",
    to_v => "to_v",
    add_q_proj => "add_q_proj",
    add_k_proj => "add_k_proj",
    add_v_proj => "add_v_proj",
    to_out => "to_out.0",
    to_add_out => "to_add_out",
} without { norm_q, norm_k, norm_added_q, norm_added_k, heads, head_dim });

/// Queries, keys and values of a run of tokens, `[batch, tokens, heads, head_dim]` each.
#[derive(Clone, Debug)]
pub struct Qkv<B: Backend> {
    /// Queries (normalized and rotated).
    pub q: Tensor<B, 4>,
    /// Keys (normalized and rotated).
    pub k: Tensor<B, 4>,
    /// Values.
    pub v: Tensor<B, 4>,
}

impl<B: QwenBackend> JointAttention<B> {
    /// Loads the weights under `path` (a block's `attn`).
    pub fn load(
        path: &mut WeightPath<'_>,
        heads: usize,
        head_dim: usize,
        device: &B::Device,
    ) -> Result<Self> {
        let dim = heads * head_dim;
        let mut lin = |name: &str| Linear::load(&mut path.pp(name), dim, dim, true, device);
        let (to_q, to_k, to_v) = (lin("to_q")?, lin("to_k")?, lin("to_v")?);
        let (add_q_proj, add_k_proj, add_v_proj) =
            (lin("add_q_proj")?, lin("add_k_proj")?, lin("add_v_proj")?);
        let (to_out, to_add_out) = (lin("to_out.0")?, lin("to_add_out")?);
        let mut norm = |name: &str| RmsNorm::load(&mut path.pp(name), head_dim, 1e-6, device);
        Ok(JointAttention {
            to_q,
            to_k,
            to_v,
            add_q_proj,
            add_k_proj,
            add_v_proj,
            norm_q: norm("norm_q")?,
            norm_k: norm("norm_k")?,
            norm_added_q: norm("norm_added_q")?,
            norm_added_k: norm("norm_added_k")?,
            to_out,
            to_add_out,
            heads,
            head_dim,
        })
    }

    fn heads(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, s, _] = x.dims();
        x.reshape([b, s, self.heads, self.head_dim])
    }

    /// `rope(norm(x))` on the heads of a projection (fused where the backend can).
    fn norm_rope(&self, norm: &RmsNorm<B>, x: Tensor<B, 3>, rope: &RopeTensors<B>) -> Tensor<B, 4> {
        B::rms_norm_rope(self.heads(x), &norm.weight, norm.eps, &rope.cos, &rope.sin)
    }

    /// What the image stream's Q/K/V projections need of their input (one [`LinearInput`] for the three).
    pub fn image_needs(&self) -> InputNeeds {
        InputNeeds::of(&[&self.to_q, &self.to_k, &self.to_v])
    }

    /// What the image stream's K/V projections alone need of their input.
    pub fn image_kv_needs(&self) -> InputNeeds {
        InputNeeds::of(&[&self.to_k, &self.to_v])
    }

    /// What the text stream's Q/K/V projections need of their input.
    pub fn text_needs(&self) -> InputNeeds {
        InputNeeds::of(&[&self.add_q_proj, &self.add_k_proj, &self.add_v_proj])
    }

    /// Q, K, V of modulated image tokens `[batch, tokens, dim]`.
    pub fn image_qkv(&self, x: Tensor<B, 3>, rope: &RopeTensors<B>) -> Qkv<B> {
        let x = LinearInput::new(x, self.image_needs());
        let q = self.norm_rope(&self.norm_q, self.to_q.forward_input(&x), rope);
        let (k, v) = self.image_kv(&x, rope);
        Qkv { q, k, v }
    }

    /// K, V only of modulated image tokens (for condition tokens whose queries are not needed); `x` made for at
    /// least [`image_kv_needs`](Self::image_kv_needs).
    pub fn image_kv(&self, x: &LinearInput<B>, rope: &RopeTensors<B>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let k = self.norm_rope(&self.norm_k, self.to_k.forward_input(x), rope);
        let v = self.heads(self.to_v.forward_input(x));
        (k, v)
    }

    /// K, V only of modulated text tokens; `c` made for at least the text K/V projections.
    pub fn text_kv(&self, c: &LinearInput<B>, rope: &RopeTensors<B>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let k = self.norm_rope(&self.norm_added_k, self.add_k_proj.forward_input(c), rope);
        let v = self.heads(self.add_v_proj.forward_input(c));
        (k, v)
    }

    /// The joint queries `[text ; image]` of modulated text tokens `c` and image tokens `x` (made for
    /// [`text_needs`](Self::text_needs) and [`image_needs`](Self::image_needs)): both streams' query projections,
    /// QK-normalized and rotated into one tensor ([`QwenBackend::rms_norm_rope_cat`]).
    pub fn joint_query(
        &self,
        c: &LinearInput<B>,
        x: &LinearInput<B>,
        txt_rope: &RopeTensors<B>,
        img_rope: &RopeTensors<B>,
    ) -> Tensor<B, 4> {
        let text = NormRope {
            x: self.heads(self.add_q_proj.forward_input(c)),
            weight: &self.norm_added_q.weight,
            eps: self.norm_added_q.eps,
            cos: &txt_rope.cos,
            sin: &txt_rope.sin,
        };
        let image = NormRope {
            x: self.heads(self.to_q.forward_input(x)),
            weight: &self.norm_q.weight,
            eps: self.norm_q.eps,
            cos: &img_rope.cos,
            sin: &img_rope.sin,
        };
        B::rms_norm_rope_cat(&[text, image])
    }

    /// Q, K, V of modulated text tokens.
    pub fn text_qkv(&self, c: Tensor<B, 3>, rope: &RopeTensors<B>) -> Qkv<B> {
        let c = LinearInput::new(c, self.text_needs());
        let q = self.norm_rope(&self.norm_added_q, self.add_q_proj.forward_input(&c), rope);
        let (k, v) = self.text_kv(&c, rope);
        Qkv { q, k, v }
    }
}
