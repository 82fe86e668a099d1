//! [`StepStats`]: what one denoising step (or one DiT call of it) computed, reused and cached.

use std::iter::Sum;
use std::ops::{Add, AddAssign};

use serde::{Deserialize, Serialize};

/// Token and cache-entry counts of one DiT call, or of a whole step (the calls of its CFG branches added up).
///
/// The model returns one per planned forward pass; the denoising loop adds the branches of a step (`a + b`) and
/// hands the sum to the schedule ([`StepOutcome::stats`](crate::StepOutcome::stats)) and to the reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StepStats {
    /// Image-stream tokens computed, summed over blocks (and CFG branches).
    pub computed_tokens: usize,
    /// Condition tokens served from the cache, summed over blocks (and CFG branches).
    pub reused_tokens: usize,
    /// (block, condition image) entries written to the cache.
    pub cached_entries: usize,
}

impl Add for StepStats {
    type Output = StepStats;

    fn add(self, other: StepStats) -> StepStats {
        StepStats {
            computed_tokens: self.computed_tokens + other.computed_tokens,
            reused_tokens: self.reused_tokens + other.reused_tokens,
            cached_entries: self.cached_entries + other.cached_entries,
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
        let a = StepStats { computed_tokens: 3, reused_tokens: 2, cached_entries: 1 };
        let b = StepStats { computed_tokens: 10, reused_tokens: 0, cached_entries: 4 };
        let sum = StepStats { computed_tokens: 13, reused_tokens: 2, cached_entries: 5 };
        assert_eq!(a + b, sum);
        assert_eq!([a, b].into_iter().sum::<StepStats>(), sum);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, r#"{"computed_tokens":3,"reused_tokens":2,"cached_entries":1}"#);
        assert_eq!(serde_json::from_str::<StepStats>(&json).unwrap(), a);
    }
}
