//! Planned FLOPs of the DiT's transformer blocks per denoising step, from the pruning schedule's plans: what a
//! schedule saves, independent of the machine.
//!
//! Per block, with `D` the DiT's inner width (`heads × head_dim`) and tokens counted per group from the plan:
//!
//! - every **computed** token (text, target, and condition tokens computed or computed and cached) costs its
//!   stream's Q/K/V and output projections and MLP: `(3 + 1) · 2D² + 2 · 2 · D · 4D = 24 D²`;
//! - a condition token **reused with recomputed K/V** (`/recompute`) costs the K and V projections of its cached
//!   input: `2 · 2D² = 4 D²`; one **reused as cached K/V** costs nothing;
//! - attention costs `4 · q · k · D` (QKᵀ and the weighted sum of V), with `q` the computed tokens (the queries)
//!   and `k` all tokens (the keys: reused condition tokens included).
//!
//! Left out (the same under every schedule, and small): the timestep embedding and modulation (per sample, not per
//! token), the input and output projections, norms, RoPE and the activations. Under true CFG both branches are
//! counted with the prompt's text length.

use qwen_image::dit::DitConfig;
use qwen_image_pruning::{
    dry_run, GroupAction, GroupPlan, ReuseMode, ScheduleFactory, StepPlan, TokenLayout, TokenSubset,
};

use crate::Result;

/// Tokens of one group under its plan, by what happens to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GroupCount {
    computed: usize,
    recomputed_kv: usize,
    reused_kv: usize,
}

impl GroupCount {
    fn of(plan: &GroupPlan, len: usize) -> Self {
        let selected = match &plan.tokens {
            TokenSubset::Indices(idx) => idx.len().min(len),
            _ => len,
        };
        let mut count = GroupCount::default();
        count.add(plan.action, selected);
        count.add(plan.rest, len - selected);
        count
    }

    fn add(&mut self, action: GroupAction, n: usize) {
        match action {
            GroupAction::Compute | GroupAction::ComputeAndCache => self.computed += n,
            GroupAction::Reuse(ReuseMode::RecomputeKeyValue) => self.recomputed_kv += n,
            GroupAction::Reuse(ReuseMode::KeyValue) => self.reused_kv += n,
        }
    }
}

/// FLOPs of the transformer blocks at each step of `plans` (one plan per step) for a DiT of `config` on `layout`,
/// times `branches` (2 under true CFG).
pub fn step_flops(config: &DitConfig, layout: &TokenLayout, plans: &[StepPlan], branches: usize) -> Vec<f64> {
    let d = config.inner_dim() as f64;
    plans
        .iter()
        .map(|plan| {
            let per_branch: f64 = plan
                .layers
                .iter()
                .map(|layer| {
                    let mut total = GroupCount::default();
                    for (group, group_plan) in layer.groups() {
                        let c = GroupCount::of(group_plan, layout.group_len(group).unwrap_or(0));
                        total.computed += c.computed;
                        total.recomputed_kv += c.recomputed_kv;
                        total.reused_kv += c.reused_kv;
                    }
                    let (q, k) = (
                        total.computed as f64,
                        (total.computed + total.recomputed_kv + total.reused_kv) as f64,
                    );
                    24.0 * d * d * q + 4.0 * d * d * total.recomputed_kv as f64 + 4.0 * q * k * d
                })
                .sum();
            per_branch * branches as f64
        })
        .collect()
}

/// The planned FLOPs per step of a run of `schedule` with the σ values `sigmas` (`steps + 1` of them) on `layout`:
/// the schedule is dry-run ([`dry_run`]) as the pipeline plans it.
pub fn planned_step_flops(
    config: &DitConfig,
    schedule: &dyn ScheduleFactory,
    sigmas: &[f32],
    layout: &TokenLayout,
    branches: usize,
) -> Result<Vec<f64>> {
    let mut fresh = schedule.build()?;
    let plans = dry_run(fresh.as_mut(), sigmas, config.num_layers, layout)?;
    Ok(step_flops(config, layout, &plans, branches))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_image_pruning::ScheduleSpec;

    fn config() -> DitConfig {
        DitConfig { num_layers: 6, num_attention_heads: 3, attention_head_dim: 64, ..DitConfig::default() }
    }

    #[test]
    fn a_full_step_counts_every_token_in_every_block() {
        let layout = TokenLayout::new(10, 64, vec![64]);
        let flops = step_flops(&config(), &layout, &[StepPlan::compute_all(6, 1)], 1);
        let (d, n) = (192.0f64, 138.0f64);
        let want = 6.0 * (24.0 * d * d * n + 4.0 * n * n * d);
        assert!((flops[0] - want).abs() / want < 1e-12, "{} vs {want}", flops[0]);
        assert_eq!(step_flops(&config(), &layout, &[StepPlan::compute_all(6, 1)], 2)[0], 2.0 * flops[0]);
    }

    #[test]
    fn reuse_steps_cost_less_and_recompute_costs_more_than_kv_reuse() {
        let layout = TokenLayout::new(10, 64, vec![64]);
        let sigmas = [1.0, 0.9, 0.75, 0.5, 0.0];
        let flops = |s: &str| {
            planned_step_flops(&config(), &s.parse::<ScheduleSpec>().unwrap(), &sigmas, &layout, 1).unwrap()
        };
        let (none, cat, recompute) = (flops("none"), flops("cat"), flops("cat/recompute"));
        assert_eq!(none.len(), 4);
        assert!(none.iter().all(|&f| f == none[0]));
        assert_eq!((cat[0], cat[2]), (none[0], none[2]));
        assert!(cat[1] < 0.7 * none[1], "{cat:?} vs {none:?}");
        assert!(cat[1] < recompute[1] && recompute[1] < none[1]);
    }
}
