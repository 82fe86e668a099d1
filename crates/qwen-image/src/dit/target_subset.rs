//! A step that computes only some target tokens: the gather of their inputs and the scatter of the prediction,
//! once per step.
//!
//! The tokens outside the subset are not computed at any block of the step: the computed tokens attend to their
//! keys and values cached at the last step that cached the whole target (as cached, or recomputed from the cached
//! block inputs with this step's modulation). Their prediction is the one of the last step that computed them (the
//! cache keeps the last prediction of every target token): a held velocity. For Euler steps of flow matching this is
//! the same as holding their predicted clean latent: with `v` fixed, `x̂₀ = x_t − σ_t·v` does not change from step
//! to step, since `x_{t+1} − σ_{t+1}·v = x_t + (σ_{t+1} − σ_t)·v − σ_{t+1}·v = x_t − σ_t·v`.

use burn::tensor::{backend::Backend, Int, Tensor};
use qwen_image_pruning::{PruneError, TokenPruningCache};

use super::rope::RopeTensors;
use crate::{text_encoder::index_tensor, Result};

/// The target tokens of one step: the subset computed and the rest reused, as device index tensors.
pub(crate) struct TargetSubset<B: Backend> {
    /// Number of computed target tokens.
    pub computed: usize,
    /// Number of reused target tokens.
    pub rest: usize,
    /// Indices of the reused tokens within the target.
    pub rest_index: Tensor<B, 1, Int>,
    /// The image-stream tokens held at the first block: the computed target tokens, then every condition token.
    stream_index: Tensor<B, 1, Int>,
    /// Indices of the computed tokens within the target.
    computed_index: Tensor<B, 1, Int>,
    /// Position of each target token in `[computed ; rest]` order (scatters the prediction back).
    inverse: Tensor<B, 1, Int>,
}

impl<B: Backend> TargetSubset<B> {
    /// The subset `indices` (strictly increasing, checked by the plan) of `target` tokens, in an image stream of
    /// `image_tokens` tokens.
    pub fn new(indices: &[u32], target: usize, image_tokens: usize, device: &B::Device) -> Self {
        let mut selected = vec![false; target];
        indices.iter().for_each(|&i| selected[i as usize] = true);
        let computed: Vec<usize> = indices.iter().map(|&i| i as usize).collect();
        let rest: Vec<usize> = (0..target).filter(|&i| !selected[i]).collect();
        let mut inverse = vec![0usize; target];
        for (pos, &tok) in computed.iter().chain(&rest).enumerate() {
            inverse[tok] = pos;
        }
        let stream: Vec<usize> = computed.iter().copied().chain(target..image_tokens).collect();
        TargetSubset {
            computed: computed.len(),
            rest: rest.len(),
            rest_index: index_tensor::<B>(&rest, device),
            stream_index: index_tensor::<B>(&stream, device),
            computed_index: index_tensor::<B>(&computed, device),
            inverse: index_tensor::<B>(&inverse, device),
        }
    }

    /// The image stream `[batch, image_tokens, dim]` reduced to the computed target tokens and the condition tokens.
    pub fn gather(&self, img: Tensor<B, 3>) -> Tensor<B, 3> {
        img.select(1, self.stream_index.clone())
    }

    /// The RoPE rows of the computed target tokens and of the reused ones, from the target's table.
    pub fn ropes(&self, target: &RopeTensors<B>) -> (RopeTensors<B>, RopeTensors<B>) {
        (target.select(self.computed_index.clone()), target.select(self.rest_index.clone()))
    }

    /// The prediction of every target token: `computed` (`[batch, computed, channels]`) for the subset, the cache's
    /// last prediction for the rest.
    pub fn scatter(&self, computed: Tensor<B, 3>, cache: &TokenPruningCache<B>) -> Result<Tensor<B, 3>> {
        let last = cache.target_output().ok_or_else(|| {
            PruneError::InvalidPlan("a target subset needs the last prediction of every target token".into())
        })?;
        let rest = last.clone().select(1, self.rest_index.clone());
        Ok(Tensor::cat(vec![computed, rest], 1).select(1, self.inverse.clone()))
    }
}
