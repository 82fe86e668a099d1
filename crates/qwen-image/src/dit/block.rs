//! One double-stream block (`QwenImageTransformerBlock`): adaLN, joint attention, gated residuals, GELU-tanh MLPs.

use burn::tensor::{activation::silu, backend::Backend, Bool, Tensor};

use super::{
    attention::JointAttention,
    linears::linear_layers,
    modulation::{ModRuns, Modulation},
    modulation_table::ModulationMode,
    rope::RopeTensors,
};
use crate::{
    nn::{InputNeeds, Linear, LinearInput, PlacedLinear},
    ops::{AttentionOptions, KvSegment, QwenBackend},
    weights::WeightPath,
    Result,
};

const LN_EPS: f64 = 1e-6;

/// `FeedForward(dim, mult=4, activation="gelu-approximate")`: `net.2(gelu_tanh(net.0.proj(x)))`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/attention.py#L1682
#[derive(Clone, Debug)]
pub struct FeedForward<B: Backend> {
    /// `net.0.proj`, `dim → 4·dim`.
    pub proj_in: Linear<B>,
    /// `net.2`, `4·dim → dim`.
    pub proj_out: Linear<B>,
}

linear_layers!(FeedForward { proj_in => "net.0.proj", proj_out => "net.2" } without {});

impl<B: QwenBackend> FeedForward<B> {
    /// Loads `net.0.proj` and `net.2` under `path`.
    pub fn load(path: &mut WeightPath<'_>, dim: usize, device: &B::Device) -> Result<Self> {
        Ok(FeedForward {
            proj_in: Linear::load(&mut path.pp("net.0.proj"), dim, 4 * dim, true, device)?,
            proj_out: Linear::load(&mut path.pp("net.2"), 4 * dim, dim, true, device)?,
        })
    }

    /// `[batch, tokens, dim] → [batch, tokens, dim]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_input(&LinearInput::new(x, self.input_needs()))
    }

    /// What `net.0.proj` needs of the input.
    pub fn input_needs(&self) -> InputNeeds {
        InputNeeds::of(&[&self.proj_in])
    }

    /// [`forward`](Self::forward) of an input made for [`input_needs`](Self::input_needs).
    pub fn forward_input(&self, x: &LinearInput<B>) -> Tensor<B, 3> {
        self.proj_out.forward(self.proj_in.forward_input_gelu_tanh(x))
    }

    /// The MLP sub-layer of a stream: `x + gate · forward(LayerNorm(x) · (1 + scale) + shift)`, the modulation row
    /// of each token chosen by `runs`.
    pub fn modulated_residual(
        &self,
        x: Tensor<B, 3>,
        m: &Modulation<B>,
        runs: &[(usize, usize)],
    ) -> Tensor<B, 3> {
        let input = LinearInput::layer_norm_modulated(
            x.clone(),
            &m.shift,
            &m.scale,
            runs,
            LN_EPS,
            self.input_needs(),
        );
        let hidden = self.proj_in.forward_input_gelu_tanh(&input);
        drop(input); // before the second GEMM, as when the first one took the activation by value
        B::gated_residual(x, self.proj_out.forward(hidden), &m.gate, runs)
    }
}

/// The modulations of one block at one step: attention (`1`) and MLP (`2`) triples of both streams.
#[derive(Clone, Debug)]
pub struct BlockModulation<B: Backend> {
    /// Image stream, attention sub-layer; rows 0 (real t) and, with `zero_cond_t`, 1 (t = 0).
    pub img1: Modulation<B>,
    /// Image stream, MLP sub-layer.
    pub img2: Modulation<B>,
    /// Text stream, attention sub-layer (real t only).
    pub txt1: Modulation<B>,
    /// Text stream, MLP sub-layer.
    pub txt2: Modulation<B>,
}

impl<B: Backend> BlockModulation<B> {
    /// Splits the outputs of `img_mod.1` (`[rows·batch, 6·dim]`) and `txt_mod.1` (`[batch, 6·dim]`).
    fn from_params(img: Tensor<B, 2>, txt: Tensor<B, 2>, rows: usize) -> Self {
        let three_dim = img.dims()[1] / 2;
        let half = |p: &Tensor<B, 2>, i: usize, rows: usize| {
            Modulation::from_params(p.clone().narrow(1, i * three_dim, three_dim), rows)
        };
        BlockModulation {
            img1: half(&img, 0, rows),
            img2: half(&img, 1, rows),
            txt1: half(&txt, 0, 1),
            txt2: half(&txt, 1, 1),
        }
    }

    /// Bytes of the `img_mod.1` and `txt_mod.1` outputs it holds.
    pub fn size_bytes(&self) -> usize {
        let bytes = |m: &Modulation<B>| 3 * m.shift.shape().num_elements() * m.shift.dtype().size();
        bytes(&self.img1) + bytes(&self.img2) + bytes(&self.txt1) + bytes(&self.txt2)
    }
}

/// Per-call inputs of a block besides the two streams.
#[derive(Clone, Copy, Debug)]
pub struct BlockContext<'a, B: Backend> {
    /// RoPE of the text tokens.
    pub txt_rope: &'a RopeTensors<B>,
    /// RoPE of the computed image tokens.
    pub img_rope: &'a RopeTensors<B>,
    /// Modulation rows of the computed image tokens.
    pub runs: &'a ModRuns,
    /// Keys and values of image tokens that are not computed here (reused condition images).
    pub extra_kv: &'a [KvSegment<B>],
    /// Text key mask `[batch, text + all image keys]`, `true` = attend.
    pub key_mask: Option<&'a Tensor<B, 2, Bool>>,
    /// The joint attention in FP8 ([`AttentionOptions::fp8`], [`Fp8Options::attention`](crate::quant::Fp8Options)).
    pub fp8_attention: bool,
}

/// What a block returns.
#[derive(Clone, Debug)]
pub struct BlockOutput<B: Backend> {
    /// Updated image tokens.
    pub img: Tensor<B, 3>,
    /// Updated text tokens.
    pub txt: Tensor<B, 3>,
    /// Keys of the computed image tokens (after QK-norm and RoPE), `[batch, tokens, heads, head_dim]`.
    pub img_key: Tensor<B, 4>,
    /// Values of the computed image tokens.
    pub img_value: Tensor<B, 4>,
}

/// `transformer_blocks.{i}`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/transformers/transformer_qwenimage.py#L590
#[derive(Clone, Debug)]
pub struct TransformerBlock<B: Backend> {
    /// `img_mod.1`: `dim → 6·dim` (deferred on the host in [table mode](ModulationMode::Table)).
    pub img_mod: PlacedLinear<B>,
    /// `txt_mod.1`: `dim → 6·dim` (deferred on the host in table mode).
    pub txt_mod: PlacedLinear<B>,
    /// Joint attention.
    pub attn: JointAttention<B>,
    /// Image-stream MLP.
    pub img_mlp: FeedForward<B>,
    /// Text-stream MLP.
    pub txt_mlp: FeedForward<B>,
}

linear_layers!(TransformerBlock {
    img_mod => "img_mod.1",
    txt_mod => "txt_mod.1",
    attn => "attn",
    img_mlp => "img_mlp",
    txt_mlp => "txt_mlp",
} without {});

impl<B: QwenBackend> TransformerBlock<B> {
    /// Loads a block from `path` (`transformer_blocks.{i}`); the modulation layers go onto the device only in
    /// [`ModulationMode::Resident`].
    pub fn load(
        path: &mut WeightPath<'_>,
        heads: usize,
        head_dim: usize,
        modulation: ModulationMode,
        device: &B::Device,
    ) -> Result<Self> {
        let dim = heads * head_dim;
        let resident = modulation == ModulationMode::Resident;
        Ok(TransformerBlock {
            img_mod: PlacedLinear::load(&mut path.pp("img_mod.1"), dim, 6 * dim, true, resident, device)?,
            txt_mod: PlacedLinear::load(&mut path.pp("txt_mod.1"), dim, 6 * dim, true, resident, device)?,
            attn: JointAttention::load(&mut path.pp("attn"), heads, head_dim, device)?,
            img_mlp: FeedForward::load(&mut path.pp("img_mlp"), dim, device)?,
            txt_mlp: FeedForward::load(&mut path.pp("txt_mlp"), dim, device)?,
        })
    }

    /// The block's modulations for each of `temb_acts` (`silu(temb)` of one DiT call each, `[rows·batch, dim]`; the
    /// text stream uses row 0), in order.
    ///
    /// Each call's rows come from `forward_2d` on exactly its own input, so they are bit-identical however many
    /// calls are computed together. A deferred modulation layer is made on the device once for all calls and
    /// dropped before the next one is made (one `[6·dim, dim]` weight on the device at a time).
    pub fn modulations(&self, temb_acts: &[Tensor<B, 2>], rows: usize) -> Result<Vec<BlockModulation<B>>> {
        let img: Vec<Tensor<B, 2>> = self
            .img_mod
            .with_device_layer(|l| temb_acts.iter().map(|t| l.forward_2d(t.clone())).collect())?;
        let txt: Vec<Tensor<B, 2>> = self.txt_mod.with_device_layer(|l| {
            temb_acts.iter().map(|t| l.forward_2d(t.clone().narrow(0, 0, t.dims()[0] / rows))).collect()
        })?;
        Ok(img.into_iter().zip(txt).map(|(img, txt)| BlockModulation::from_params(img, txt, rows)).collect())
    }

    /// The block's modulations from `silu(temb)` of one call (`[rows·batch, dim]`; the text stream uses row 0).
    pub fn modulation(&self, temb_act: &Tensor<B, 2>, rows: usize) -> Result<BlockModulation<B>> {
        let mut one = self.modulations(std::slice::from_ref(temb_act), rows)?;
        one.pop().ok_or_else(|| crate::ModelError::invalid("no modulation computed"))
    }

    /// Runs the block on the computed image tokens `img` and the text tokens `txt`.
    ///
    /// The image queries are `img`; the keys are `[text ; img ; ctx.extra_kv…]`.
    pub fn forward(
        &self,
        img: Tensor<B, 3>,
        txt: Tensor<B, 3>,
        m: &BlockModulation<B>,
        ctx: &BlockContext<'_, B>,
    ) -> BlockOutput<B> {
        let [batch, n_txt, dim] = txt.dims();
        let n_img = img.dims()[1];
        let txt_runs = ModRuns::single(n_txt);

        // 1. adaLN + projections (the modulated tokens quantized by the adaLN kernel for FP8 projections).
        let img_in = LinearInput::layer_norm_modulated(
            img.clone(),
            &m.img1.shift,
            &m.img1.scale,
            ctx.runs.runs(),
            LN_EPS,
            self.attn.image_needs(),
        );
        let txt_in = LinearInput::layer_norm_modulated(
            txt.clone(),
            &m.txt1.shift,
            &m.txt1.scale,
            txt_runs.runs(),
            LN_EPS,
            self.attn.text_needs(),
        );
        let (img_k, img_v) = self.attn.image_kv(&img_in, ctx.img_rope);
        let (txt_k, txt_v) = self.attn.text_kv(&txt_in, ctx.txt_rope);

        // 2. Joint attention, text first.
        let query = self.attn.joint_query(&txt_in, &img_in, ctx.txt_rope, ctx.img_rope);
        drop((img_in, txt_in));
        let mut segments = vec![
            KvSegment { key: txt_k, value: txt_v },
            KvSegment { key: img_k.clone(), value: img_v.clone() },
        ];
        segments.extend(ctx.extra_kv.iter().cloned());
        let options =
            AttentionOptions { causal: false, key_mask: ctx.key_mask.cloned(), fp8: ctx.fp8_attention };
        let joint = B::attend(query, &segments, &options).reshape([batch, n_txt + n_img, dim]);
        let txt_attn = self.attn.to_add_out.forward(joint.clone().narrow(1, 0, n_txt));
        let img_attn = self.attn.to_out.forward(joint.narrow(1, n_txt, n_img));

        // 3. Gated residuals, then the MLPs.
        let img = B::gated_residual(img, img_attn, &m.img1.gate, ctx.runs.runs());
        let txt = B::gated_residual(txt, txt_attn, &m.txt1.gate, txt_runs.runs());
        let img = self.img_mlp.modulated_residual(img, &m.img2, ctx.runs.runs());
        let txt = self.txt_mlp.modulated_residual(txt, &m.txt2, txt_runs.runs());
        BlockOutput { img, txt, img_key: img_k, img_value: img_v }
    }

    /// Keys and values of image tokens from their block input `hidden` without computing anything else
    /// (reuse with recomputed K/V): LayerNorm, modulation with `runs`, K/V projections, QK-norm, RoPE.
    pub fn image_kv(
        &self,
        hidden: Tensor<B, 3>,
        m: &BlockModulation<B>,
        rope: &RopeTensors<B>,
        runs: &ModRuns,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let needs = self.attn.image_kv_needs();
        let x = LinearInput::layer_norm_modulated(
            hidden,
            &m.img1.shift,
            &m.img1.scale,
            runs.runs(),
            LN_EPS,
            needs,
        );
        self.attn.image_kv(&x, rope)
    }
}

/// `silu(temb)`, the input of every modulation linear.
pub fn temb_activation<B: Backend>(temb: Tensor<B, 2>) -> Tensor<B, 2> {
    silu(temb)
}
