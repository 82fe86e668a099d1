//! [`TargetSignals`]: per-token data of the target after a step, for schedules that decide which tokens to compute.

use serde::{Deserialize, Serialize};

/// Per-token data of the target after a step, handed to [`PruningSchedule::observe`](crate::PruningSchedule::observe)
/// in [`StepOutcome::target`](crate::StepOutcome::target) when the schedule asks for it
/// ([`PruningSchedule::needs_target_signals`](crate::PruningSchedule::needs_target_signals)).
///
/// Tensors are flattened row-major as `[tokens, channels]` (batch item 0), tokens in the target's grid order (row by
/// row); all values are f32 on the host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetSignals {
    /// The target's token grid, `(rows, columns)`: `rows · columns` tokens.
    pub grid: (usize, usize),
    /// Channels per token (packed latent channels).
    pub channels: usize,
    /// The clean latent predicted at this step, `x̂₀ = x_t − σ·v` (flow matching), `[tokens, channels]`.
    pub x0: Vec<f32>,
    /// The packed latent of the condition image the target is compared with — the last condition image with the
    /// target's grid — `[tokens, channels]`; `None` when no condition image has the target's grid.
    pub reference: Option<Vec<f32>>,
}

impl TargetSignals {
    /// Number of target tokens.
    pub fn tokens(&self) -> usize {
        self.grid.0 * self.grid.1
    }

    /// Per token, the RMS over channels of `x̂₀ − reference`, divided by the RMS of the whole reference: how much
    /// the step's prediction moves each token away from the condition image, relative to the latent's scale.
    /// `None` without a reference or when the lengths do not match the grid.
    pub fn relative_change(&self) -> Option<Vec<f32>> {
        let reference = self.reference.as_ref()?;
        let (n, c) = (self.tokens(), self.channels);
        if c == 0 || self.x0.len() != n * c || reference.len() != n * c {
            return None;
        }
        let scale = (reference.iter().map(|v| v * v).sum::<f32>() / (n * c) as f32).sqrt().max(f32::EPSILON);
        let rows = self.x0.chunks(c).zip(reference.chunks(c));
        Some(
            rows.map(|(x, r)| {
                let mse = x.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / c as f32;
                mse.sqrt() / scale
            })
            .collect(),
        )
    }
}

/// Grows a token mask on a `(rows, columns)` grid by `margin` tokens in every direction (a square dilation:
/// Chebyshev distance ≤ `margin`). Returns the indices of the set tokens, strictly increasing.
pub fn dilate(mask: &[bool], grid: (usize, usize), margin: usize) -> Vec<u32> {
    let (h, w) = grid;
    let mut out = vec![false; h * w];
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let (r, c) = (i / w.max(1), i % w.max(1));
        for rr in r.saturating_sub(margin)..=(r + margin).min(h.saturating_sub(1)) {
            for cc in c.saturating_sub(margin)..=(c + margin).min(w.saturating_sub(1)) {
                out[rr * w + cc] = true;
            }
        }
    }
    out.iter().enumerate().filter(|(_, &m)| m).map(|(i, _)| i as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_change_is_per_token_rms_over_the_reference_scale() {
        let s = TargetSignals {
            grid: (1, 2),
            channels: 2,
            x0: vec![1.0, 1.0, 1.0, 3.0],
            reference: Some(vec![1.0, 1.0, 1.0, 1.0]),
        };
        let d = s.relative_change().unwrap();
        assert_eq!(d[0], 0.0);
        assert!((d[1] - 2.0f32.sqrt()).abs() < 1e-6);
        assert!(TargetSignals { reference: None, ..s }.relative_change().is_none());
    }

    #[test]
    fn dilation_grows_by_the_margin_and_stays_in_the_grid() {
        let mut mask = vec![false; 16];
        mask[5] = true; // row 1, column 1 of a 4×4 grid
        assert_eq!(dilate(&mask, (4, 4), 0), vec![5]);
        assert_eq!(dilate(&mask, (4, 4), 1), vec![0, 1, 2, 4, 5, 6, 8, 9, 10]);
        mask[5] = false;
        mask[15] = true;
        assert_eq!(dilate(&mask, (4, 4), 1), vec![10, 11, 14, 15]);
    }
}
