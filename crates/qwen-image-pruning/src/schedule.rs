//! The [`PruningSchedule`] trait and the built-in schedules.

use std::collections::BTreeSet;
use std::fmt::Debug;

use crate::{
    GroupAction, LayerPlan, PruneError, ReuseMode, StepPlan, StepStats, TargetSignals, TokenGroup,
    TokenLayout,
};

/// What a schedule knows when it plans a step.
#[derive(Clone, Copy, Debug)]
pub struct StepContext<'a> {
    /// 0-based index of the step: `0` is the first step, `num_steps - 1` the last (a spec's step `n` is index
    /// `n - 1`; see [`PruningSchedule`]).
    pub step: usize,
    /// Number of denoising steps of the run.
    pub num_steps: usize,
    /// σ of this step (the DiT's timestep input), in `[0, 1]`.
    pub sigma: f32,
    /// σ of the next step (0 after the last step).
    pub sigma_next: f32,
    /// Number of transformer blocks of the model.
    pub num_layers: usize,
    /// Token counts of the groups of this call.
    pub layout: &'a TokenLayout,
}

/// What happened at a step, reported back to the schedule by [`PruningSchedule::observe`].
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct StepOutcome {
    /// 0-based index of the step (as [`StepContext::step`]).
    pub step: usize,
    /// The plan that ran.
    pub plan: StepPlan,
    /// Tokens computed and reused and cache entries written, summed over layers (and CFG branches).
    pub stats: StepStats,
    /// Bytes held by the cache after the step.
    pub cache_bytes: usize,
    /// Relative L2 change of the target velocity against the previous step, when the caller measured it.
    pub velocity_change: Option<f32>,
    /// Wall time of the DiT call in seconds, when measured.
    pub seconds: Option<f64>,
    /// Per-token data of the target after the step (x̂₀, the reference condition latent, the token grid), when the
    /// schedule asked for it ([`PruningSchedule::needs_target_signals`]) and the caller measured it.
    pub target: Option<TargetSignals>,
}

impl StepOutcome {
    /// An outcome for `step` that ran `plan`; the other fields start empty.
    pub fn new(step: usize, plan: StepPlan) -> Self {
        StepOutcome { step, plan, ..Default::default() }
    }
}

/// Decides, per step, per layer and per token group, what is computed, cached and reused.
///
/// `plan_step` takes `&mut self`, so a schedule may keep state; [`PruningSchedule::observe`] tells it what the
/// step did (tokens computed and reused, cache size, the change of the prediction) so it can adapt.
///
/// # Step numbering
///
/// In code, steps are **0-based indices**: [`StepContext::step`], [`StepOutcome::step`], the `step` of
/// [`PruneError::CacheMiss`] and of the pipeline's step reports. Where people write steps — the spec grammar
/// (`reuse:2,3,4`), [`ReuseSteps::new`], [`PruneError::StepRange`], error messages and printed tables — they are
/// **1-based numbers**, as users count them. Step number `n` is index `n - 1`: `reuse:2` reuses at the step whose
/// `ctx.step == 1`.
///
/// # Passing a schedule to a pipeline
///
/// Pipelines take a [`ScheduleFactory`](crate::ScheduleFactory), which a `Clone` schedule is: pass
/// `&MySchedule::new()`, or `&from_fn(|| MySchedule::new())` for one that is not `Clone`.
pub trait PruningSchedule: Debug + Send {
    /// The plan of the step described by `ctx`.
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError>;

    /// Called after each step with what happened. The default ignores it.
    fn observe(&mut self, _outcome: &StepOutcome) {}

    /// Reviews a step's outcome before it is committed (before the Euler update; [`StepOutcome::velocity_change`]
    /// is set when measured): a plan returned runs the step again with it (a guardrail's fallback,
    /// [`Guardrail`](crate::Guardrail)), and the step's report says so. The default accepts every step.
    fn review(&mut self, _outcome: &StepOutcome) -> Option<StepPlan> {
        None
    }

    /// Whether [`observe`](Self::observe) needs [`StepOutcome::target`] after the step `step` (0-based): per-token
    /// data copied to the host, which costs a device synchronization. The default is `false`.
    fn needs_target_signals(&self, _step: usize) -> bool {
        false
    }

    /// Whether the entries this schedule caches must hold their block-input hidden states: they are read by a
    /// [`ReuseMode::RecomputeKeyValue`] reuse and when a group is computed at a block after it was reused at an
    /// earlier block of the same step (it is gathered from the cache there). A schedule that does neither may
    /// return `false`: the cache then holds K and V only, a third less. The default is `true`; a wrong `false`
    /// fails the step with [`PruneError::HiddenNotCached`], never a wrong result.
    fn needs_cached_hidden_states(&self) -> bool {
        true
    }

    /// A short human-readable name (used in reports).
    fn name(&self) -> String;
}

impl<S: PruningSchedule + ?Sized> PruningSchedule for Box<S> {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        (**self).plan_step(ctx)
    }
    fn observe(&mut self, outcome: &StepOutcome) {
        (**self).observe(outcome)
    }
    fn needs_target_signals(&self, step: usize) -> bool {
        (**self).needs_target_signals(step)
    }
    fn review(&mut self, outcome: &StepOutcome) -> Option<StepPlan> {
        (**self).review(outcome)
    }
    fn needs_cached_hidden_states(&self) -> bool {
        (**self).needs_cached_hidden_states()
    }
    fn name(&self) -> String {
        (**self).name()
    }
}

/// Computes everything at every step; caches nothing. The baseline.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPruning;

impl PruningSchedule for NoPruning {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        Ok(StepPlan::compute_all(ctx.num_layers, ctx.layout.condition_tokens.len()))
    }
    fn name(&self) -> String {
        "none".into()
    }
}

/// Reuses the condition tokens at the listed steps and computes-and-caches them at all other steps.
///
/// Steps are 1-based, as users count them. A step that reuses must come after a step that caches, so step 1 can
/// never reuse.
#[derive(Clone, Debug)]
pub struct ReuseSteps {
    steps: BTreeSet<usize>,
    mode: ReuseMode,
}

impl ReuseSteps {
    /// Reuse at the given 1-based steps.
    pub fn new(steps: impl IntoIterator<Item = usize>, mode: ReuseMode) -> Result<Self, PruneError> {
        let steps: BTreeSet<usize> = steps.into_iter().collect();
        if steps.contains(&0) {
            return Err(PruneError::InvalidPlan("steps are numbered from 1: there is no step 0".into()));
        }
        if steps.contains(&1) {
            return Err(PruneError::InvalidPlan(
                "step 1 cannot reuse: nothing has been cached before the first step".into(),
            ));
        }
        Ok(ReuseSteps { steps, mode })
    }

    /// The 1-based steps that reuse.
    pub fn steps(&self) -> impl Iterator<Item = usize> + '_ {
        self.steps.iter().copied()
    }

    /// Whether the 0-based step `step` reuses.
    pub fn reuses_at(&self, step: usize) -> bool {
        self.steps.contains(&(step + 1))
    }

    /// Errors if a listed step is beyond the run.
    pub fn check_steps(&self, num_steps: usize) -> Result<(), PruneError> {
        match self.steps.iter().find(|&&s| s > num_steps) {
            Some(&step) => Err(PruneError::StepRange { step, num_steps }),
            None => Ok(()),
        }
    }
}

impl PruningSchedule for ReuseSteps {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        self.check_steps(ctx.num_steps)?;
        let action = if self.reuses_at(ctx.step) {
            GroupAction::Reuse(self.mode)
        } else {
            GroupAction::ComputeAndCache
        };
        let n = ctx.layout.condition_tokens.len();
        Ok(StepPlan::new(vec![LayerPlan::with_conditions(n, action); ctx.num_layers]))
    }
    /// A reuse step reuses the condition at every block: only the recomputing mode reads hidden states.
    fn needs_cached_hidden_states(&self) -> bool {
        self.mode == ReuseMode::RecomputeKeyValue
    }
    fn name(&self) -> String {
        let steps: Vec<String> = self.steps.iter().map(|s| s.to_string()).collect();
        format!("reuse:{}{}", steps.join(","), mode_suffix(self.mode))
    }
}

pub(crate) fn mode_suffix(mode: ReuseMode) -> &'static str {
    match mode {
        ReuseMode::KeyValue => "",
        ReuseMode::RecomputeKeyValue => "/recompute",
    }
}

/// The seed design ("CAT"): compute and cache at odd steps (1, 3, …), reuse at even steps (2, 4, …).
#[derive(Clone, Debug)]
pub struct Cat {
    mode: ReuseMode,
}

impl Cat {
    /// The seed schedule with the given reuse mode.
    pub fn new(mode: ReuseMode) -> Self {
        Cat { mode }
    }
}

impl Default for Cat {
    fn default() -> Self {
        Cat::new(ReuseMode::KeyValue)
    }
}

impl PruningSchedule for Cat {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        let action =
            if ctx.step % 2 == 1 { GroupAction::Reuse(self.mode) } else { GroupAction::ComputeAndCache };
        let n = ctx.layout.condition_tokens.len();
        Ok(StepPlan::new(vec![LayerPlan::with_conditions(n, action); ctx.num_layers]))
    }
    /// A reuse step reuses the condition at every block: only the recomputing mode reads hidden states.
    fn needs_cached_hidden_states(&self) -> bool {
        self.mode == ReuseMode::RecomputeKeyValue
    }
    fn name(&self) -> String {
        format!("cat{}", mode_suffix(self.mode))
    }
}

/// Restricts another schedule's caching and reuse to the blocks `lo..=hi`.
///
/// Outside the range every token is computed. So that a block after the range can compute the condition tokens
/// at a reuse step, the block just after the range is cached (its layer-input hidden states) whenever the inner
/// schedule caches.
#[derive(Clone, Debug)]
pub struct LayerRange<S> {
    inner: S,
    lo: usize,
    hi: usize,
}

impl<S: PruningSchedule> LayerRange<S> {
    /// Restricts `inner` to the inclusive block range `lo..=hi`.
    pub fn new(inner: S, lo: usize, hi: usize) -> Result<Self, PruneError> {
        if lo > hi {
            return Err(PruneError::InvalidPlan(format!("empty layer range {lo}-{hi}")));
        }
        Ok(LayerRange { inner, lo, hi })
    }
}

impl<S: PruningSchedule> PruningSchedule for LayerRange<S> {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        if self.hi >= ctx.num_layers {
            let last = ctx.num_layers.saturating_sub(1);
            return Err(PruneError::LayerRange { lo: self.lo, hi: self.hi, last });
        }
        let mut plan = self.inner.plan_step(ctx)?;
        let caches_in_range = plan.layers[self.lo..=self.hi]
            .iter()
            .any(|l| l.conditions.iter().any(|c| c.action == GroupAction::ComputeAndCache));
        for (layer, lp) in plan.layers.iter_mut().enumerate() {
            if layer >= self.lo && layer <= self.hi {
                continue;
            }
            let keep_cache = layer == self.hi + 1 && caches_in_range;
            for c in &mut lp.conditions {
                let action = if keep_cache { GroupAction::ComputeAndCache } else { GroupAction::Compute };
                *c = action.into();
            }
        }
        Ok(plan)
    }
    fn observe(&mut self, outcome: &StepOutcome) {
        self.inner.observe(outcome)
    }
    fn needs_target_signals(&self, step: usize) -> bool {
        self.inner.needs_target_signals(step)
    }
    fn review(&mut self, outcome: &StepOutcome) -> Option<StepPlan> {
        self.inner.review(outcome)
    }
    fn name(&self) -> String {
        format!("{}@{}-{}", self.inner.name(), self.lo, self.hi)
    }
}

/// Plans every step of a run without tensors and checks that no step reuses what was not cached before.
///
/// `sigmas` has `num_steps + 1` entries (the last is the final σ, usually 0). Returns the plans. The schedule sees
/// [`StepOutcome`]s without measurements; schedules whose plans depend on measured outcomes plan without them (the
/// built-in region schedules then plan a one-token region, so that the subset path is checked).
pub fn dry_run<S: PruningSchedule + ?Sized>(
    schedule: &mut S,
    sigmas: &[f32],
    num_layers: usize,
    layout: &TokenLayout,
) -> Result<Vec<StepPlan>, PruneError> {
    let num_steps = sigmas.len().saturating_sub(1);
    // Per block: whether the target (index 0) and each condition image (index k + 1) are cached, with hidden states.
    let mut cached = vec![vec![None::<bool>; layout.condition_tokens.len() + 1]; num_layers];
    let slot = |group: TokenGroup| match group {
        TokenGroup::Target => Some(0),
        TokenGroup::Condition(k) => Some(k + 1),
        TokenGroup::Text => None,
    };
    let mut plans = Vec::with_capacity(num_steps);
    for step in 0..num_steps {
        let ctx = StepContext {
            step,
            num_steps,
            sigma: sigmas[step],
            sigma_next: sigmas[step + 1],
            num_layers,
            layout,
        };
        let plan = schedule.plan_step(&ctx)?;
        plan.validate_shape(num_layers, layout)?;
        plan.check_cache(step, layout, |layer, group| {
            let hidden = cached[layer][slot(group)?]?;
            Some((layout.group_len(group)?, hidden))
        })?;
        if step == 0 && plan.target_subset(layout.target_tokens).is_some() {
            return Err(PruneError::InvalidPlan(
                "step 1 cannot compute a target subset: no earlier step predicted the other tokens".into(),
            ));
        }
        for (layer, lp) in plan.layers.iter().enumerate() {
            for (group, g) in lp.groups() {
                if let (GroupAction::ComputeAndCache, Some(i)) = (g.action, slot(group)) {
                    cached[layer][i] = Some(true);
                }
            }
        }
        schedule.observe(&StepOutcome::new(step, plan.clone()));
        plans.push(plan);
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TokenGroup;

    const SIGMAS: [f32; 5] = [1.0, 0.9, 0.75, 0.5, 0.0];

    fn layout() -> TokenLayout {
        TokenLayout::new(5, 16, vec![16, 9])
    }

    fn cond_actions(plans: &[StepPlan], layer: usize) -> Vec<GroupAction> {
        plans.iter().map(|p| p.layers[layer].conditions[1].action).collect()
    }

    #[test]
    fn no_pruning_computes_everything() {
        let plans = dry_run(&mut NoPruning, &SIGMAS, 3, &layout()).unwrap();
        assert_eq!(plans.len(), 4);
        assert!(plans.iter().all(|p| *p == StepPlan::compute_all(3, 2)));
    }

    #[test]
    fn only_schedules_that_read_block_inputs_keep_them_cached() {
        assert!(!Cat::default().needs_cached_hidden_states(), "cat reuses K/V at every block");
        assert!(Cat::new(ReuseMode::RecomputeKeyValue).needs_cached_hidden_states());
        assert!(!ReuseSteps::new([2, 3, 4], ReuseMode::KeyValue).unwrap().needs_cached_hidden_states());
        assert!(ReuseSteps::new([2, 4], ReuseMode::RecomputeKeyValue).unwrap().needs_cached_hidden_states());
        // Wrappers forward; a layer range computes after reused blocks, the default (true) stays.
        let boxed: Box<dyn PruningSchedule> = Box::new(Cat::default());
        assert!(!boxed.needs_cached_hidden_states());
        let budget = crate::CacheBudget::new(Cat::default(), 100, 1).unwrap();
        assert!(!budget.needs_cached_hidden_states());
        let guarded = crate::Guardrail::new(Cat::new(ReuseMode::RecomputeKeyValue), 0.1).unwrap();
        assert!(guarded.needs_cached_hidden_states());
        assert!(LayerRange::new(Cat::default(), 1, 2).unwrap().needs_cached_hidden_states());
    }

    #[test]
    fn cat_caches_odd_and_reuses_even_steps() {
        let plans = dry_run(&mut Cat::default(), &SIGMAS, 3, &layout()).unwrap();
        let c = GroupAction::ComputeAndCache;
        let r = GroupAction::Reuse(ReuseMode::KeyValue);
        assert_eq!(cond_actions(&plans, 2), vec![c, r, c, r]);
        assert_eq!(plans[1].layers[0].target.action, GroupAction::Compute);
        assert_eq!(plans[1].layers[0].text.action, GroupAction::Compute);
    }

    #[test]
    fn reuse_steps_are_one_based() {
        let mut s = ReuseSteps::new([2, 3, 4], ReuseMode::RecomputeKeyValue).unwrap();
        let plans = dry_run(&mut s, &SIGMAS, 2, &layout()).unwrap();
        let r = GroupAction::Reuse(ReuseMode::RecomputeKeyValue);
        assert_eq!(cond_actions(&plans, 0), vec![GroupAction::ComputeAndCache, r, r, r]);
        assert_eq!(s.name(), "reuse:2,3,4/recompute");
    }

    #[test]
    fn reuse_at_step_one_or_zero_is_rejected() {
        assert!(matches!(ReuseSteps::new([1, 2], ReuseMode::KeyValue), Err(PruneError::InvalidPlan(_))));
        let err = ReuseSteps::new([0, 2], ReuseMode::KeyValue).unwrap_err().to_string();
        assert!(err.contains("numbered from 1") && !err.contains("1-0"), "{err}");
    }

    #[test]
    fn reuse_beyond_the_run_is_rejected() {
        let mut s = ReuseSteps::new([2, 6], ReuseMode::KeyValue).unwrap();
        let err = dry_run(&mut s, &SIGMAS, 2, &layout()).unwrap_err();
        assert_eq!(err, PruneError::StepRange { step: 6, num_steps: 4 });
    }

    #[test]
    fn layer_range_beyond_the_model_is_rejected() {
        let mut s = LayerRange::new(Cat::default(), 1, 60).unwrap();
        let err = dry_run(&mut s, &SIGMAS, 60, &layout()).unwrap_err();
        assert_eq!(err, PruneError::LayerRange { lo: 1, hi: 60, last: 59 });
        assert!(LayerRange::new(Cat::default(), 5, 4).is_err());
    }

    #[test]
    fn layer_range_computes_outside_and_caches_the_next_block() {
        let mut s = LayerRange::new(Cat::default(), 1, 2).unwrap();
        let plans = dry_run(&mut s, &SIGMAS, 5, &layout()).unwrap();
        let c = GroupAction::ComputeAndCache;
        let r = GroupAction::Reuse(ReuseMode::KeyValue);
        let p = GroupAction::Compute;
        assert_eq!(cond_actions(&plans, 0), vec![p, p, p, p]);
        assert_eq!(cond_actions(&plans, 1), vec![c, r, c, r]);
        assert_eq!(cond_actions(&plans, 2), vec![c, r, c, r]);
        assert_eq!(cond_actions(&plans, 3), vec![c, p, c, p]);
        assert_eq!(cond_actions(&plans, 4), vec![p, p, p, p]);
        assert_eq!(s.name(), "cat@1-2");
    }

    #[derive(Debug)]
    struct ReuseFirst;
    impl PruningSchedule for ReuseFirst {
        fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
            let n = ctx.layout.condition_tokens.len();
            Ok(StepPlan::new(vec![
                LayerPlan::with_conditions(n, GroupAction::Reuse(ReuseMode::KeyValue));
                ctx.num_layers
            ]))
        }
        fn name(&self) -> String {
            "bad".into()
        }
    }

    #[test]
    fn a_user_schedule_reusing_before_caching_is_a_cache_miss() {
        let err = dry_run(&mut ReuseFirst, &SIGMAS, 2, &layout()).unwrap_err();
        assert_eq!(err, PruneError::CacheMiss { step: 0, layer: 0, group: TokenGroup::Condition(0) });
    }

    #[derive(Debug, Default)]
    struct Counting {
        seen: Vec<usize>,
    }
    impl PruningSchedule for Counting {
        fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
            Ok(StepPlan::compute_all(ctx.num_layers, ctx.layout.condition_tokens.len()))
        }
        fn observe(&mut self, outcome: &StepOutcome) {
            self.seen.push(outcome.step);
        }
        fn name(&self) -> String {
            "counting".into()
        }
    }

    #[test]
    fn stateful_schedules_observe_every_step() {
        let mut s = Counting::default();
        dry_run(&mut s, &SIGMAS, 1, &layout()).unwrap();
        assert_eq!(s.seen, vec![0, 1, 2, 3]);
    }
}
