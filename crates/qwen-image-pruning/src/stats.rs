//! [`StepStats`]: what one denoising step (or one DiT call of it) computed, reused and cached.

use std::iter::Sum;
use std::ops::{Add, AddAssign};

use serde::{Deserialize, Serialize};

/// Token and cache-entry counts of one DiT call, or of a whole step (the calls of its CFG branches added up; both
/// runs when a guardrail had the step run again).
///
/// The model returns one per planned forward pass; the denoising loop adds the branches of a step (`a + b`) and
/// hands the sum to the schedule ([`StepOutcome::stats`](crate::StepOutcome::stats)) and to the reports. They say
/// what ran, so the FLOPs of a run follow from them (`qwen_image_eval::flops::executed_flops`). Fields added after
/// the first three default to 0 when a report without them is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StepStats {
    /// Image-stream tokens computed, summed over blocks (and CFG branches).
    pub computed_tokens: usize,
    /// Image tokens served from the cache (condition images, a target subset's other tokens), summed over blocks (and
    /// CFG branches).
    pub reused_tokens: usize,
    /// (block, condition image or target) entries written to the cache.
    pub cached_entries: usize,
    /// Text tokens computed, summed over blocks (and CFG branches).
    #[serde(default)]
    pub text_tokens: usize,
    /// Of the reused tokens, those whose keys and values were recomputed from their cached block input
    /// ([`ReuseMode::RecomputeKeyValue`](crate::ReuseMode::RecomputeKeyValue)), summed over blocks (and CFG
    /// branches).
    #[serde(default)]
    pub recomputed_kv_tokens: usize,
    /// Query–key pairs of the attention, summed over blocks (and CFG branches): per block, the computed tokens
    /// (text and image) times every key (text, computed and reused image tokens).
    #[serde(default)]
    pub attention_pairs: usize,
}

impl Add for StepStats {
    type Output = StepStats;

    fn add(self, other: StepStats) -> StepStats {
        StepStats {
            computed_tokens: self.computed_tokens + other.computed_tokens,
            reused_tokens: self.reused_tokens + other.reused_tokens,
            cached_entries: self.cached_entries + other.cached_entries,
            text_tokens: self.text_tokens + other.text_tokens,
            recomputed_kv_tokens: self.recomputed_kv_tokens + other.recomputed_kv_tokens,
            attention_pairs: self.attention_pairs + other.attention_pairs,
        }
    }
}

impl AddAssign for StepStats {
    fn add_assign(&mut self, other: StepStats) {
        *self = *self + other;
    }
}

impl Sum for StepStats {
    fn sum<I: Iterator<Item = StepStats>>(iter: I) -> StepStats {
        iter.fold(StepStats::default(), Add::add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_add_field_by_field_and_serialize_flat() {
        let stats = |n: [usize; 6]| StepStats {
            computed_tokens: n[0],
            reused_tokens: n[1],
            cached_entries: n[2],
            text_tokens: n[3],
            recomputed_kv_tokens: n[4],
            attention_pairs: n[5],
        };
        let (a, b) = (stats([3, 2, 1, 7, 1, 60]), stats([10, 0, 4, 7, 0, 140]));
        let sum = stats([13, 2, 5, 14, 1, 200]);
        assert_eq!(a + b, sum);
        assert_eq!([a, b].into_iter().sum::<StepStats>(), sum);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(
            json,
            r#"{"computed_tokens":3,"reused_tokens":2,"cached_entries":1,"text_tokens":7,"recomputed_kv_tokens":1,"attention_pairs":60}"#
        );
        assert_eq!(serde_json::from_str::<StepStats>(&json).unwrap(), a);
        // A report written before the last three fields existed.
        let old = r#"{"computed_tokens":3,"reused_tokens":2,"cached_entries":1}"#;
        assert_eq!(serde_json::from_str::<StepStats>(old).unwrap(), stats([3, 2, 1, 0, 0, 0]));
    }
}
