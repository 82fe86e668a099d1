//! The forward pass driven by a pruning plan: condition images are computed, cached or reused per block; the target
//! is computed whole, cached, or computed on a token subset with the rest reused.

use burn::tensor::{backend::Backend, Tensor};
use qwen_image_pruning::{
    CachedCondition, GroupAction, PruneError, ReuseMode, StepPlan, StepStats, TokenGroup, TokenPruningCache,
};

use super::{
    block::BlockContext,
    modulation::ModRuns,
    target_subset::TargetSubset,
    transformer::{DitInput, QwenImageTransformer},
};
use crate::{ops::KvSegment, ops::QwenBackend, Result};

/// The image tokens currently held: which images, in order, and their hidden states `[batch, tokens, dim]`.
struct ImageState<B: Backend> {
    images: Vec<usize>,
    hidden: Tensor<B, 3>,
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

        let mut p = self.prepare(input)?;
        let n_images = input.img_shapes.len();
        let subset = plan.target_subset(layout.target_tokens).map(|idx| {
            TargetSubset::<B>::new(idx, layout.target_tokens, layout.image_tokens(), self.device())
        });
        // Token counts of the images as held: the target's computed tokens, then each condition image.
        let mut offsets = vec![0usize; n_images + 1];
        for (i, s) in input.img_shapes.iter().enumerate() {
            let len = match (&subset, i) {
                (Some(sub), 0) => sub.computed,
                _ => s.tokens(),
            };
            offsets[i + 1] = offsets[i] + len;
        }
        let mut stats = StepStats::default();
        let (img, rest_rope) = match &subset {
            Some(sub) => {
                let (computed, rest) = sub.ropes(&p.img_rope.set(&[0]));
                p.img_rope = p.img_rope.with_target(computed);
                (sub.gather(p.img.clone()), Some(rest))
            }
            None => (p.img.clone(), None),
        };
        let mut state = ImageState { images: (0..n_images).collect(), hidden: img };
        let (mut txt, batch) = (p.txt.clone(), input.timestep.len());

        for (layer, (block, lp)) in self.blocks.iter().zip(&plan.layers).enumerate() {
            let action = |image: usize| match image {
                0 => lp.target.action,
                k => lp.conditions[k - 1].action,
            };
            let computed: Vec<usize> = (0..n_images).filter(|&i| action(i).computes()).collect();
            if computed != state.images {
                state = self.gather_images(state, &computed, &offsets, layer, cache)?;
            }
            // The model keeps each image set's RoPE table on the device for this layout.
            let img_rope = self.image_rope(&p, &computed);
            let runs = ModRuns::new(computed.iter().map(|&i| (offsets[i + 1] - offsets[i], p.row_of(i))));
            let m = p.block_modulation(layer, block)?;

            // Keys and values of the target tokens and the condition images that are not computed at this block.
            let mut extra_kv = Vec::new();
            if let (Some(sub), Some(rest_rope)) = (&subset, &rest_rope) {
                let entry = cache.reuse_group(step, layer, TokenGroup::Target, sub.rest)?.clone();
                stats.reused_tokens += sub.rest;
                let rest = |t: Tensor<B, 3>| t.select(1, sub.rest_index.clone());
                let (key, value) = match lp.target.rest {
                    GroupAction::Reuse(ReuseMode::RecomputeKeyValue) => {
                        let hidden = entry
                            .hidden
                            .ok_or(PruneError::HiddenNotCached { layer, group: TokenGroup::Target })?;
                        let runs = ModRuns::new([(sub.rest, p.row_of(0))]);
                        block.image_kv(rest(hidden), &m, rest_rope, &runs)
                    }
                    _ => {
                        let heads = |t: Tensor<B, 3>| {
                            rest(t).reshape([batch, sub.rest, block.attn.heads, block.attn.head_dim])
                        };
                        (heads(entry.key), heads(entry.value))
                    }
                };
                extra_kv.push(KvSegment { key, value });
            }
            for k in (1..n_images).filter(|&i| !action(i).computes()) {
                let entry = cache.reuse(step, layer, k - 1)?.clone();
                let tokens = entry.tokens();
                stats.reused_tokens += tokens;
                let (key, value) = match action(k) {
                    GroupAction::Reuse(ReuseMode::RecomputeKeyValue) => {
                        let hidden = entry.hidden.ok_or(PruneError::HiddenNotCached {
                            layer,
                            group: TokenGroup::Condition(k - 1),
                        })?;
                        let rope = self.image_rope(&p, &[k]);
                        block.image_kv(hidden, &m, &rope, &ModRuns::new([(tokens, p.row_of(k))]))
                    }
                    _ => {
                        let heads = |t: Tensor<B, 3>| {
                            t.reshape([batch, tokens, block.attn.heads, block.attn.head_dim])
                        };
                        (heads(entry.key), heads(entry.value))
                    }
                };
                extra_kv.push(KvSegment { key, value });
            }

            let ctx = BlockContext {
                txt_rope: &p.txt_rope,
                img_rope: &img_rope,
                runs: &runs,
                extra_kv: &extra_kv,
                key_mask: p.key_mask.as_ref(),
            };
            let input_hidden = state.hidden.clone();
            let out = block.forward(state.hidden, txt, &m, &ctx);
            stats.computed_tokens += out.img.dims()[1];

            // Cache the images (the whole target, condition images) this block was told to cache.
            let mut start = 0;
            for &i in &computed {
                let len = offsets[i + 1] - offsets[i];
                if action(i) == GroupAction::ComputeAndCache {
                    let inner = block.attn.heads * block.attn.head_dim;
                    let flat = |t: Tensor<B, 4>| owned(t.narrow(1, start, len).reshape([batch, len, inner]));
                    let entry = CachedCondition {
                        key: flat(out.img_key.clone()),
                        value: flat(out.img_value.clone()),
                        hidden: Some(owned(input_hidden.clone().narrow(1, start, len))),
                        step,
                    };
                    let group = if i == 0 { TokenGroup::Target } else { TokenGroup::Condition(i - 1) };
                    cache.store_group(layer, group, entry)?;
                    stats.cached_entries += 1;
                }
                start += len;
            }
            state = ImageState { images: computed, hidden: out.img };
            txt = out.txt;
        }

        let out = self.final_layer(state.hidden, &p).narrow(1, 0, offsets[1]);
        let out = match &subset {
            Some(sub) => sub.scatter(out, cache)?,
            None => out,
        };
        let caches_target = plan.layers.iter().any(|l| l.target.action == GroupAction::ComputeAndCache);
        if subset.is_some() || caches_target {
            cache.store_target_output(owned(out.clone()));
        }
        Ok((out, stats))
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

/// A copy of `t` in its own buffer. A slice is a view that keeps its whole parent alive; cache entries must not pin
/// the full image-stream tensors of every block.
fn owned<B: Backend>(t: Tensor<B, 3>) -> Tensor<B, 3> {
    t.mul_scalar(1.0)
}
