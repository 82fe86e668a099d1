//! What a [`GroupPlan`] may ask of each token group: the per-group rules of [`StepPlan::validate_shape`].
//!
//! [`StepPlan::validate_shape`]: crate::StepPlan::validate_shape

use crate::{GroupAction, GroupPlan, PruneError, TokenGroup, TokenSubset};

/// Checks the plan of `group` (of `len` tokens) at block `layer`: indices strictly increasing and in range, and
/// only what the model executes (text computed; target computed, cached, or computed on a subset with the rest
/// reused; condition images on all their tokens).
pub(crate) fn check_group(
    layer: usize,
    group: TokenGroup,
    plan: &GroupPlan,
    len: usize,
) -> Result<(), PruneError> {
    if let TokenSubset::Indices(idx) = &plan.tokens {
        if idx.is_empty() {
            return Err(PruneError::InvalidPlan(format!(
                "layer {layer}, {group}: an empty token subset (compute at least one token)"
            )));
        }
        if !idx.windows(2).all(|w| w[0] < w[1]) || idx.last().is_some_and(|&i| i as usize >= len) {
            return Err(PruneError::InvalidPlan(format!(
                "layer {layer}, {group}: token indices must be strictly increasing and < {len}"
            )));
        }
    }
    let unsupported = |what: &str| Err(PruneError::Unsupported(format!("layer {layer}: {what}")));
    match (group, &plan.tokens) {
        (TokenGroup::Text, _) if plan.action != GroupAction::Compute || plan.tokens != TokenSubset::All => {
            unsupported("text tokens are always computed; caching, reusing or subsetting them is not supported")
        }
        (TokenGroup::Target, TokenSubset::All) if plan.action.reuses() => {
            unsupported("the whole target cannot be reused (compute a subset of it instead)")
        }
        (TokenGroup::Target, TokenSubset::Indices(_)) if plan.action != GroupAction::Compute => unsupported(
            "a target subset is computed (`compute`); its tokens are not cached (the whole target is, at a full step)",
        ),
        (TokenGroup::Target, TokenSubset::Indices(_)) if !plan.rest.reuses() => {
            unsupported("the target tokens outside a subset are reused (`rest` must be a reuse action)")
        }
        (TokenGroup::Condition(_), TokenSubset::Indices(_)) => {
            unsupported("token subsets of condition images are not supported (only of the target)")
        }
        _ => Ok(()),
    }
}
