//! Plans: what happens to each token group at each layer of one denoising step.
//!
//! Plans are plain serde data. Their JSON names are snake_case and follow the spec grammar where it has a word for
//! them: `{"action": {"reuse": "recompute"}, "tokens": "all", …}`. The PascalCase names of earlier versions
//! (`"RecomputeKeyValue"`, `"ComputeAndCache"`, …) are still accepted on input.

use serde::{Deserialize, Serialize};

use crate::PruneError;

/// A group of tokens of the DiT's joint sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenGroup {
    /// The text (prompt) stream.
    #[serde(alias = "Text")]
    Text,
    /// The noisy target latent tokens (the image being generated).
    #[serde(alias = "Target")]
    Target,
    /// The tokens of condition image `k` (0-based, in `img_shapes` order after the target).
    #[serde(alias = "Condition")]
    Condition(usize),
}

impl std::fmt::Display for TokenGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenGroup::Text => write!(f, "text"),
            TokenGroup::Target => write!(f, "target"),
            TokenGroup::Condition(k) => write!(f, "condition image {k}"),
        }
    }
}

/// How reused condition tokens provide their keys and values.
///
/// JSON: `"kv"` and `"recompute"`, the words of the spec grammar (`cat/recompute`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum ReuseMode {
    /// Attend to the post-QK-norm, post-RoPE K and V exactly as they were cached. The condition tokens cost
    /// nothing at this layer.
    #[default]
    #[serde(rename = "kv", alias = "KeyValue", alias = "key_value")]
    KeyValue,
    /// Recompute K and V from the cached layer-input hidden states with the current step's modulation (LayerNorm,
    /// modulate, K/V projections, QK-norm, RoPE). No Q, attention output or MLP is computed for these tokens.
    #[serde(rename = "recompute", alias = "RecomputeKeyValue", alias = "recompute_key_value")]
    RecomputeKeyValue,
}

/// What one token group does at one layer.
///
/// Text and target tokens are always computed: [`StepPlan::validate_shape`] rejects any other action for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupAction {
    /// Compute the tokens normally; nothing is cached.
    #[default]
    #[serde(alias = "Compute")]
    Compute,
    /// Compute the tokens normally and cache their layer-input hidden states and post-norm post-RoPE K and V.
    #[serde(alias = "ComputeAndCache")]
    ComputeAndCache,
    /// Do not compute the tokens; attend to cached keys and values.
    #[serde(alias = "Reuse")]
    Reuse(ReuseMode),
}

impl GroupAction {
    /// Whether the tokens are computed (their hidden states are updated) at this layer.
    pub fn computes(self) -> bool {
        matches!(self, GroupAction::Compute | GroupAction::ComputeAndCache)
    }

    /// Whether this action reads the cache.
    pub fn reuses(self) -> bool {
        matches!(self, GroupAction::Reuse(_))
    }
}

/// Which tokens of a group an action applies to.
///
/// [`TokenSubset::Indices`] is supported for the **target** group (an edited region: the tokens outside the subset
/// are not computed and attend as cached K/V; see [`StepPlan::validate_shape`] for the rules). Condition images and
/// the text take [`TokenSubset::All`] only.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TokenSubset {
    /// Every token of the group.
    #[default]
    #[serde(alias = "All")]
    All,
    /// Only these token indices (0-based within the group, strictly increasing, not empty); the action of the other
    /// tokens is given by [`GroupPlan::rest`]. Target group only.
    #[serde(alias = "Indices")]
    Indices(Vec<u32>),
}

/// The decision for one token group at one layer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct GroupPlan {
    /// The action for the tokens selected by `tokens`.
    pub action: GroupAction,
    /// The tokens `action` applies to.
    pub tokens: TokenSubset,
    /// The action of the tokens not in `tokens` (ignored when `tokens` is [`TokenSubset::All`]).
    pub rest: GroupAction,
}

impl TokenSubset {
    /// The indices of a subset, `None` for [`TokenSubset::All`].
    pub fn indices(&self) -> Option<&[u32]> {
        match self {
            TokenSubset::All => None,
            TokenSubset::Indices(idx) => Some(idx),
        }
    }

    /// Number of selected tokens in a group of `group_len` tokens.
    pub fn count(&self, group_len: usize) -> usize {
        self.indices().map_or(group_len, <[u32]>::len)
    }
}

impl GroupPlan {
    /// A plan computing only the target tokens `indices` at this block; the others attend as cached K/V, provided
    /// by `rest` (a [`GroupAction::Reuse`]).
    pub fn subset(indices: Vec<u32>, rest: ReuseMode) -> Self {
        GroupPlan {
            action: GroupAction::Compute,
            tokens: TokenSubset::Indices(indices),
            rest: GroupAction::Reuse(rest),
        }
    }

    /// A plan applying `action` to every token of the group.
    pub fn all(action: GroupAction) -> Self {
        GroupPlan { action, tokens: TokenSubset::All, rest: action }
    }

    /// The action if it applies to the whole group, `None` for a token subset.
    pub fn uniform_action(&self) -> Option<GroupAction> {
        match self.tokens {
            TokenSubset::All => Some(self.action),
            _ if self.action == self.rest => Some(self.action),
            _ => None,
        }
    }
}

impl From<GroupAction> for GroupPlan {
    fn from(action: GroupAction) -> Self {
        GroupPlan::all(action)
    }
}

/// What every token group does at one layer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct LayerPlan {
    /// The text stream.
    pub text: GroupPlan,
    /// The target (noisy latent) tokens.
    pub target: GroupPlan,
    /// One entry per condition image, in `img_shapes` order.
    pub conditions: Vec<GroupPlan>,
}

impl LayerPlan {
    /// Text and target computed; all `num_conditions` condition images take `action`.
    pub fn with_conditions(num_conditions: usize, action: GroupAction) -> Self {
        LayerPlan {
            text: GroupPlan::all(GroupAction::Compute),
            target: GroupPlan::all(GroupAction::Compute),
            conditions: vec![GroupPlan::all(action); num_conditions],
        }
    }

    /// Everything computed, nothing cached.
    pub fn compute_all(num_conditions: usize) -> Self {
        Self::with_conditions(num_conditions, GroupAction::Compute)
    }

    /// The plan of `group`, if the group exists.
    pub fn group(&self, group: TokenGroup) -> Option<&GroupPlan> {
        match group {
            TokenGroup::Text => Some(&self.text),
            TokenGroup::Target => Some(&self.target),
            TokenGroup::Condition(k) => self.conditions.get(k),
        }
    }

    /// Every group with its plan, in sequence order (text, target, condition images).
    pub fn groups(&self) -> impl Iterator<Item = (TokenGroup, &GroupPlan)> {
        [(TokenGroup::Text, &self.text), (TokenGroup::Target, &self.target)]
            .into_iter()
            .chain(self.conditions.iter().enumerate().map(|(k, p)| (TokenGroup::Condition(k), p)))
    }
}

/// The plan of one denoising step: one [`LayerPlan`] per transformer block.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct StepPlan {
    /// Per-layer plans, index = block index.
    pub layers: Vec<LayerPlan>,
}

impl StepPlan {
    /// A plan from per-layer plans.
    pub fn new(layers: Vec<LayerPlan>) -> Self {
        StepPlan { layers }
    }

    /// Every layer computes everything and caches nothing.
    pub fn compute_all(num_layers: usize, num_conditions: usize) -> Self {
        StepPlan { layers: vec![LayerPlan::compute_all(num_conditions); num_layers] }
    }

    /// Whether any group reuses cached tokens at any layer.
    pub fn reuses_anything(&self) -> bool {
        self.layers.iter().any(|l| l.groups().any(|(_, p)| p.action.reuses() || p.rest.reuses()))
    }

    /// Checks the plan against the model and the token layout before anything runs: one plan per layer, one per
    /// condition image, token subsets in range; and what the model does not execute is rejected here, the one place
    /// that decides it ([`PruneError::Unsupported`]):
    ///
    /// - the text is always [`GroupAction::Compute`]d;
    /// - the target is [`GroupAction::Compute`]d or cached as a whole, or computed on a [`TokenSubset::Indices`]
    ///   (action [`GroupAction::Compute`], `rest` a [`GroupAction::Reuse`]); a subset is the same at every block of
    ///   the step (the model gathers the tokens once per step and scatters the prediction once);
    /// - condition images take any action on all their tokens (no subsets).
    pub fn validate_shape(&self, num_layers: usize, layout: &TokenLayout) -> Result<(), PruneError> {
        if self.layers.len() != num_layers {
            return Err(PruneError::InvalidPlan(format!(
                "the plan has {} layer plans but the model has {num_layers} layers",
                self.layers.len()
            )));
        }
        let first_target = self.layers.first().map(|l| &l.target.tokens);
        for (layer, lp) in self.layers.iter().enumerate() {
            if lp.conditions.len() != layout.condition_tokens.len() {
                return Err(PruneError::InvalidPlan(format!(
                    "layer {layer}: the plan has {} condition groups but the input has {} condition images",
                    lp.conditions.len(),
                    layout.condition_tokens.len()
                )));
            }
            for (group, plan) in lp.groups() {
                let len = layout.group_len(group).unwrap_or(0);
                crate::subset::check_group(layer, group, plan, len)?;
            }
            if Some(&lp.target.tokens) != first_target {
                return Err(PruneError::Unsupported(format!(
                    "layer {layer}: the target's token subset differs from layer 0's; a subset is the same at \
                     every block of a step"
                )));
            }
        }
        Ok(())
    }

    /// The target tokens this step computes when it computes only some of them: a strict subset of the
    /// `target_tokens` (after [`validate_shape`](Self::validate_shape), the same at every block); `None` when every
    /// target token is computed.
    pub fn target_subset(&self, target_tokens: usize) -> Option<&[u32]> {
        let idx = self.layers.first()?.target.tokens.indices()?;
        (idx.len() < target_tokens).then_some(idx)
    }

    /// Checks, before anything runs, that every cache read of this plan will hit.
    ///
    /// `lookup(layer, group)` returns, for `group` (a condition image or the target) at block `layer`, `None` if
    /// nothing is cached, else the number of cached tokens and whether the layer-input hidden states were cached. A
    /// condition image that is reused at some block and computed again at a later block takes that later block's
    /// input from the cache, so its hidden states must be there. A target subset needs the whole target cached at
    /// every block (with hidden states for [`ReuseMode::RecomputeKeyValue`]); the last prediction it also needs is
    /// checked by [`TokenPruningCache::check_plan`](crate::TokenPruningCache::check_plan).
    pub fn check_cache(
        &self,
        step: usize,
        layout: &TokenLayout,
        lookup: impl Fn(usize, TokenGroup) -> Option<(usize, bool)>,
    ) -> Result<(), PruneError> {
        let check = |layer: usize, group: TokenGroup, expected: usize, needs_hidden: bool| {
            let (cached, has_hidden) =
                lookup(layer, group).ok_or(PruneError::CacheMiss { step, layer, group })?;
            if cached != expected {
                return Err(PruneError::CacheShapeMismatch { layer, group, cached, expected });
            }
            if needs_hidden && !has_hidden {
                return Err(PruneError::HiddenNotCached { layer, group });
            }
            Ok(())
        };
        let mut live = vec![true; layout.condition_tokens.len()];
        let target_subset = self.target_subset(layout.target_tokens).is_some();
        for (layer, lp) in self.layers.iter().enumerate() {
            if target_subset {
                let needs_hidden = lp.target.rest == GroupAction::Reuse(ReuseMode::RecomputeKeyValue);
                check(layer, TokenGroup::Target, layout.target_tokens, needs_hidden)?;
            }
            for (k, plan) in lp.conditions.iter().enumerate() {
                let needs_hidden = match plan.action {
                    GroupAction::Reuse(ReuseMode::KeyValue) => false,
                    GroupAction::Reuse(ReuseMode::RecomputeKeyValue) => true,
                    GroupAction::Compute | GroupAction::ComputeAndCache if live[k] => continue,
                    GroupAction::Compute | GroupAction::ComputeAndCache => true,
                };
                check(layer, TokenGroup::Condition(k), layout.condition_tokens[k], needs_hidden)?;
                live[k] = plan.action.computes();
            }
        }
        Ok(())
    }
}

/// Sizes of the token groups of one DiT call.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct TokenLayout {
    /// Number of text tokens.
    pub text_tokens: usize,
    /// Number of target (noisy latent) tokens.
    pub target_tokens: usize,
    /// Number of tokens of each condition image.
    pub condition_tokens: Vec<usize>,
}

impl TokenLayout {
    /// A layout from its group sizes.
    pub fn new(text_tokens: usize, target_tokens: usize, condition_tokens: Vec<usize>) -> Self {
        TokenLayout { text_tokens, target_tokens, condition_tokens }
    }

    /// Number of tokens of `group`, `None` if there is no such condition image.
    pub fn group_len(&self, group: TokenGroup) -> Option<usize> {
        match group {
            TokenGroup::Text => Some(self.text_tokens),
            TokenGroup::Target => Some(self.target_tokens),
            TokenGroup::Condition(k) => self.condition_tokens.get(k).copied(),
        }
    }

    /// Total number of image-stream tokens (target + all condition images).
    pub fn image_tokens(&self) -> usize {
        self.target_tokens + self.condition_tokens.iter().sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> TokenLayout {
        TokenLayout::new(4, 8, vec![8])
    }

    fn one_layer(edit: impl FnOnce(&mut LayerPlan)) -> StepPlan {
        let mut layer = LayerPlan::compute_all(1);
        edit(&mut layer);
        StepPlan::new(vec![layer])
    }

    #[test]
    fn json_is_snake_case_and_pascal_case_is_still_read() {
        let plan = one_layer(|l| {
            l.conditions[0] = GroupAction::Reuse(ReuseMode::RecomputeKeyValue).into();
        });
        let json = serde_json::to_string(&plan.layers[0].conditions[0]).unwrap();
        assert_eq!(json, r#"{"action":{"reuse":"recompute"},"tokens":"all","rest":{"reuse":"recompute"}}"#);
        assert_eq!(serde_json::from_str::<StepPlan>(&serde_json::to_string(&plan).unwrap()).unwrap(), plan);
        let old: GroupPlan = serde_json::from_str(
            r#"{"action":{"Reuse":"RecomputeKeyValue"},"tokens":"All","rest":"ComputeAndCache"}"#,
        )
        .unwrap();
        assert_eq!(old.action, GroupAction::Reuse(ReuseMode::RecomputeKeyValue));
        assert_eq!(old.rest, GroupAction::ComputeAndCache);
        assert_eq!(serde_json::to_string(&TokenGroup::Condition(1)).unwrap(), r#"{"condition":1}"#);
        assert_eq!(serde_json::from_str::<ReuseMode>(r#""KeyValue""#).unwrap(), ReuseMode::KeyValue);
    }

    #[test]
    fn validation_rejects_what_the_model_does_not_execute() {
        assert!(one_layer(|_| {}).validate_shape(1, &layout()).is_ok());
        for (what, plan) in [
            ("target reused", one_layer(|l| l.target = GroupAction::Reuse(ReuseMode::KeyValue).into())),
            ("text cached", one_layer(|l| l.text = GroupAction::ComputeAndCache.into())),
            ("text reused", one_layer(|l| l.text = GroupAction::Reuse(ReuseMode::KeyValue).into())),
            (
                "subset",
                one_layer(|l| {
                    l.conditions[0] = GroupPlan {
                        action: GroupAction::Compute,
                        tokens: TokenSubset::Indices(vec![0, 3]),
                        rest: GroupAction::Reuse(ReuseMode::KeyValue),
                    }
                }),
            ),
        ] {
            let err = plan.validate_shape(1, &layout()).unwrap_err();
            assert!(matches!(err, PruneError::Unsupported(_)), "{what}: {err}");
        }
        let out_of_range = one_layer(|l| l.target = GroupPlan::subset(vec![8], ReuseMode::KeyValue));
        assert!(matches!(out_of_range.validate_shape(1, &layout()), Err(PruneError::InvalidPlan(_))));
        assert!(matches!(one_layer(|_| {}).validate_shape(2, &layout()), Err(PruneError::InvalidPlan(_))));
    }

    #[test]
    fn target_subsets_are_validated() {
        let subset = |idx: Vec<u32>| GroupPlan::subset(idx, ReuseMode::KeyValue);
        let ok = one_layer(|l| l.target = subset(vec![1, 5]));
        ok.validate_shape(1, &layout()).unwrap();
        assert_eq!(ok.target_subset(8), Some(&[1, 5][..]));
        assert_eq!(one_layer(|l| l.target = subset((0..8).collect())).target_subset(8), None);
        for (what, plan) in [
            ("empty", one_layer(|l| l.target = subset(vec![]))),
            ("unsorted", one_layer(|l| l.target = subset(vec![3, 1]))),
            (
                "rest computed",
                one_layer(|l| {
                    l.target = subset(vec![0]);
                    l.target.rest = GroupAction::Compute;
                }),
            ),
        ] {
            let err = plan.validate_shape(1, &layout()).unwrap_err();
            assert!(matches!(err, PruneError::InvalidPlan(_) | PruneError::Unsupported(_)), "{what}: {err}");
        }
        let mut two = StepPlan::new(vec![LayerPlan::compute_all(1); 2]);
        two.layers[0].target = subset(vec![1]);
        assert!(matches!(two.validate_shape(2, &layout()), Err(PruneError::Unsupported(_))));
        two.layers[1].target = subset(vec![1]);
        two.validate_shape(2, &layout()).unwrap();
        // The subset needs the target cached at every block.
        let hit = |_: usize, g: TokenGroup| (g == TokenGroup::Target).then_some((8, false));
        two.check_cache(1, &layout(), hit).unwrap();
        let miss = |l: usize, g: TokenGroup| (g == TokenGroup::Target && l == 0).then_some((8, false));
        let err = two.check_cache(1, &layout(), miss).unwrap_err();
        assert_eq!(err, PruneError::CacheMiss { step: 1, layer: 1, group: TokenGroup::Target });
        two.layers[1].target.rest = GroupAction::Reuse(ReuseMode::RecomputeKeyValue);
        assert!(matches!(
            two.check_cache(1, &layout(), hit),
            Err(PruneError::HiddenNotCached { layer: 1, .. })
        ));
    }
}
