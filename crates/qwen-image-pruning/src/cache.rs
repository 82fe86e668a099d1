//! [`TokenPruningCache`]: per block, what was cached of each condition image and of the target; and the target's
//! last prediction.

use burn::tensor::{backend::Backend, DType, Int, Tensor};

use crate::{PruneError, StepPlan, TokenGroup, TokenLayout};

/// Cached keys or values `[batch, tokens, heads·head_dim]`: as the block computed them, or in 8 bits (the model
/// quantizes and restores them; this crate only holds them).
#[derive(Clone, Debug)]
pub enum CachedKv<B: Backend> {
    /// In the model's dtype.
    Dense(Tensor<B, 3>),
    /// e4m3 bit patterns `[batch, tokens, heads·head_dim]` (an integer tensor of dtype `U8`) with one f32 scale per
    /// token, `scales [batch, tokens]`; `dtype` is the model's dtype, which they are restored to.
    Fp8 {
        /// The e4m3 bit patterns.
        bits: Tensor<B, 3, Int>,
        /// One f32 scale per token.
        scales: Tensor<B, 2>,
        /// The dtype the values were quantized from.
        dtype: DType,
    },
}

impl<B: Backend> CachedKv<B> {
    /// `[batch, tokens, heads·head_dim]`.
    pub fn dims(&self) -> [usize; 3] {
        match self {
            CachedKv::Dense(t) => t.dims(),
            CachedKv::Fp8 { bits, .. } => bits.dims(),
        }
    }

    /// Bytes of device memory held (for 8 bits: one byte per value and four per token).
    pub fn size_bytes(&self) -> usize {
        match self {
            CachedKv::Dense(t) => t.shape().num_elements() * t.dtype().size(),
            CachedKv::Fp8 { bits, scales, .. } => {
                bits.shape().num_elements() + scales.shape().num_elements() * DType::F32.size()
            }
        }
    }
}

/// What is cached of one token group (a condition image, or the whole target) at one block.
#[derive(Clone, Debug)]
pub struct CachedCondition<B: Backend> {
    /// Keys after QK-RMSNorm and RoPE, `[batch, tokens, heads·head_dim]`.
    pub key: CachedKv<B>,
    /// Values, `[batch, tokens, heads·head_dim]`.
    pub value: CachedKv<B>,
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
        let hidden = self.hidden.as_ref().map_or(0, |t| t.shape().num_elements() * t.dtype().size());
        self.key.size_bytes() + self.value.size_bytes() + hidden
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

/// Per block and per token group (condition images and the target): the post-norm, post-RoPE K and V and the
/// layer-input hidden states; and the target's last prediction.
///
/// The pipeline owns one cache per request (or keeps it across requests of the same image); the model writes it at
/// `ComputeAndCache` and reads it at `Reuse`. After every planned pass the model stores the prediction of all target
/// tokens ([`store_target_output`](Self::store_target_output)): a step that computes a target subset takes the
/// prediction of the other tokens from it (their velocity from the last step that computed them).
#[derive(Clone, Debug)]
pub struct TokenPruningCache<B: Backend> {
    layers: Vec<Vec<Option<CachedCondition<B>>>>,
    targets: Vec<Option<CachedCondition<B>>>,
    target_output: Option<Tensor<B, 3>>,
    stats: CacheStats,
    /// Whether new entries keep their block-input hidden states
    /// ([`PruningSchedule::needs_cached_hidden_states`](crate::PruningSchedule::needs_cached_hidden_states)).
    hidden_states: bool,
}

impl<B: Backend> Default for TokenPruningCache<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> TokenPruningCache<B> {
    /// An empty cache.
    pub fn new() -> Self {
        TokenPruningCache {
            layers: Vec::new(),
            targets: Vec::new(),
            target_output: None,
            stats: CacheStats::default(),
            hidden_states: true,
        }
    }

    /// Whether entries stored from now on keep their block-input hidden states (the default) or hold K and V only,
    /// as the running schedule needs
    /// ([`PruningSchedule::needs_cached_hidden_states`](crate::PruningSchedule::needs_cached_hidden_states)).
    pub fn keep_hidden_states(&mut self, keep: bool) {
        self.hidden_states = keep;
    }

    /// Whether entries stored from now on keep their block-input hidden states.
    pub fn keeps_hidden_states(&self) -> bool {
        self.hidden_states
    }

    /// Stores the entry of `group` (a condition image or the target) at block `layer`, replacing any older one.
    /// The text is never cached: storing it is an [`PruneError::Unsupported`] error.
    pub fn store_group(
        &mut self,
        layer: usize,
        group: TokenGroup,
        entry: CachedCondition<B>,
    ) -> Result<(), PruneError> {
        match group {
            TokenGroup::Condition(k) => self.store(layer, k, entry),
            TokenGroup::Target => {
                if self.targets.len() <= layer {
                    self.targets.resize_with(layer + 1, || None);
                }
                self.stats.stores += 1;
                self.stats.stored_tokens += entry.tokens();
                self.targets[layer] = Some(entry);
            }
            TokenGroup::Text => return Err(PruneError::Unsupported("the text is never cached".into())),
        }
        Ok(())
    }

    /// The entry of `group` at block `layer`, if any; does not count as a reuse.
    pub fn get_group(&self, layer: usize, group: TokenGroup) -> Option<&CachedCondition<B>> {
        match group {
            TokenGroup::Condition(k) => self.get(layer, k),
            TokenGroup::Target => self.targets.get(layer)?.as_ref(),
            TokenGroup::Text => None,
        }
    }

    /// The entry of `group` at block `layer` for reuse at `step`, serving `tokens` of its tokens; counts the read.
    pub fn reuse_group(
        &mut self,
        step: usize,
        layer: usize,
        group: TokenGroup,
        tokens: usize,
    ) -> Result<&CachedCondition<B>, PruneError> {
        let entry = match group {
            TokenGroup::Condition(k) => {
                self.layers.get(layer).and_then(|row| row.get(k)).and_then(|e| e.as_ref())
            }
            TokenGroup::Target => self.targets.get(layer).and_then(|e| e.as_ref()),
            TokenGroup::Text => None,
        };
        let entry = entry.ok_or(PruneError::CacheMiss { step, layer, group })?;
        self.stats.reuses += 1;
        self.stats.reused_tokens += tokens;
        Ok(entry)
    }

    /// Stores the prediction of every target token of the last planned pass, `[batch, target_tokens, channels]`.
    pub fn store_target_output(&mut self, output: Tensor<B, 3>) {
        self.target_output = Some(output);
    }

    /// The prediction of every target token of the last planned pass, if any.
    pub fn target_output(&self) -> Option<&Tensor<B, 3>> {
        self.target_output.as_ref()
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
        let tokens = self.get(layer, k).map_or(0, CachedCondition::tokens);
        self.reuse_group(step, layer, TokenGroup::Condition(k), tokens)
    }

    /// Drops every entry and resets the counters.
    pub fn clear(&mut self) {
        self.layers.clear();
        self.targets.clear();
        self.target_output = None;
        self.stats = CacheStats::default();
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries() == 0
    }

    /// Number of (block, group) entries held (condition images and the target).
    pub fn entries(&self) -> usize {
        self.layers.iter().flatten().chain(&self.targets).filter(|e| e.is_some()).count()
    }

    /// Bytes of device memory held by all entries and the target's last prediction.
    pub fn size_bytes(&self) -> usize {
        let entries: usize = self
            .layers
            .iter()
            .flatten()
            .chain(&self.targets)
            .flatten()
            .map(CachedCondition::size_bytes)
            .sum();
        let output = self.target_output.as_ref().map_or(0, |t| t.shape().num_elements() * t.dtype().size());
        entries + output
    }

    /// Bytes held by the target's entries (K/V and block inputs of all blocks) and its last prediction.
    pub fn target_bytes(&self) -> usize {
        let entries: usize = self.targets.iter().flatten().map(CachedCondition::size_bytes).sum();
        entries + self.target_output.as_ref().map_or(0, |t| t.shape().num_elements() * t.dtype().size())
    }

    /// Traffic counters since creation or the last [`clear`](Self::clear).
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Checks that every cache read of `plan` will hit, before the step runs (see [`StepPlan::check_cache`]); a
    /// target subset also needs the last prediction of all target tokens.
    pub fn check_plan(&self, step: usize, plan: &StepPlan, layout: &TokenLayout) -> Result<(), PruneError> {
        plan.check_cache(step, layout, |layer, group| {
            self.get_group(layer, group).map(|e| (e.tokens(), e.hidden.is_some()))
        })?;
        if plan.target_subset(layout.target_tokens).is_some() {
            let tokens = self.target_output.as_ref().map(|t| t.dims()[1]);
            if tokens != Some(layout.target_tokens) {
                return Err(PruneError::InvalidPlan(format!(
                    "step {}: a target subset needs the prediction of all {} target tokens from an earlier step \
                     (the cache holds {})",
                    step + 1,
                    layout.target_tokens,
                    tokens.map_or("none".to_string(), |t| format!("{t} tokens"))
                )));
            }
        }
        Ok(())
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
        CachedCondition {
            key: CachedKv::Dense(t()),
            value: CachedKv::Dense(t()),
            hidden: hidden.then(t),
            step: 0,
        }
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
    fn eight_bit_keys_and_values_count_a_byte_per_value_and_a_scale_per_token() {
        let dev = Default::default();
        let fp8 = || CachedKv::<Flex>::Fp8 {
            bits: Tensor::<Flex, 3, Int>::zeros([2, 5, 8], (&dev, DType::U8)),
            scales: Tensor::<Flex, 2>::ones([2, 5], (&dev, DType::F32)),
            dtype: DType::BF16,
        };
        let entry = CachedCondition { key: fp8(), value: fp8(), hidden: None, step: 0 };
        assert_eq!((entry.tokens(), entry.key.dims()), (5, [2, 5, 8]));
        assert_eq!(entry.size_bytes(), 2 * (2 * 5 * 8 + 2 * 5 * 4));
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
