//! [`MemoryFit`]: whether a request's [memory plan](crate::memory_plan) fits the device memory that is free, and
//! what the smaller memory modes would need instead. Checked before loading, an edit that cannot fit is refused with
//! a way out (e.g. a 24 GB card: the default bf16 mode needs ≈ 48 GiB at 1024², `--low-memory` ≈ 19 GiB) instead of
//! failing for lack of memory after minutes of loading.
//!
//! The plan is an estimate: on an H100 the driver's peak measured 1–3 GiB above it in the pooled modes (burn's pool
//! keeps pages) and ≈ 0.8 GiB below it under `--low-memory` (docs/memory.md). So a plan above the free memory is a
//! refusal, and one within [`TIGHT_FRACTION`] of it a warning.

use qwen_image::quant::Fp8Options;
use qwen_image_pruning::ScheduleFactory;
use serde::Serialize;

use crate::{memory_plan::plan_request, EditRequest, LoadOptions, MemoryMode, MemoryPlan, Result, Snapshot};

/// A plan above this fraction of the free memory is tight: the pooled modes' measured peaks ran up to 3 GiB over
/// their plans.
pub const TIGHT_FRACTION: f64 = 0.9;

/// A memory mode that needs less than the one asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SmallerMode {
    /// FP8 weights for the DiT and the text encoder ([`LoadOptions::fp8`], [`LoadOptions::fp8_text_encoder`]).
    Fp8,
    /// The same with the pruning cache's K and V in 8 bits ([`Fp8Options::cache`]).
    Fp8Cache,
    /// [`MemoryMode::Low`].
    LowMemory,
}

/// One request's plan against the free device memory.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryFit {
    /// The plan's predicted peak under the options asked for.
    pub peak_bytes: u64,
    /// Free device memory the plan is held against.
    pub available_bytes: u64,
    /// The smaller modes (not already asked for) and their predicted peaks, smallest need last.
    pub smaller: Vec<(SmallerMode, u64)>,
}

impl MemoryFit {
    /// `plan`, the [plan](plan_request) of `req` under `schedule` with `options` on `snapshot`, against
    /// `available_bytes`, and the plans of the smaller modes when it does not fit comfortably (they are not computed
    /// otherwise).
    pub fn check(
        plan: &MemoryPlan,
        snapshot: &Snapshot,
        req: &EditRequest,
        schedule: &dyn ScheduleFactory,
        options: &LoadOptions,
        available_bytes: u64,
    ) -> Result<Self> {
        let mut fit = MemoryFit { peak_bytes: plan.peak_bytes, available_bytes, smaller: Vec::new() };
        if fit.comfortable() {
            return Ok(fit);
        }
        if options.fp8.is_none() && options.memory != MemoryMode::Low {
            let fp8 =
                LoadOptions { fp8: Some(Fp8Options::default()), fp8_text_encoder: true, ..options.clone() };
            fit.smaller.push((SmallerMode::Fp8, plan_request(snapshot, req, schedule, &fp8)?.peak_bytes));
        }
        if options.memory != MemoryMode::Low && !options.fp8.as_ref().is_some_and(|o| o.cache) {
            let fp8 = options.fp8.clone().unwrap_or_default();
            let cached = LoadOptions {
                fp8: Some(Fp8Options { cache: true, ..fp8 }),
                fp8_text_encoder: true,
                ..options.clone()
            };
            let peak = plan_request(snapshot, req, schedule, &cached)?.peak_bytes;
            fit.smaller.push((SmallerMode::Fp8Cache, peak));
        }
        if options.memory != MemoryMode::Low {
            let low = LoadOptions { memory: MemoryMode::Low, ..options.clone() };
            fit.smaller
                .push((SmallerMode::LowMemory, plan_request(snapshot, req, schedule, &low)?.peak_bytes));
        }
        Ok(fit)
    }

    /// Whether the predicted peak is within the free memory.
    pub fn fits(&self) -> bool {
        self.peak_bytes <= self.available_bytes
    }

    /// Whether it fits with room to spare (at most [`TIGHT_FRACTION`] of the free memory).
    pub fn comfortable(&self) -> bool {
        self.peak_bytes as f64 <= TIGHT_FRACTION * self.available_bytes as f64
    }

    /// The smaller modes whose plans fit.
    pub fn fitting_modes(&self) -> impl Iterator<Item = (SmallerMode, u64)> + '_ {
        self.smaller.iter().copied().filter(|&(_, peak)| peak <= self.available_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_fits_is_tight_or_does_not_fit() {
        let fit =
            |peak, available| MemoryFit { peak_bytes: peak, available_bytes: available, smaller: vec![] };
        assert!(fit(80, 100).fits() && fit(80, 100).comfortable());
        assert!(fit(95, 100).fits() && !fit(95, 100).comfortable());
        assert!(!fit(101, 100).fits());
        let f = MemoryFit {
            peak_bytes: 50,
            available_bytes: 24,
            smaller: vec![(SmallerMode::Fp8, 30), (SmallerMode::LowMemory, 19)],
        };
        assert_eq!(f.fitting_modes().collect::<Vec<_>>(), vec![(SmallerMode::LowMemory, 19)]);
    }
}
