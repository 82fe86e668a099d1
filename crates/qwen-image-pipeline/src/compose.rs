//! [`RequestSchedule`]: the schedule an edit runs — the caller's factory, fitted to the request's cache budget and
//! guarded by its guardrail.

use qwen_image_pruning::{CacheBudget, Guardrail, PixelMask, PruneError, PruningSchedule, ScheduleFactory};

use crate::{EditRequest, Result};

/// Bytes one cached token takes under `schedule` on a DiT whose tokens take `token_bytes` (`inner_dim · dtype
/// size`): K and V, and its block-input hidden state when the schedule reads it
/// ([`PruningSchedule::needs_cached_hidden_states`]).
pub fn cached_token_bytes(schedule: &dyn ScheduleFactory, token_bytes: u64) -> Result<u64> {
    let parts = if schedule.build()?.needs_cached_hidden_states() { 3 } else { 2 };
    Ok(parts * token_bytes)
}

/// A factory wrapping the caller's: each schedule it builds is fitted to the request's
/// [`cache_budget`](EditRequest::cache_budget) (per CFG branch: the budget divided by the branches) and guarded by
/// its [`guardrail`](EditRequest::guardrail). Used for the dry run and for the run, so both see the same plans.
pub struct RequestSchedule<'a> {
    inner: &'a dyn ScheduleFactory,
    /// Bytes per branch and bytes per cached token.
    budget: Option<(u64, u64)>,
    guardrail: Option<f32>,
}

impl<'a> RequestSchedule<'a> {
    /// The schedule of `req` from `inner`, on a DiT whose cached tokens take `bytes_per_token` each.
    pub fn new(inner: &'a dyn ScheduleFactory, req: &EditRequest, bytes_per_token: u64) -> Self {
        let branches = if req.true_cfg() { 2 } else { 1 };
        RequestSchedule {
            inner,
            budget: req.cache_budget.map(|b| (b / branches, bytes_per_token)),
            guardrail: req.guardrail,
        }
    }
}

impl ScheduleFactory for RequestSchedule<'_> {
    fn build(&self) -> Result<Box<dyn PruningSchedule>, PruneError> {
        let mut schedule = self.inner.build()?;
        if let Some((bytes, per_token)) = self.budget {
            schedule = Box::new(CacheBudget::new(schedule, bytes, per_token)?);
        }
        if let Some(drift) = self.guardrail {
            schedule = Box::new(Guardrail::new(schedule, drift)?);
        }
        Ok(schedule)
    }

    fn output_mask(&self) -> Result<Option<PixelMask>, PruneError> {
        self.inner.output_mask()
    }
}
