//! [`RequestSchedule`]: the schedule an edit runs — the caller's factory, fitted to the request's cache budget and
//! guarded by its guardrail.

use burn::tensor::DType;
use qwen_image_pruning::{CacheBudget, Guardrail, PixelMask, PruneError, PruningSchedule, ScheduleFactory};

use crate::{EditRequest, Result};

/// Bytes one cached token takes under `schedule` on a DiT of `inner_dim` features in `dtype`: its K and V
/// (`inner_dim` values each in `dtype`, or with `fp8_kv` a byte per value and an f32 scale), and its block-input
/// hidden state in `dtype` when the schedule reads it ([`PruningSchedule::needs_cached_hidden_states`]).
pub fn cached_token_bytes(
    schedule: &dyn ScheduleFactory,
    inner_dim: usize,
    dtype: DType,
    fp8_kv: bool,
) -> Result<u64> {
    let dense = (inner_dim * dtype.size()) as u64;
    let kv = if fp8_kv { inner_dim as u64 + DType::F32.size() as u64 } else { dense };
    let hidden = if schedule.build()?.needs_cached_hidden_states() { dense } else { 0 };
    Ok(2 * kv + hidden)
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
