//! Edit-region schedules: compute only the target tokens an edit changes, reuse the rest and the condition images.
//!
//! - [`EditRegion`] with [`RegionSource::Estimate`] (`region:THRESHOLD,MARGIN[,REFRESH]`): step 1 computes and caches
//!   everything; from its x̂₀ against the condition latent, the target tokens whose relative change exceeds the
//!   threshold are marked and dilated by the margin; later steps compute only those (plus the text).
//! - [`EditRegion`] with [`RegionSource::Mask`] (`mask:FILE`): the marked tokens come from the user's mask.
//! - [`Adaptive`] (`adaptive:BUDGET`): reuses the condition images and re-caches them when the measured velocity
//!   change exceeds the budget.
//!
//! The tokens not computed keep the velocity of the last step that computed them (see the model's
//! `forward_planned`); for Euler steps this is the same as holding their x̂₀ fixed.

use crate::{
    dilate, GroupAction, GroupPlan, LayerPlan, PixelMask, PruneError, PruningSchedule, ReuseMode,
    StepContext, StepOutcome, StepPlan,
};

/// Default relative change (per-token RMS of x̂₀ − condition over the condition's RMS) above which `region` marks a
/// token. From the quality benchmark on the trained proxies (docs/quality.md, "Edit regions and adaptive refresh"):
/// thresholds 0.02–0.3 give the same success; with a refresh at step 3, 0.1–0.3 are within 0.01 dB of each other;
/// 0.2 runs 0.56 of `none`'s DiT FLOPs (0.69 at 0.02), without a refresh.
pub const DEFAULT_REGION_THRESHOLD: f32 = 0.2;
/// Default dilation margin of the marked region, in tokens (one token = 16×16 output pixels). From the same
/// benchmark: margins 0, 1 and 2 lose the same edits and move the PSNR against the ground truth by 0.05 dB (0.52,
/// 0.56 and 0.61 of `none`'s FLOPs without a refresh); 1 is the middle.
pub const DEFAULT_REGION_MARGIN: usize = 1;
/// Default dilation margin of a user mask, in tokens. From the quality benchmark with each held-out edit's own
/// object mask (docs/quality.md, `mask:heldout`): margin 1 is 0.7 dB closer to the ground truth inside the mask than
/// 0, and 2 only 0.03 dB more than 1 (0.52, 0.55 and 0.59 of `none`'s DiT FLOPs).
pub const DEFAULT_MASK_MARGIN: usize = 1;
/// Default drift budget of `adaptive`: the relative L2 change of the velocity between steps above which the next
/// step re-caches. From the quality benchmark on the trained proxies (docs/quality.md): 0.02 meets issue 12's
/// quality targets at 0.74 of `none`'s DiT FLOPs (v4: −1.7 points, −0.40 dB, 49.7 dB against `none`); 0.03 sits at
/// the PSNR limit on v4 and lost 12.5 points on the undertrained v3, where 0.02 lost none.
pub const DEFAULT_ADAPTIVE_BUDGET: f32 = 0.02;

/// Where an [`EditRegion`] takes its region from.
#[derive(Clone, Debug, PartialEq)]
pub enum RegionSource {
    /// Tokens whose x̂₀ moves away from the condition latent by more than `threshold`
    /// ([`TargetSignals::relative_change`](crate::TargetSignals::relative_change)).
    Estimate {
        /// The relative change above which a token is edited.
        threshold: f32,
    },
    /// The white region of a user mask.
    Mask(PixelMask),
}

/// Computes everything at step 1 (and at an optional refresh step), then only the target tokens of the edit region;
/// the other target tokens and the condition images are reused.
#[derive(Clone, Debug)]
pub struct EditRegion {
    source: RegionSource,
    margin: usize,
    refresh: Option<usize>,
    mode: ReuseMode,
    /// Marked target tokens, from the last full step's signals; `None` before any (a dry run).
    region: Option<Vec<u32>>,
    /// Why no region could be derived, reported at the next plan.
    problem: Option<String>,
}

impl EditRegion {
    /// A region schedule; `refresh` is an optional 1-based step (≥ 2) that computes and re-caches everything and
    /// derives the region again.
    pub fn new(
        source: RegionSource,
        margin: usize,
        refresh: Option<usize>,
        mode: ReuseMode,
    ) -> Result<Self, PruneError> {
        if refresh.is_some_and(|r| r < 2) {
            return Err(PruneError::InvalidPlan("the refresh step of a region schedule is ≥ 2".into()));
        }
        if let RegionSource::Estimate { threshold } = source {
            if !threshold.is_finite() || threshold < 0.0 {
                return Err(PruneError::InvalidPlan(format!("region threshold {threshold} must be ≥ 0")));
            }
        }
        Ok(EditRegion { source, margin, refresh, mode, region: None, problem: None })
    }

    fn full_step(&self, step: usize) -> bool {
        step == 0 || self.refresh == Some(step + 1)
    }
}

/// The plan of a step of a region schedule: everything computed and cached, or the target `region` computed with
/// the rest of the target and the condition images reused in `mode`.
fn region_plan(ctx: &StepContext<'_>, region: Option<&[u32]>, mode: ReuseMode) -> StepPlan {
    let n = ctx.layout.condition_tokens.len();
    let layer = match region {
        None => LayerPlan {
            target: GroupAction::ComputeAndCache.into(),
            ..LayerPlan::with_conditions(n, GroupAction::ComputeAndCache)
        },
        Some(idx) => {
            let mut l = LayerPlan::with_conditions(n, GroupAction::Reuse(mode));
            if idx.len() < ctx.layout.target_tokens {
                l.target = GroupPlan::subset(idx.to_vec(), mode);
            }
            l
        }
    };
    StepPlan::new(vec![layer; ctx.num_layers])
}

impl PruningSchedule for EditRegion {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        if let Some(r) = self.refresh.filter(|&r| r > ctx.num_steps) {
            return Err(PruneError::StepRange { step: r, num_steps: ctx.num_steps });
        }
        if self.full_step(ctx.step) {
            return Ok(region_plan(ctx, None, self.mode));
        }
        if let Some(problem) = &self.problem {
            return Err(PruneError::InvalidPlan(problem.clone()));
        }
        // Without measurements (a dry run) a one-token region, so that the subset path is checked too.
        let region = self.region.clone().unwrap_or_else(|| vec![0]);
        Ok(region_plan(ctx, Some(&region), self.mode))
    }

    fn observe(&mut self, outcome: &StepOutcome) {
        if !self.full_step(outcome.step) {
            return;
        }
        let Some(signals) = &outcome.target else { return };
        let marked = match &self.source {
            RegionSource::Estimate { threshold } => match signals.relative_change() {
                Some(change) => change.iter().map(|&d| d > *threshold).collect::<Vec<bool>>(),
                None => {
                    self.problem = Some(
                        "`region` compares the target with a condition image of the same token grid, and there is \
                         none (use `mask:FILE`)"
                            .into(),
                    );
                    return;
                }
            },
            RegionSource::Mask(mask) => mask.token_mask(signals.grid),
        };
        let mut region = dilate(&marked, signals.grid, self.margin);
        if region.is_empty() {
            // Nothing changes: compute the single most-changed token, so that the step still runs.
            let change = signals.relative_change().unwrap_or_default();
            let top = change.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
            region = vec![top as u32];
        }
        self.region = Some(region);
    }

    fn needs_target_signals(&self, step: usize) -> bool {
        self.full_step(step)
    }

    fn name(&self) -> String {
        let refresh = self.refresh.map(|r| format!(",{r}")).unwrap_or_default();
        let base = match &self.source {
            RegionSource::Estimate { threshold } => format!("region:{threshold},{}{refresh}", self.margin),
            RegionSource::Mask(_) => format!("mask(margin {}{refresh})", self.margin),
        };
        format!("{base}{}", crate::schedule::mode_suffix(self.mode))
    }
}

/// Reuses the condition images at every step after the first, and computes and re-caches them at the step after
/// one whose relative velocity change ([`StepOutcome::velocity_change`]) exceeded the budget.
#[derive(Clone, Debug)]
pub struct Adaptive {
    budget: f32,
    mode: ReuseMode,
    refresh_next: bool,
}

impl Adaptive {
    /// An adaptive schedule with a drift budget (relative L2 change of the velocity between steps).
    pub fn new(budget: f32, mode: ReuseMode) -> Result<Self, PruneError> {
        if !budget.is_finite() || budget < 0.0 {
            return Err(PruneError::InvalidPlan(format!("adaptive budget {budget} must be ≥ 0")));
        }
        Ok(Adaptive { budget, mode, refresh_next: false })
    }
}

impl PruningSchedule for Adaptive {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        let n = ctx.layout.condition_tokens.len();
        let action = if ctx.step == 0 || self.refresh_next {
            GroupAction::ComputeAndCache
        } else {
            GroupAction::Reuse(self.mode)
        };
        Ok(StepPlan::new(vec![LayerPlan::with_conditions(n, action); ctx.num_layers]))
    }

    fn observe(&mut self, outcome: &StepOutcome) {
        self.refresh_next = outcome.velocity_change.is_some_and(|d| d > self.budget);
    }

    fn name(&self) -> String {
        format!("adaptive:{}{}", self.budget, crate::schedule::mode_suffix(self.mode))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dry_run, TargetSignals, TokenLayout, TokenSubset};

    const SIGMAS: [f32; 5] = [1.0, 0.9, 0.75, 0.5, 0.0];

    fn layout() -> TokenLayout {
        TokenLayout::new(3, 16, vec![16])
    }

    fn ctx(step: usize, layout: &TokenLayout) -> StepContext<'_> {
        StepContext {
            step,
            num_steps: 4,
            sigma: SIGMAS[step],
            sigma_next: SIGMAS[step + 1],
            num_layers: 2,
            layout,
        }
    }

    #[test]
    fn region_marks_changed_tokens_with_a_margin() {
        let mut s =
            EditRegion::new(RegionSource::Estimate { threshold: 0.5 }, 1, None, ReuseMode::KeyValue).unwrap();
        let l = layout();
        let first = s.plan_step(&ctx(0, &l)).unwrap();
        assert_eq!(first.layers[0].target.action, GroupAction::ComputeAndCache);
        assert!(s.needs_target_signals(0) && !s.needs_target_signals(1));
        // A 4×4 grid, one channel: token 5 changes.
        let mut x0 = vec![1.0; 16];
        x0[5] = 3.0;
        let mut outcome = StepOutcome::new(0, first);
        outcome.target =
            Some(TargetSignals { grid: (4, 4), channels: 1, x0, reference: Some(vec![1.0; 16]) });
        s.observe(&outcome);
        let plan = s.plan_step(&ctx(1, &l)).unwrap();
        let target = &plan.layers[1].target;
        assert_eq!(target.tokens, TokenSubset::Indices(vec![0, 1, 2, 4, 5, 6, 8, 9, 10]));
        assert_eq!(target.rest, GroupAction::Reuse(ReuseMode::KeyValue));
        assert_eq!(plan.layers[0].conditions[0].action, GroupAction::Reuse(ReuseMode::KeyValue));
        assert_eq!(s.name(), "region:0.5,1");
    }

    #[test]
    fn region_without_a_reference_is_an_error_and_the_dry_run_checks_subsets() {
        let mut s =
            EditRegion::new(RegionSource::Estimate { threshold: 0.5 }, 0, Some(3), ReuseMode::KeyValue)
                .unwrap();
        let plans = dry_run(&mut s.clone(), &SIGMAS, 2, &layout()).unwrap();
        assert_eq!(plans[1].target_subset(16), Some(&[0][..]));
        assert_eq!(plans[2].layers[0].target.action, GroupAction::ComputeAndCache);
        let first = s.plan_step(&ctx(0, &layout())).unwrap();
        let mut outcome = StepOutcome::new(0, first);
        outcome.target =
            Some(TargetSignals { grid: (4, 4), channels: 1, x0: vec![0.0; 16], reference: None });
        s.observe(&outcome);
        assert!(s.plan_step(&ctx(1, &layout())).unwrap_err().to_string().contains("same token grid"));
        assert!(EditRegion::new(RegionSource::Estimate { threshold: 0.1 }, 0, Some(1), ReuseMode::KeyValue)
            .is_err());
        let mut late =
            EditRegion::new(RegionSource::Estimate { threshold: 0.1 }, 0, Some(6), ReuseMode::KeyValue)
                .unwrap();
        assert!(matches!(
            dry_run(&mut late, &SIGMAS, 2, &layout()),
            Err(PruneError::StepRange { step: 6, .. })
        ));
    }

    #[test]
    fn adaptive_refreshes_after_drift_above_the_budget() {
        let mut s = Adaptive::new(0.1, ReuseMode::KeyValue).unwrap();
        let l = layout();
        let actions: Vec<GroupAction> = [None, Some(0.05), Some(0.3), Some(0.01)]
            .into_iter()
            .enumerate()
            .map(|(step, drift)| {
                let plan = s.plan_step(&ctx(step, &l)).unwrap();
                let action = plan.layers[0].conditions[0].action;
                let mut outcome = StepOutcome::new(step, plan);
                outcome.velocity_change = drift;
                s.observe(&outcome);
                action
            })
            .collect();
        let (c, r) = (GroupAction::ComputeAndCache, GroupAction::Reuse(ReuseMode::KeyValue));
        assert_eq!(actions, vec![c, r, r, c]);
        assert_eq!(s.name(), "adaptive:0.1");
    }
}
