//! The forward pass driven by a pruning plan: condition images are computed, cached or reused per block; the target
//! is computed whole, cached, or computed on a token subset with the rest reused.

use burn::tensor::{backend::Backend, BasicOps, Element, Int, Tensor};
use qwen_image_pruning::{
    CachedCondition, CachedKv, GroupAction, PruneError, ReuseMode, StepPlan, StepStats, TokenGroup,
    TokenLayout, TokenPruningCache,
};

use super::{
    block::{BlockContext, BlockModulation, BlockOutput},
    modulation::ModRuns,
    rope::{ImageShape, RopeTensors},
    target_subset::TargetSubset,
    transformer::{DitInput, Prepared, QwenImageTransformer},
};
use crate::{ops::KvSegment, ops::QwenBackend, quant::Fp8Activation, Result};

/// The image tokens currently held: which images, in order, and their hidden states `[batch, tokens, dim]`.
struct ImageState<B: Backend> {
    images: Vec<usize>,
    hidden: Tensor<B, 3>,
}

/// What every block of one planned pass shares.
struct PlannedPass<'a, B: Backend> {
    plan: &'a StepPlan,
    /// 0-based step.
    step: usize,
    /// The embedded inputs; with a target subset, the target's RoPE table is that of its computed tokens.
    p: Prepared<B>,
    /// The target subset this step computes, if any, with the RoPE rows of the other target tokens.
    subset: Option<(TargetSubset<B>, RopeTensors<B>)>,
    /// Where each image starts among the image tokens when all are held: the target's computed tokens, then each
    /// condition image (`images + 1` entries).
    offsets: Vec<usize>,
    batch: usize,
}

impl<B: Backend> PlannedPass<'_, B> {
    /// What block `layer` does with image `image` (0 = the target).
    fn action(&self, layer: usize, image: usize) -> GroupAction {
        let lp = &self.plan.layers[layer];
        match image {
            0 => lp.target.action,
            k => lp.conditions[k - 1].action,
        }
    }

    /// Number of images (the target and the condition images).
    fn images(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Tokens of image `image` when held.
    fn len(&self, image: usize) -> usize {
        self.offsets[image + 1] - self.offsets[image]
    }
}

/// Tokens of one group that a block does not compute: where their keys and values come from.
struct ReusedGroup<'r, B: Backend> {
    group: TokenGroup,
    /// `Reuse(KeyValue)` or `Reuse(RecomputeKeyValue)`.
    action: GroupAction,
    entry: CachedCondition<B>,
    /// The rows of the entry that hold these tokens (a target subset's other tokens); `None`: all of them.
    rows: Option<&'r Tensor<B, 1, Int>>,
    tokens: usize,
    /// Their RoPE table and modulation row, for recomputed keys and values.
    rope: &'r RopeTensors<B>,
    row: usize,
}

impl<B: QwenBackend> QwenImageTransformer<B> {
    /// Runs step `step` (0-based) under `plan`, reading and writing `cache`; returns the target tokens' prediction
    /// `[batch, target_tokens, out_features]` and what the pass computed, reused and cached.
    ///
    /// A condition image that is reused at a block costs nothing there: the other tokens attend to its cached
    /// keys and values ([`ReuseMode::KeyValue`]) or to keys and values recomputed from its cached block input with
    /// this step's modulation ([`ReuseMode::RecomputeKeyValue`]). A condition image computed at a block after a
    /// block that reused it takes that block's input from the cache. The plan is checked against the cache before
    /// anything runs ([`StepPlan::validate_shape`] rejects what is not executed). With a plan that computes
    /// everything, the target prediction is bit-identical to [`forward`](Self::forward).
    ///
    /// A target cached at a block (`ComputeAndCache`) stores its K/V and block input like a condition image. A step
    /// computing a target subset ([`StepPlan::target_subset`]) gathers those tokens once, before the first block;
    /// at every block the other target tokens attend as the cached K/V of the target (as cached, or recomputed from
    /// the cached block input); the returned prediction holds the computed tokens' new values and, for the others,
    /// the cache's last prediction (their velocity from the last step that computed them; see `target_subset.rs`).
    /// Steps that cache the target or compute a subset store the prediction of all target tokens in the cache.
    pub fn forward_planned(
        &self,
        input: &DitInput<B>,
        plan: &StepPlan,
        step: usize,
        cache: &mut TokenPruningCache<B>,
    ) -> Result<(Tensor<B, 3>, StepStats)> {
        let layout = input.layout();
        plan.validate_shape(self.num_layers(), &layout)?;
        cache.check_plan(step, plan, &layout)?;
        let (pass, mut state) = self.start_pass(input, &layout, plan, step)?;
        let mut txt = pass.p.txt.clone();
        let mut stats = StepStats::default();
        for layer in 0..self.blocks.len() {
            (state, txt) = self.planned_block(&pass, layer, state, txt, cache, &mut stats)?;
        }
        let out = self.finish_pass(&pass, state.hidden, cache)?;
        Ok((out, stats))
    }

    /// Embeds the inputs and, with a target subset, gathers its tokens (once per step): the state every block
    /// shares, and the image tokens held at the first block.
    fn start_pass<'a>(
        &self,
        input: &DitInput<B>,
        layout: &TokenLayout,
        plan: &'a StepPlan,
        step: usize,
    ) -> Result<(PlannedPass<'a, B>, ImageState<B>)> {
        let mut p = self.prepare(input)?;
        let subset = plan.target_subset(layout.target_tokens).map(|idx| {
            TargetSubset::<B>::new(idx, layout.target_tokens, layout.image_tokens(), self.device())
        });
        let offsets = held_offsets(&input.img_shapes, subset.as_ref().map(|sub| sub.computed));
        let (img, subset) = match subset {
            Some(sub) => {
                let (computed, rest) = sub.ropes(&p.img_rope.set(&[0]));
                p.img_rope = p.img_rope.with_target(computed);
                (sub.gather(p.img.clone()), Some((sub, rest)))
            }
            None => (p.img.clone(), None),
        };
        let state = ImageState { images: (0..input.img_shapes.len()).collect(), hidden: img };
        Ok((PlannedPass { plan, step, p, subset, offsets, batch: input.timestep.len() }, state))
    }

    /// Block `layer` under the plan: holds the images it computes, reads the keys and values of the tokens it
    /// reuses, runs, and caches what the plan says. Returns the image tokens held after it and the text tokens.
    fn planned_block(
        &self,
        pass: &PlannedPass<'_, B>,
        layer: usize,
        state: ImageState<B>,
        txt: Tensor<B, 3>,
        cache: &mut TokenPruningCache<B>,
        stats: &mut StepStats,
    ) -> Result<(ImageState<B>, Tensor<B, 3>)> {
        let block = &self.blocks[layer];
        let computed: Vec<usize> = (0..pass.images()).filter(|&i| pass.action(layer, i).computes()).collect();
        let state = match computed == state.images {
            true => state,
            false => self.gather_images(state, &computed, &pass.offsets, layer, cache)?,
        };
        // The model keeps each image set's RoPE table on the device for this layout.
        let img_rope = self.image_rope(&pass.p, &computed);
        let runs = ModRuns::new(computed.iter().map(|&i| (pass.len(i), pass.p.row_of(i))));
        let m = pass.p.block_modulation(layer, block)?;
        let extra_kv = self.reused_kv(pass, layer, &m, cache, stats)?;
        let ctx = BlockContext {
            txt_rope: &pass.p.txt_rope,
            img_rope: &img_rope,
            runs: &runs,
            extra_kv: &extra_kv,
            key_mask: pass.p.key_mask.as_ref(),
            fp8_attention: self.fp8_attention(),
        };
        let text = txt.dims()[1];
        let out = block.forward(state.hidden.clone(), txt, &m, &ctx);
        let (computed_img, reused_img) =
            (out.img.dims()[1], extra_kv.iter().map(|kv| kv.key.dims()[1]).sum::<usize>());
        stats.computed_tokens += computed_img;
        stats.text_tokens += text;
        stats.attention_pairs += (text + computed_img) * (text + computed_img + reused_img);
        self.cache_block_outputs(pass, layer, &state, &out, cache, stats)?;
        Ok((ImageState { images: state.images, hidden: out.img }, out.txt))
    }

    /// Keys and values of the tokens block `layer` does not compute: the target's other tokens (with a subset),
    /// then each reused condition image.
    fn reused_kv(
        &self,
        pass: &PlannedPass<'_, B>,
        layer: usize,
        m: &BlockModulation<B>,
        cache: &mut TokenPruningCache<B>,
        stats: &mut StepStats,
    ) -> Result<Vec<KvSegment<B>>> {
        let mut extra_kv = Vec::new();
        if let Some((sub, rest_rope)) = &pass.subset {
            let entry = cache.reuse_group(pass.step, layer, TokenGroup::Target, sub.rest)?.clone();
            let reuse = ReusedGroup {
                group: TokenGroup::Target,
                action: pass.plan.layers[layer].target.rest,
                entry,
                rows: Some(&sub.rest_index),
                tokens: sub.rest,
                rope: rest_rope,
                row: pass.p.row_of(0),
            };
            extra_kv.push(self.reused_group_kv(pass, layer, m, reuse, stats)?);
        }
        for k in (1..pass.images()).filter(|&i| !pass.action(layer, i).computes()) {
            let entry = cache.reuse(pass.step, layer, k - 1)?.clone();
            let rope = self.image_rope(&pass.p, &[k]);
            let reuse = ReusedGroup {
                group: TokenGroup::Condition(k - 1),
                action: pass.action(layer, k),
                tokens: entry.tokens(),
                entry,
                rows: None,
                rope: &rope,
                row: pass.p.row_of(k),
            };
            extra_kv.push(self.reused_group_kv(pass, layer, m, reuse, stats)?);
        }
        Ok(extra_kv)
    }

    /// The keys and values `[batch, tokens, heads, head_dim]` of one reused group at block `layer`: as cached, or
    /// recomputed from the cached block input with this step's modulation `m` ([`ReuseMode::RecomputeKeyValue`]).
    fn reused_group_kv(
        &self,
        pass: &PlannedPass<'_, B>,
        layer: usize,
        m: &BlockModulation<B>,
        reuse: ReusedGroup<'_, B>,
        stats: &mut StepStats,
    ) -> Result<KvSegment<B>> {
        let block = &self.blocks[layer];
        let tokens = reuse.tokens;
        stats.reused_tokens += tokens;
        let (key, value) = match reuse.action {
            GroupAction::Reuse(ReuseMode::RecomputeKeyValue) => {
                let hidden =
                    reuse.entry.hidden.ok_or(PruneError::HiddenNotCached { layer, group: reuse.group })?;
                stats.recomputed_kv_tokens += tokens;
                let runs = ModRuns::new([(tokens, reuse.row)]);
                block.image_kv(token_rows(hidden, reuse.rows), m, reuse.rope, &runs)
            }
            _ => {
                let heads = |kv: CachedKv<B>| {
                    restored_kv(kv, reuse.rows).reshape([
                        pass.batch,
                        tokens,
                        block.attn.heads,
                        block.attn.head_dim,
                    ])
                };
                (heads(reuse.entry.key), heads(reuse.entry.value))
            }
        };
        Ok(KvSegment { key, value })
    }

    /// Caches the images (the whole target, condition images) that block `layer` computed from `input` and was
    /// told to cache: their keys and values from `out`, and their block input.
    fn cache_block_outputs(
        &self,
        pass: &PlannedPass<'_, B>,
        layer: usize,
        input: &ImageState<B>,
        out: &BlockOutput<B>,
        cache: &mut TokenPruningCache<B>,
        stats: &mut StepStats,
    ) -> Result<()> {
        let block = &self.blocks[layer];
        let mut start = 0;
        for &i in &input.images {
            let len = pass.len(i);
            if pass.action(layer, i) == GroupAction::ComputeAndCache {
                let inner = block.attn.heads * block.attn.head_dim;
                let kv = |t: Tensor<B, 4>| {
                    self.cached_kv(t.narrow(1, start, len).reshape([pass.batch, len, inner]))
                };
                let entry = CachedCondition {
                    key: kv(out.img_key.clone()),
                    value: kv(out.img_value.clone()),
                    hidden: cache
                        .keeps_hidden_states()
                        .then(|| owned(input.hidden.clone().narrow(1, start, len))),
                    step: pass.step,
                };
                let group = if i == 0 { TokenGroup::Target } else { TokenGroup::Condition(i - 1) };
                cache.store_group(layer, group, entry)?;
                stats.cached_entries += 1;
            }
            start += len;
        }
        Ok(())
    }

    /// Keys or values `[batch, tokens, heads·head_dim]` as the cache holds them: in 8 bits with
    /// [`fp8_cache`](Self::fp8_cache) (quantized per token, [`QwenBackend::quantize_activation_fp8`]), else a copy
    /// in a buffer of their own.
    fn cached_kv(&self, t: Tensor<B, 3>) -> CachedKv<B> {
        if self.fp8_cache() {
            let Fp8Activation { bits, scales, dtype } = B::quantize_activation_fp8(t);
            CachedKv::Fp8 { bits, scales, dtype }
        } else {
            CachedKv::Dense(owned(t))
        }
    }

    /// The output layer on the target's computed tokens and, with a subset, the other tokens' held prediction
    /// scattered in. A step that caches the target or computes a subset stores the prediction of every target
    /// token in the cache.
    fn finish_pass(
        &self,
        pass: &PlannedPass<'_, B>,
        hidden: Tensor<B, 3>,
        cache: &mut TokenPruningCache<B>,
    ) -> Result<Tensor<B, 3>> {
        let out = self.final_layer(hidden, &pass.p).narrow(1, 0, pass.offsets[1]);
        let out = match &pass.subset {
            Some((sub, _)) => sub.scatter(out, cache)?,
            None => out,
        };
        let caches_target = pass.plan.layers.iter().any(|l| l.target.action == GroupAction::ComputeAndCache);
        if pass.subset.is_some() || caches_target {
            cache.store_target_output(owned(out.clone()));
        }
        Ok(out)
    }

    /// Rebuilds the held image tokens so that they are exactly `wanted` (in order): images still held are sliced
    /// out, the others come from the cached block input of `layer`.
    fn gather_images(
        &self,
        state: ImageState<B>,
        wanted: &[usize],
        offsets: &[usize],
        layer: usize,
        cache: &TokenPruningCache<B>,
    ) -> Result<ImageState<B>> {
        let mut parts = Vec::with_capacity(wanted.len());
        for &i in wanted {
            let len = offsets[i + 1] - offsets[i];
            match state.images.iter().position(|&h| h == i) {
                Some(pos) => {
                    let start: usize = state.images[..pos].iter().map(|&h| offsets[h + 1] - offsets[h]).sum();
                    parts.push(state.hidden.clone().narrow(1, start, len));
                }
                None => {
                    let group = TokenGroup::Condition(i.wrapping_sub(1));
                    let hidden = (i > 0)
                        .then(|| cache.get(layer, i - 1))
                        .flatten()
                        .and_then(|e| e.hidden.clone())
                        .ok_or(PruneError::HiddenNotCached { layer, group })?;
                    parts.push(hidden);
                }
            }
        }
        Ok(ImageState { images: wanted.to_vec(), hidden: Tensor::cat(parts, 1) })
    }
}

/// Cached keys or values in the model's dtype, only the tokens `rows` when given (selected before 8-bit ones are
/// restored, [`QwenBackend::dequantize_activation_fp8`]).
fn restored_kv<B: QwenBackend>(kv: CachedKv<B>, rows: Option<&Tensor<B, 1, Int>>) -> Tensor<B, 3> {
    match kv {
        CachedKv::Dense(t) => token_rows(t, rows),
        CachedKv::Fp8 { bits, scales, dtype } => B::dequantize_activation_fp8(&Fp8Activation {
            bits: token_rows(bits, rows),
            scales: token_rows(scales, rows),
            dtype,
        }),
    }
}

/// The tokens `rows` of `t` (its axis 1), all of them without.
fn token_rows<B: Backend, const D: usize, K>(
    t: Tensor<B, D, K>,
    rows: Option<&Tensor<B, 1, Int>>,
) -> Tensor<B, D, K>
where
    K: BasicOps<B>,
    K::Elem: Element,
{
    match rows {
        Some(rows) => t.select(1, rows.clone()),
        None => t,
    }
}

/// A copy of `t` in its own buffer. A slice is a view that keeps its whole parent alive; cache entries must not pin
/// the full image-stream tensors of every block.
fn owned<B: Backend>(t: Tensor<B, 3>) -> Tensor<B, 3> {
    t.mul_scalar(1.0)
}

/// Where each image starts among the image tokens when all are held: the target's `target_computed` tokens (all of
/// them without a subset), then each condition image.
fn held_offsets(shapes: &[ImageShape], target_computed: Option<usize>) -> Vec<usize> {
    let mut offsets = vec![0usize; shapes.len() + 1];
    for (i, s) in shapes.iter().enumerate() {
        let len = match (target_computed, i) {
            (Some(computed), 0) => computed,
            _ => s.tokens(),
        };
        offsets[i + 1] = offsets[i] + len;
    }
    offsets
}
