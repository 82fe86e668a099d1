//! [`CacheBudget`]: fits a schedule's plans to a byte budget for the pruning cache.
//!
//! Each cached (block, token group) entry holds `tokens × bytes_per_token` bytes (K and V: `2 · dim · dtype size` per
//! token, 48 MiB per block for a 4096-token condition image at bf16; with the block input, for schedules that read it,
//! `3 · …`, 72 MiB; K and V in 8 bits, [`CachedKv::Fp8`](crate::CachedKv), `2 · (dim + 4)`, 24 MiB). Entries stay
//! until they are replaced, so the cache's peak is the sum over every (block, group) a run ever caches. The fit, the same
//! at every step because it depends on the token layout only:
//!
//! 1. **The target region first goes if it cannot fit**: a target subset needs the whole target cached at every
//!    block. If that alone exceeds the budget, steps compute the whole target (subsets dropped) and nothing of the
//!    target is cached.
//! 2. **Condition images, shallowest blocks dropped first**: the condition images stay cached and reused in the
//!    deepest blocks that fit in what is left; at the shallower blocks they are computed (not cached, not reused).
//!    Keeping a contiguous deepest range needs no resumed hidden states, so the cached K/V alone serve every reuse.
//!
//! The schedule's name says what was dropped (`…+budget:2GiB[target dropped; conditions at blocks 33-59]`), and
//! [`CacheBudget::fit`] returns it as data.

use serde::{Deserialize, Serialize};

use crate::{
    GroupAction, GroupPlan, PruneError, PruningSchedule, StepContext, StepOutcome, StepPlan, TokenLayout,
};

/// What a budget dropped from a schedule's plans.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetFit {
    /// Whether target subsets (and target caching) were dropped.
    pub target_dropped: bool,
    /// The first block whose condition images stay cached and reused (`num_layers` when none do).
    pub first_condition_block: usize,
    /// Bytes the fitted plans cache at most.
    pub planned_bytes: u64,
}

/// Wraps a schedule so that its cache stays within `budget_bytes`.
#[derive(Clone, Debug)]
pub struct CacheBudget<S> {
    inner: S,
    budget_bytes: u64,
    bytes_per_token: u64,
    fit: Option<(usize, BudgetFit)>,
    /// Whether any plan so far cached the target or computed a subset of it.
    uses_target: bool,
}

impl<S: PruningSchedule> CacheBudget<S> {
    /// Fits `inner`'s plans to `budget_bytes`; `bytes_per_token` is what one cached token holds (`2 · dim · dtype
    /// size` for K and V, `3 · …` when the schedule keeps block-input hidden states too).
    pub fn new(inner: S, budget_bytes: u64, bytes_per_token: u64) -> Result<Self, PruneError> {
        if bytes_per_token == 0 {
            return Err(PruneError::InvalidPlan("a cache budget needs the bytes per cached token".into()));
        }
        Ok(CacheBudget { inner, budget_bytes, bytes_per_token, fit: None, uses_target: false })
    }

    /// What the budget drops for `num_layers` blocks and `layout`, for plans that cache the target (a region
    /// schedule) when `uses_target`.
    pub fn fit(&self, num_layers: usize, layout: &TokenLayout, uses_target: bool) -> BudgetFit {
        let bytes = |tokens: usize| tokens as u64 * self.bytes_per_token;
        let target = if uses_target { bytes(layout.target_tokens) * num_layers as u64 } else { 0 };
        let target_dropped = target > self.budget_bytes;
        let left = self.budget_bytes - if target_dropped { 0 } else { target };
        let per_block = bytes(layout.condition_tokens.iter().sum()).max(1);
        let kept = ((left / per_block) as usize).min(num_layers);
        let planned = kept as u64 * per_block + if target_dropped { 0 } else { target };
        BudgetFit { target_dropped, first_condition_block: num_layers - kept, planned_bytes: planned }
    }

    fn describe(fit: &BudgetFit, num_layers: usize) -> String {
        let mut dropped = Vec::new();
        if fit.target_dropped {
            dropped.push("target region dropped".to_string());
        }
        match fit.first_condition_block {
            0 => {}
            b if b >= num_layers => dropped.push("no condition caching".into()),
            b => dropped.push(format!("conditions cached at blocks {b}-{}", num_layers - 1)),
        }
        if dropped.is_empty() {
            "fits".into()
        } else {
            dropped.join("; ")
        }
    }
}

/// A byte count as people write it (`2GiB`, `512MiB`, `1.5GB`, `1000`).
pub fn parse_bytes(text: &str) -> Result<u64, PruneError> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        _ => f64::NAN,
    };
    let value = number.trim().parse::<f64>().map(|v| v * scale).unwrap_or(f64::NAN);
    if !value.is_finite() || value < 0.0 {
        return Err(PruneError::InvalidPlan(format!(
            "`{text}` is not a byte count (e.g. 2GiB, 512MiB, 1.5GB)"
        )));
    }
    Ok(value as u64)
}

impl<S: PruningSchedule> PruningSchedule for CacheBudget<S> {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        let mut plan = self.inner.plan_step(ctx)?;
        self.uses_target |= plan.layers.iter().any(|l| l.target != GroupPlan::all(GroupAction::Compute));
        let fit = self.fit(ctx.num_layers, ctx.layout, self.uses_target);
        for (layer, lp) in plan.layers.iter_mut().enumerate() {
            if fit.target_dropped {
                lp.target = GroupPlan::all(GroupAction::Compute);
            }
            if layer < fit.first_condition_block {
                lp.conditions.iter_mut().for_each(|c| *c = GroupAction::Compute.into());
            }
        }
        self.fit = Some((ctx.num_layers, fit));
        Ok(plan)
    }

    fn review(&mut self, outcome: &StepOutcome) -> Option<StepPlan> {
        self.inner.review(outcome)
    }

    fn observe(&mut self, outcome: &StepOutcome) {
        self.inner.observe(outcome)
    }

    fn needs_target_signals(&self, step: usize) -> bool {
        self.inner.needs_target_signals(step)
    }

    /// The fit computes the condition at the first blocks and reuses it from there to the last: no block computes
    /// it after reusing it, so the inner schedule decides.
    fn needs_cached_hidden_states(&self) -> bool {
        self.inner.needs_cached_hidden_states()
    }

    fn name(&self) -> String {
        let gib = self.budget_bytes as f64 / (1u64 << 30) as f64;
        let what = match &self.fit {
            Some((layers, fit)) => format!("[{}]", Self::describe(fit, *layers)),
            None => String::new(),
        };
        format!("{}+budget:{gib:.2}GiB{what}", self.inner.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dry_run, Cat, EditRegion, RegionSource, ReuseMode};

    const SIGMAS: [f32; 5] = [1.0, 0.9, 0.75, 0.5, 0.0];

    #[test]
    fn keeps_the_deepest_condition_blocks_that_fit() {
        // 10 blocks, one 4-token condition image, 1 byte per token: 4 bytes per block; 13 bytes keep 3 blocks.
        let layout = TokenLayout::new(2, 4, vec![4]);
        let mut s = CacheBudget::new(Cat::default(), 13, 1).unwrap();
        let plans = dry_run(&mut s, &SIGMAS, 10, &layout).unwrap();
        let reuse = GroupAction::Reuse(ReuseMode::KeyValue);
        let actions: Vec<GroupAction> = plans[1].layers.iter().map(|l| l.conditions[0].action).collect();
        assert_eq!(actions[..7], [GroupAction::Compute; 7]);
        assert_eq!(actions[7..], [reuse; 3]);
        assert_eq!(s.fit(10, &layout, false).planned_bytes, 12);
        assert!(s.name().ends_with("[conditions cached at blocks 7-9]"), "{}", s.name());
    }

    #[test]
    fn drops_the_target_region_when_it_cannot_fit() {
        let layout = TokenLayout::new(2, 4, vec![4]);
        let region =
            EditRegion::new(RegionSource::Estimate { threshold: 0.1 }, 0, None, ReuseMode::KeyValue).unwrap();
        let mut s = CacheBudget::new(region, 20, 1).unwrap();
        let plans = dry_run(&mut s, &SIGMAS, 10, &layout).unwrap();
        assert!(plans.iter().all(|p| p.target_subset(4).is_none()));
        assert!(s.fit(10, &layout, true).target_dropped);
        assert!(s.name().contains("target region dropped; conditions cached at blocks 5-9"), "{}", s.name());
        // With room for the target (40 bytes) and 2 condition blocks.
        assert!(!CacheBudget::new(Cat::default(), 48, 1).unwrap().fit(10, &layout, true).target_dropped);
    }

    #[test]
    fn parses_byte_counts() {
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5 GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("512mib").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("two").is_err() && parse_bytes("-1G").is_err() && parse_bytes("5XB").is_err());
    }
}
