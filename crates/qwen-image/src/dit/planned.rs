//! The forward pass driven by a pruning plan: condition images are computed, cached or reused per block.

use burn::tensor::{backend::Backend, Tensor};
use qwen_image_pruning::{
    CachedCondition, GroupAction, PruneError, ReuseMode, StepPlan, StepStats, TokenGroup, TokenPruningCache,
};

use super::{
    block::BlockContext,
    modulation::ModRuns,
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
    /// anything runs ([`StepPlan::validate_shape`] rejects what is not executed, such as token subsets). With a plan
    /// that computes everything, the target prediction is bit-identical to [`forward`](Self::forward).
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

        let p = self.prepare(input)?;
        let n_images = input.img_shapes.len();
        let mut offsets = vec![0usize; n_images + 1];
        for (i, s) in input.img_shapes.iter().enumerate() {
            offsets[i + 1] = offsets[i] + s.tokens();
        }
        let mut stats = StepStats::default();
        let mut state = ImageState { images: (0..n_images).collect(), hidden: p.img.clone() };
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

            // Keys and values of the condition images that are not computed at this block.
            let mut extra_kv = Vec::new();
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

            // Cache the condition images this block was told to cache.
            let mut start = 0;
            for &i in &computed {
                let len = offsets[i + 1] - offsets[i];
                if i > 0 && action(i) == GroupAction::ComputeAndCache {
                    let inner = block.attn.heads * block.attn.head_dim;
                    let flat = |t: Tensor<B, 4>| owned(t.narrow(1, start, len).reshape([batch, len, inner]));
                    let entry = CachedCondition {
                        key: flat(out.img_key.clone()),
                        value: flat(out.img_value.clone()),
                        hidden: Some(owned(input_hidden.clone().narrow(1, start, len))),
                        step,
                    };
                    cache.store(layer, i - 1, entry);
                    stats.cached_entries += 1;
                }
                start += len;
            }
            state = ImageState { images: computed, hidden: out.img };
            txt = out.txt;
        }

        let out = self.final_layer(state.hidden, &p);
        let target = offsets[1];
        Ok((out.narrow(1, 0, target), stats))
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
