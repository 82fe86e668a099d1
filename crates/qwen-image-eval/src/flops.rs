//! FLOPs of the DiT's transformer blocks per denoising step: what a schedule saves, independent of the machine.
//!
//! Two counts of the same model: [`executed_flops`] counts what a step **ran**, from the [`StepStats`] that the
//! denoising loop reports per step (what `qwen-edit eval` reports: a region's tokens are those the edit chose,
//! CFG's negative branch has its own text length, a step that a guardrail ran again counts both runs);
//! [`step_flops`] and [`planned_step_flops`] count what a schedule **plans**, from its plans (a dry run of a
//! schedule that decides from measurements, such as `region`, plans a one-token region: a lower bound).
//!
//! Per block, with `D` the DiT's inner width (`heads × head_dim`):
//!
//! - every **computed** token (text, target, and condition tokens computed or computed and cached) costs its
//!   stream's Q/K/V and output projections and MLP: `(3 + 1) · 2D² + 2 · 2 · D · 4D = 24 D²`;
//! - a token **reused with recomputed K/V** (`/recompute`) costs the K and V projections of its cached input:
//!   `2 · 2D² = 4 D²`; one **reused as cached K/V** costs nothing;
//! - attention costs `4 · q · k · D` (QKᵀ and the weighted sum of V), with `q` the computed tokens (the queries)
//!   and `k` all tokens (the keys: reused tokens included).
//!
//! Left out (the same under every schedule, and small): the timestep embedding and modulation (per sample, not per
//! token), the input and output projections, norms, RoPE and the activations. Planned counts under true CFG count
//! both branches with the prompt's text length.

use qwen_image::dit::DitConfig;
use qwen_image_pipeline::EditReport;
use qwen_image_pruning::{
    dry_run, GroupAction, GroupPlan, ReuseMode, ScheduleFactory, StepPlan, StepStats, TokenLayout,
    TokenSubset,
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

/// FLOPs of the transformer blocks that a DiT call ran, or a step (its calls' stats added up), from its
/// [`StepStats`]: `24·D²` per computed token (text and image), `4·D²` per token whose K/V were recomputed, `4·D`
/// per query–key pair of the attention.
pub fn executed_flops(config: &DitConfig, stats: &StepStats) -> f64 {
    let d = config.inner_dim() as f64;
    let computed = (stats.text_tokens + stats.computed_tokens) as f64;
    24.0 * d * d * computed
        + 4.0 * d * d * stats.recomputed_kv_tokens as f64
        + 4.0 * d * stats.attention_pairs as f64
}

/// The FLOPs per step of the transformer blocks that the edit of `report` ran ([`executed_flops`] of each step),
/// averaged over its steps.
pub fn executed_flops_per_step(config: &DitConfig, report: &EditReport) -> f64 {
    let total: f64 = report.steps.iter().map(|s| executed_flops(config, &s.stats)).sum();
    total / report.steps.len().max(1) as f64
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
    fn executed_and_planned_counts_agree_on_a_full_step_and_on_recomputed_kv() {
        let (d, text, target, cond, layers) = (192.0f64, 10usize, 64usize, 64usize, 6usize);
        let layout = TokenLayout::new(text, target, vec![cond]);
        let all = text + target + cond;
        let full = StepStats {
            computed_tokens: layers * (target + cond),
            text_tokens: layers * text,
            attention_pairs: layers * all * all,
            ..StepStats::default()
        };
        let planned = step_flops(&config(), &layout, &[StepPlan::compute_all(6, 1)], 1)[0];
        assert!((executed_flops(&config(), &full) - planned).abs() / planned < 1e-12);
        // `/recompute` at every block: the condition image is not computed, its K/V are (4·D² per token).
        let recompute = StepStats {
            computed_tokens: layers * target,
            reused_tokens: layers * cond,
            recomputed_kv_tokens: layers * cond,
            text_tokens: layers * text,
            attention_pairs: layers * (text + target) * all,
            ..StepStats::default()
        };
        let kv_only = StepStats { recomputed_kv_tokens: 0, ..recompute };
        let extra = executed_flops(&config(), &recompute) - executed_flops(&config(), &kv_only);
        assert!((extra - 4.0 * d * d * (layers * cond) as f64).abs() < 1e-3, "{extra}");
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
