//! The vision tower (`Qwen2_5_VisionTransformerPretrainedModel`): patch embedding, pre-norm blocks with windowed
//! or per-image attention under the 2-D rotary embedding, and the patch merger.
//!
//! ```text
//! pixel_values [P, 1176] ─ patch_embed ─ permute cells into windows ─ blocks ─ merger ─ undo permutation ─ [P/4, out]
//! ```

use burn::tensor::{activation, backend::Backend, Tensor, TensorData};

use super::{
    config::VisionConfig, index_tensor, language::GatedMlp, vision_rope::VisionRopeTable,
    window::WindowLayout,
};
use crate::{
    nn::{Linear, RmsNorm},
    ops::QwenBackend,
    processor::GridThw,
    weights::WeightPath,
    ModelError, Result,
};

/// Epsilon of every RMSNorm of the vision tower (hard-coded in transformers).
const VISION_EPS: f64 = 1e-6;

/// Attention of a vision block: fused `qkv` (bias), rotary on q and k, `proj` (bias).
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L259
#[derive(Clone, Debug)]
pub struct VisionAttention<B: Backend> {
    /// `dim → 3·dim`, laid out as `[3, heads, head_dim]`.
    pub qkv: Linear<B>,
    /// `dim → dim`.
    pub proj: Linear<B>,
    /// Heads.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// One vision block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L342
#[derive(Clone, Debug)]
pub struct VisionBlock<B: Backend> {
    /// Pre-attention RMSNorm.
    pub norm1: RmsNorm<B>,
    /// Attention.
    pub attn: VisionAttention<B>,
    /// Pre-MLP RMSNorm.
    pub norm2: RmsNorm<B>,
    /// SiLU-gated MLP with biases.
    pub mlp: GatedMlp<B>,
    /// Whether the block attends over whole images (`fullatt_block_indexes`) instead of windows.
    pub full_attention: bool,
}

/// The patch merger (`merger`): RMSNorm per patch, groups of `merge²` patches concatenated, `Linear → GELU → Linear`.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L185
#[derive(Clone, Debug)]
pub struct PatchMerger<B: Backend> {
    /// `ln_q`: RMSNorm of each patch.
    pub ln_q: RmsNorm<B>,
    /// `mlp.0`: `merge²·dim → merge²·dim`.
    pub fc1: Linear<B>,
    /// `mlp.2`: `merge²·dim → out_hidden_size`.
    pub fc2: Linear<B>,
}

/// Rotary tables of one vision forward, in the permuted (windowed) patch order, f32 on the device.
#[derive(Clone, Debug)]
struct VisionRope<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

/// The vision tower's weights.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L386
#[derive(Clone, Debug)]
pub struct VisionTower<B: Backend> {
    /// The config the tower was built from.
    pub config: VisionConfig,
    /// `patch_embed.proj`: the `Conv3d` kernel `[dim, C, T, p, p]` flattened to a bias-free linear `[dim, C·T·p·p]`.
    pub patch_embed: Linear<B>,
    /// The blocks.
    pub blocks: Vec<VisionBlock<B>>,
    /// The patch merger.
    pub merger: PatchMerger<B>,
}

impl<B: QwenBackend> VisionAttention<B> {
    fn forward(&self, x: Tensor<B, 3>, rope: &VisionRope<B>, cu_seqlens: &[usize]) -> Tensor<B, 3> {
        let [b, s, dim] = x.dims();
        // `[b, s, 3·heads, head_dim]`, each part a narrowed view of it: the CUDA rotary and attention kernels read
        // such views in place, where narrowing a `[b, s, 3, heads, head_dim]` layout and dropping its axis made
        // burn copy each part (3 of the 5.5 copies per block in the H100 profile, docs/performance.md).
        let qkv = self.qkv.forward(x).reshape([b, s, 3 * self.heads, self.head_dim]);
        let part = |i: usize| qkv.clone().narrow(2, i * self.heads, self.heads);
        let (q, k, v) = (part(0), part(1), part(2));
        // Rotary in f32 (the tables' dtype), cast back (apply_rotary_pos_emb_vision).
        let rotate = |t: Tensor<B, 4>| B::rotary_half(t, &rope.cos, &rope.sin);
        let out = B::attend_blocks(rotate(q), rotate(k), v, cu_seqlens);
        self.proj.forward(out.reshape([b, s, dim]))
    }
}

impl<B: QwenBackend> VisionBlock<B> {
    fn load(path: &mut WeightPath<'_>, cfg: &VisionConfig, index: usize, device: &B::Device) -> Result<Self> {
        let dim = cfg.hidden_size;
        let mut attn = path.pp("attn");
        let attn = VisionAttention {
            qkv: Linear::load(&mut attn.pp("qkv"), dim, 3 * dim, true, device)?,
            proj: Linear::load(&mut attn.pp("proj"), dim, dim, true, device)?,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        };
        Ok(VisionBlock {
            norm1: RmsNorm::load(&mut path.pp("norm1"), dim, VISION_EPS, device)?,
            attn,
            norm2: RmsNorm::load(&mut path.pp("norm2"), dim, VISION_EPS, device)?,
            // 3420 features wide: padded to 3424 on CUDA, where the unpadded GEMMs run 2–3× slower (nn/pad.rs).
            mlp: GatedMlp::load(&mut path.pp("mlp"), dim, cfg.intermediate_size, true, device)?
                .pad_intermediate(B::dense_width_multiple()),
            full_attention: cfg.is_full_attention(index),
        })
    }

    fn forward(&self, x: Tensor<B, 3>, rope: &VisionRope<B>, layout: &WindowLayout) -> Tensor<B, 3> {
        let blocks = if self.full_attention { &layout.cu_seqlens } else { &layout.cu_window_seqlens };
        let x = x.clone() + self.attn.forward(self.norm1.forward(x), rope, blocks);
        x.clone() + self.mlp.forward(self.norm2.forward(x))
    }
}

impl<B: QwenBackend> PatchMerger<B> {
    fn load(path: &mut WeightPath<'_>, cfg: &VisionConfig, device: &B::Device) -> Result<Self> {
        let wide = cfg.hidden_size * cfg.merge_unit();
        Ok(PatchMerger {
            ln_q: RmsNorm::load(&mut path.pp("ln_q"), cfg.hidden_size, VISION_EPS, device)?,
            fc1: Linear::load(&mut path.pp("mlp.0"), wide, wide, true, device)?,
            fc2: Linear::load(&mut path.pp("mlp.2"), wide, cfg.out_hidden_size, true, device)?,
        })
    }

    /// `[1, patches, dim] → [1, patches / merge², out]`.
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let wide = self.fc1.in_dim();
        let unit = wide / self.ln_q.weight.dims()[0];
        let x = self.ln_q.forward(x).reshape([b, s / unit, wide]);
        self.fc2.forward(activation::gelu(self.fc1.forward(x)))
    }
}

impl<B: QwenBackend> VisionTower<B> {
    /// Loads the tower under `path` (`visual` in the legacy naming).
    pub fn load(path: &mut WeightPath<'_>, cfg: &VisionConfig, device: &B::Device) -> Result<Self> {
        let (dim, p) = (cfg.hidden_size, cfg.patch_size);
        let kernel: Tensor<B, 5> = path.pp("patch_embed.proj").tensor(
            "weight",
            [dim, cfg.in_channels, cfg.temporal_patch_size, p, p],
            device,
        )?;
        // `[dim, C·T·p·p]` (flattened from the stored shape, which a shape-only store leaves empty).
        let patch_embed = Linear::new(kernel.flatten(1, 4), None);
        let blocks = (0..cfg.depth)
            .map(|i| VisionBlock::load(&mut path.pp(format!("blocks.{i}")), cfg, i, device))
            .collect::<Result<Vec<_>>>()?;
        let merger = PatchMerger::load(&mut path.pp("merger"), cfg, device)?;
        Ok(VisionTower { config: cfg.clone(), patch_embed, blocks, merger })
    }

    /// Checks `image_grid_thw` against the patches of `pixel_values` (`[patches, features]`).
    pub fn check_grids(&self, patches: usize, features: usize, grids: &[GridThw]) -> Result<()> {
        let cfg = &self.config;
        if features != cfg.patch_features() {
            return Err(ModelError::invalid(format!(
                "pixel_values has {features} features per patch; the vision tower expects {} \
                 (channels · temporal_patch_size · patch_size²)",
                cfg.patch_features()
            )));
        }
        if grids.is_empty() {
            return Err(ModelError::invalid("pixel_values is given but image_grid_thw is empty"));
        }
        let m = cfg.spatial_merge_size;
        if let Some(g) =
            grids.iter().find(|g| g.t == 0 || g.h == 0 || g.w == 0 || g.h % m != 0 || g.w % m != 0)
        {
            return Err(ModelError::invalid(format!(
                "image grid {g:?} must be positive with height and width multiples of spatial_merge_size {m}"
            )));
        }
        let total: usize = grids.iter().map(GridThw::num_patches).sum();
        if total != patches {
            return Err(ModelError::invalid(format!(
                "image_grid_thw {grids:?} describes {total} patches but pixel_values has {patches} rows"
            )));
        }
        Ok(())
    }

    /// Image embeddings `[patches / merge², out_hidden_size]` of `pixel_values` (`[patches, C·T·p·p]`, in the
    /// processor's patch order) for the images `grids`, in the order of the grids (raster order of merged cells).
    pub fn forward(&self, pixel_values: Tensor<B, 2>, grids: &[GridThw]) -> Result<Tensor<B, 2>> {
        let [patches, features] = pixel_values.dims();
        self.check_grids(patches, features, grids)?;
        let cfg = &self.config;
        let device = pixel_values.device();
        let dtype = self.patch_embed.weight.dtype();
        let layout = WindowLayout::new(grids, cfg.spatial_merge_size, cfg.window_cells());
        let unit = cfg.merge_unit();
        let order = layout.patch_order(unit);

        let x = self.patch_embed.forward(pixel_values.cast(dtype).unsqueeze_dim(0));
        let x = x.select(1, index_tensor::<B>(&order, &device));
        let table = VisionRopeTable::new(grids, cfg.spatial_merge_size, cfg.head_dim(), cfg.rope_theta)
            .permuted(&order);
        let shape = [table.len(), table.head_dim];
        // Activations made on the host while the device may still run earlier work (the queued VAE encode).
        let upload = |v: Vec<f32>| B::upload_activation::<2>(TensorData::new(v, shape), &device);
        let rope = VisionRope { cos: upload(table.cos), sin: upload(table.sin) };

        let x = self.blocks.iter().fold(x, |x, block| block.forward(x, &rope, &layout));
        let merged = self.merger.forward(x);
        let merged = merged.select(1, index_tensor::<B>(&layout.reverse_index(), &device));
        let [_, cells, out] = merged.dims();
        Ok(merged.reshape([cells, out]))
    }
}
