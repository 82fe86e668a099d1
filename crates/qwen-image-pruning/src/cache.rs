//! [`TokenPruningCache`]: per block, what was cached of each condition image.

use burn::tensor::{backend::Backend, Tensor};

use crate::{PruneError, StepPlan, TokenGroup, TokenLayout};

/// What is cached of one condition image at one block.
#[derive(Clone, Debug)]
pub struct CachedCondition<B: Backend> {
    /// Keys after QK-RMSNorm and RoPE, `[batch, tokens, heads·head_dim]`.
    pub key: Tensor<B, 3>,
    /// Values, `[batch, tokens, heads·head_dim]`.
    pub value: Tensor<B, 3>,
    /// The block's input hidden states of these tokens, `[batch, tokens, dim]`, when they were stored.
    pub hidden: Option<Tensor<B, 3>>,
    /// 0-based step at which the entry was written.
    pub step: usize,
}

impl<B: Backend> CachedCondition<B> {
    /// Number of tokens of the entry.
    pub fn tokens(&self) -> usize {
        self.key.dims()[1]
    }

    /// Bytes of device memory held by the entry.
    pub fn size_bytes(&self) -> usize {
        let bytes = |t: &Tensor<B, 3>| t.shape().num_elements() * t.dtype().size();
        bytes(&self.key) + bytes(&self.value) + self.hidden.as_ref().map_or(0, bytes)
    }
}

/// Counters of cache traffic since the cache was created or cleared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries written.
    pub stores: usize,
    /// Entries read to serve reused tokens.
    pub reuses: usize,
    /// Tokens written, summed over entries.
    pub stored_tokens: usize,
    /// Tokens served from the cache, summed over reads.
    pub reused_tokens: usize,
}

/// Per block and per condition image: the post-norm, post-RoPE K and V and the layer-input hidden states.
///
/// The pipeline owns one cache per request (or keeps it across requests of the same image); the model writes it at
/// `ComputeAndCache` and reads it at `Reuse`.
#[derive(Clone, Debug)]
pub struct TokenPruningCache<B: Backend> {
    layers: Vec<Vec<Option<CachedCondition<B>>>>,
    stats: CacheStats,
}

impl<B: Backend> Default for TokenPruningCache<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> TokenPruningCache<B> {
    /// An empty cache.
    pub fn new() -> Self {
        TokenPruningCache { layers: Vec::new(), stats: CacheStats::default() }
    }

    /// Stores the entry of condition image `k` at block `layer`, replacing any older one.
    pub fn store(&mut self, layer: usize, k: usize, entry: CachedCondition<B>) {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, Vec::new);
        }
        let row = &mut self.layers[layer];
        if row.len() <= k {
            row.resize_with(k + 1, || None);
        }
        self.stats.stores += 1;
        self.stats.stored_tokens += entry.tokens();
        row[k] = Some(entry);
    }

    /// The entry of condition image `k` at block `layer`, if any; does not count as a reuse.
    pub fn get(&self, layer: usize, k: usize) -> Option<&CachedCondition<B>> {
        self.layers.get(layer)?.get(k)?.as_ref()
    }

    /// The entry of condition image `k` at block `layer` for reuse at `step`; counts the read.
    pub fn reuse(&mut self, step: usize, layer: usize, k: usize) -> Result<&CachedCondition<B>, PruneError> {
        let entry = self.layers.get(layer).and_then(|row| row.get(k)).and_then(|e| e.as_ref());
        let entry = entry.ok_or(PruneError::CacheMiss { step, layer, group: TokenGroup::Condition(k) })?;
        self.stats.reuses += 1;
        self.stats.reused_tokens += entry.tokens();
        Ok(entry)
    }

    /// Drops every entry and resets the counters.
    pub fn clear(&mut self) {
        self.layers.clear();
        self.stats = CacheStats::default();
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries() == 0
    }

    /// Number of (block, condition image) entries held.
    pub fn entries(&self) -> usize {
        self.layers.iter().flatten().filter(|e| e.is_some()).count()
    }

    /// Bytes of device memory held by all entries.
    pub fn size_bytes(&self) -> usize {
        self.layers.iter().flatten().flatten().map(CachedCondition::size_bytes).sum()
    }

    /// Traffic counters since creation or the last [`clear`](Self::clear).
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Checks that every cache read of `plan` will hit, before the step runs (see [`StepPlan::check_cache`]).
    pub fn check_plan(&self, step: usize, plan: &StepPlan, layout: &TokenLayout) -> Result<(), PruneError> {
        plan.check_cache(step, layout, |layer, k| {
            self.get(layer, k).map(|e| (e.tokens(), e.hidden.is_some()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GroupAction, LayerPlan, ReuseMode};
    use burn::backend::Flex;
    use burn::tensor::DType;

    fn entry(tokens: usize, hidden: bool) -> CachedCondition<Flex> {
        let dev = Default::default();
        let t = || Tensor::<Flex, 3>::ones([1, tokens, 8], (&dev, DType::F32));
        CachedCondition { key: t(), value: t(), hidden: hidden.then(t), step: 0 }
    }

    #[test]
    fn store_reuse_clear_and_size() {
        let mut cache = TokenPruningCache::<Flex>::new();
        assert!(cache.is_empty());
        assert!(matches!(cache.reuse(1, 0, 0), Err(PruneError::CacheMiss { step: 1, layer: 0, .. })));
        cache.store(2, 1, entry(4, true));
        cache.store(0, 0, entry(4, false));
        assert_eq!(cache.entries(), 2);
        // 3 tensors of 4x8 f32 + 2 tensors of 4x8 f32.
        assert_eq!(cache.size_bytes(), (3 + 2) * 4 * 8 * 4);
        assert_eq!(cache.reuse(1, 2, 1).unwrap().tokens(), 4);
        assert!(cache.get(1, 0).is_none());
        assert_eq!(cache.stats(), CacheStats { stores: 2, reuses: 1, stored_tokens: 8, reused_tokens: 4 });
        cache.clear();
        assert!(cache.is_empty());
        assert_eq!(cache.size_bytes(), 0);
        assert_eq!(cache.stats(), CacheStats::default());
    }

    #[test]
    fn plan_checks_tokens_and_hidden_states() {
        let layout = TokenLayout::new(3, 4, vec![4]);
        let mut cache = TokenPruningCache::<Flex>::new();
        cache.store(0, 0, entry(4, false));
        cache.store(1, 0, entry(4, false));
        let reuse_kv = StepPlan::new(vec![
            LayerPlan::with_conditions(1, GroupAction::Reuse(ReuseMode::KeyValue)),
            LayerPlan::with_conditions(1, GroupAction::Reuse(ReuseMode::KeyValue)),
        ]);
        cache.check_plan(1, &reuse_kv, &layout).unwrap();
        let recompute = StepPlan::new(vec![
            LayerPlan::with_conditions(1, GroupAction::Reuse(ReuseMode::RecomputeKeyValue)),
            LayerPlan::with_conditions(1, GroupAction::Compute),
        ]);
        assert!(matches!(cache.check_plan(1, &recompute, &layout), Err(PruneError::HiddenNotCached { .. })));
        // Block 0 reused, block 1 computed again: block 1 needs cached hidden states.
        let resume = StepPlan::new(vec![
            LayerPlan::with_conditions(1, GroupAction::Reuse(ReuseMode::KeyValue)),
            LayerPlan::with_conditions(1, GroupAction::Compute),
        ]);
        assert!(matches!(
            cache.check_plan(1, &resume, &layout),
            Err(PruneError::HiddenNotCached { layer: 1, .. })
        ));
        let other_size = TokenLayout::new(3, 4, vec![6]);
        assert!(matches!(
            cache.check_plan(1, &reuse_kv, &other_size),
            Err(PruneError::CacheShapeMismatch { cached: 4, expected: 6, .. })
        ));
    }
}
