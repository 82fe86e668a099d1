//! Pruning schedules and the condition-token cache for Qwen-Image-Edit.
//!
//! The DiT's image stream is `[target tokens ; condition image 1 ; condition image 2 ; …]`. At every
//! denoising step and every layer, a [`PruningSchedule`] decides for each [`TokenGroup`] whether its tokens are
//! computed, computed and cached, or reused from the [`TokenPruningCache`]. Reusing a condition image means that
//! its tokens cost nothing at that layer (no modulation, Q/K/V, attention output or MLP): the other tokens attend
//! to the keys and values that were cached at an earlier step.
//!
//! This crate knows nothing about the model: plans are plain data ([`StepPlan`], [`LayerPlan`], [`GroupPlan`]) and
//! the cache is a map of tensors. The model crate reads the plan and fills the cache.
//!
//! # Writing a schedule
//!
//! A schedule is any type implementing [`PruningSchedule`]. This one computes and caches everything at the steps
//! with an even index (steps 1, 3, … as people count them: [`StepContext::step`] is 0-based, spec step numbers are
//! 1-based) and reuses the condition tokens' K/V at the others, but only in the second half of the network:
//!
//! ```
//! use qwen_image_pruning::{
//!     GroupAction, LayerPlan, PruneError, PruningSchedule, ReuseMode, StepContext, StepPlan,
//! };
//!
//! #[derive(Clone, Debug)]
//! struct OddStepsDeepLayers;
//!
//! impl PruningSchedule for OddStepsDeepLayers {
//!     fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
//!         let n = ctx.layout.condition_tokens.len();
//!         let layers = (0..ctx.num_layers)
//!             .map(|layer| {
//!                 let action = match (ctx.step % 2, layer >= ctx.num_layers / 2) {
//!                     (0, _) => GroupAction::ComputeAndCache,
//!                     (_, true) => GroupAction::Reuse(ReuseMode::KeyValue),
//!                     (_, false) => GroupAction::Compute,
//!                 };
//!                 LayerPlan::with_conditions(n, action)
//!             })
//!             .collect();
//!         Ok(StepPlan::new(layers))
//!     }
//!
//!     fn name(&self) -> String {
//!         "odd-steps-deep-layers".into()
//!     }
//! }
//!
//! // Check it like any other schedule: it never reuses what it has not cached.
//! let layout = qwen_image_pruning::TokenLayout::new(8, 16, vec![16]);
//! let plans = qwen_image_pruning::dry_run(&mut OddStepsDeepLayers, &[1.0, 0.9, 0.75, 0.5, 0.0], 4, &layout);
//! assert!(plans.is_ok());
//! ```
//!
//! A pipeline takes a [`ScheduleFactory`], which builds a fresh schedule for every run: a [`ScheduleSpec`], any
//! `Clone` schedule (`&OddStepsDeepLayers` above), or a closure wrapped in [`from_fn`].

mod budget;
mod cache;
mod error;
mod factory;
mod guard;
mod mask;
mod plan;
mod region;
mod schedule;
mod signals;
mod spec;
mod stats;
mod subset;

pub use budget::{parse_bytes, BudgetFit, CacheBudget};
pub use cache::{CacheStats, CachedCondition, CachedKv, TokenPruningCache};
pub use error::PruneError;
pub use factory::{from_fn, FromFn, ScheduleFactory};
pub use guard::{check_drift_threshold, full_cache_plan, Guardrail, DEFAULT_GUARDRAIL_DRIFT};
pub use mask::PixelMask;
pub use plan::{
    GroupAction, GroupPlan, LayerPlan, ReuseMode, StepPlan, TokenGroup, TokenLayout, TokenSubset,
};
pub use region::{
    Adaptive, EditRegion, RegionSource, DEFAULT_ADAPTIVE_BUDGET, DEFAULT_MASK_MARGIN, DEFAULT_REGION_MARGIN,
    DEFAULT_REGION_THRESHOLD,
};
pub use schedule::{
    dry_run, Cat, LayerRange, NoPruning, PruningSchedule, ReuseSteps, StepContext, StepOutcome,
};
pub use signals::{dilate, TargetSignals};
pub use spec::ScheduleSpec;
pub use stats::StepStats;
