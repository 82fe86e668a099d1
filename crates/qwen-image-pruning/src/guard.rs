//! [`Guardrail`]: stops reuse from silently ruining an edit, by the drift signal.
//!
//! At a step whose plan reuses anything, the denoising loop asks the schedule to
//! [`review`](PruningSchedule::review) the outcome before the Euler update. The guardrail compares the relative
//! change of the velocity against the previous step ([`StepOutcome::velocity_change`]) with a threshold; past it, it
//! returns a plan that computes and caches everything, the loop runs the step again with it, and the step's report
//! says so. Its cost: nothing while it does not fire (the drift is measured for every step anyway), one full DiT
//! call per step where it fires (counted in that step's time and reported separately).

use crate::{GroupAction, LayerPlan, PruneError, PruningSchedule, StepContext, StepOutcome, StepPlan};

/// Suggested drift threshold of the guardrail (off unless asked for). From the quality benchmark on the trained
/// proxies (docs/quality.md, "Edit regions and adaptive refresh"): on v4, 0.03 brings `region:0.2,1` within issue
/// 12's quality targets (one edit of 120 lost instead of two, −0.35 dB, 51.5 dB against `none`) at 0.64 of `none`'s
/// DiT FLOPs, and `reuse:2,3,4` to 58.1 dB at 0.86; 0.1 barely fires (+0.01 FLOPs, no edit saved), 0.2 and 0.5
/// never do. On the undertrained v3 proxy 0.03 fired at nearly every reuse step (1.06–1.09 of `none`'s FLOPs).
pub const DEFAULT_GUARDRAIL_DRIFT: f32 = 0.03;

/// Wraps a schedule: a reuse step whose velocity changed by more than `max_drift` is run again fully.
#[derive(Clone, Debug)]
pub struct Guardrail<S> {
    inner: S,
    max_drift: f32,
    /// Blocks and condition images of the last plan.
    shape: (usize, usize),
}

impl<S: PruningSchedule> Guardrail<S> {
    /// Guards `inner` with the drift threshold `max_drift` (≥ 0).
    pub fn new(inner: S, max_drift: f32) -> Result<Self, PruneError> {
        check_drift_threshold(max_drift).map_err(PruneError::InvalidPlan)?;
        Ok(Guardrail { inner, max_drift, shape: (0, 0) })
    }
}

/// The rule for a guardrail's drift threshold, a finite number ≥ 0 (checked by [`Guardrail::new`], and by a
/// request's validation before anything runs); the error is the message.
pub fn check_drift_threshold(max_drift: f32) -> Result<(), String> {
    if !max_drift.is_finite() || max_drift < 0.0 {
        return Err(format!("the guardrail's drift threshold {max_drift} must be a number ≥ 0"));
    }
    Ok(())
}

/// Every group of every block computed and cached (the target whole).
pub fn full_cache_plan(num_layers: usize, num_conditions: usize) -> StepPlan {
    let layer = LayerPlan {
        target: GroupAction::ComputeAndCache.into(),
        ..LayerPlan::with_conditions(num_conditions, GroupAction::ComputeAndCache)
    };
    StepPlan::new(vec![layer; num_layers])
}

impl<S: PruningSchedule> PruningSchedule for Guardrail<S> {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        self.shape = (ctx.num_layers, ctx.layout.condition_tokens.len());
        self.inner.plan_step(ctx)
    }

    fn review(&mut self, outcome: &StepOutcome) -> Option<StepPlan> {
        let drift = outcome.velocity_change?;
        if outcome.plan.reuses_anything() && drift > self.max_drift {
            return Some(full_cache_plan(self.shape.0, self.shape.1));
        }
        self.inner.review(outcome)
    }

    fn observe(&mut self, outcome: &StepOutcome) {
        self.inner.observe(outcome)
    }

    fn needs_target_signals(&self, step: usize) -> bool {
        self.inner.needs_target_signals(step)
    }

    /// Its fallback computes everything: the inner schedule decides.
    fn needs_cached_hidden_states(&self) -> bool {
        self.inner.needs_cached_hidden_states()
    }

    fn name(&self) -> String {
        format!("{}+guardrail:{}", self.inner.name(), self.max_drift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cat, TokenLayout};

    #[test]
    fn fires_only_at_reuse_steps_past_the_threshold() {
        let mut g = Guardrail::new(Cat::default(), 0.2).unwrap();
        let layout = TokenLayout::new(2, 4, vec![4]);
        let ctx = |step| StepContext {
            step,
            num_steps: 4,
            sigma: 1.0,
            sigma_next: 0.5,
            num_layers: 2,
            layout: &layout,
        };
        let full = g.plan_step(&ctx(0)).unwrap();
        let mut outcome = StepOutcome::new(0, full);
        outcome.velocity_change = Some(0.9);
        assert!(g.review(&outcome).is_none(), "a step that reuses nothing is not reviewed");
        let reuse = g.plan_step(&ctx(1)).unwrap();
        let mut outcome = StepOutcome::new(1, reuse);
        outcome.velocity_change = Some(0.1);
        assert!(g.review(&outcome).is_none());
        outcome.velocity_change = Some(0.3);
        let fallback = g.review(&outcome).unwrap();
        assert_eq!(fallback, full_cache_plan(2, 1));
        assert!(!fallback.reuses_anything());
        assert_eq!(g.name(), "cat+guardrail:0.2");
        assert!(Guardrail::new(Cat::default(), -1.0).is_err());
    }
}
