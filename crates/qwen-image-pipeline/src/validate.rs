//! Checks of an edit that need no weights, so that a caller (the CLI, a job server) can refuse a bad request before
//! it loads gigabytes: [`EditRequest::validate`] for the request, [`check_schedule`] for the pruning schedule.
//!
//! How to use:
//!
//! ```
//! use qwen_image_pipeline::{check_schedule, EditRequest, Variant};
//! use qwen_image_pruning::ScheduleSpec;
//!
//! let image = qwen_image::processor::RgbImage::new(64, 48);
//! let request = EditRequest::new(vec![image], "Make it purple");
//! request.validate(Variant::Edit).unwrap();
//! let layers = 60; // the DiT's depth: `Snapshot::dit_config()?.num_layers` before loading
//! check_schedule(&"reuse:2,3".parse::<ScheduleSpec>().unwrap(), request.num_steps, layers, 1).unwrap();
//! assert!(check_schedule(&"cat@0-60".parse::<ScheduleSpec>().unwrap(), 4, layers, 1).is_err());
//! ```
//!
//! The pipeline runs the same checks when it edits, the schedule then against the real σ values and token counts.

use qwen_image_pruning::{check_drift_threshold, dry_run, ScheduleFactory, TokenLayout};

use crate::{request::EditRequest, sizes::EditSizes, snapshot::Variant, PipelineError, Result};

/// The most denoising steps a request may ask for.
pub const MAX_STEPS: usize = 1000;

/// The range of a requested output side, in pixels.
pub const OUTPUT_SIDES: std::ops::RangeInclusive<u32> = 16..=8192;

impl EditRequest {
    /// Checks everything about the request that a model of `variant` needs and that can be checked without its
    /// weights: prompt, steps, CFG scale, negative prompt, number and size of the images, output size, areas, and
    /// that the images' aspect ratios give valid sizes ([`EditSizes`]). Supplied noise is checked against the
    /// model's latent channels when the edit runs.
    pub fn validate(&self, variant: Variant) -> Result<()> {
        let invalid = |msg: String| Err(PipelineError::invalid(msg));
        if self.prompt.trim().is_empty() {
            return invalid("the prompt is empty".into());
        }
        if self.num_steps == 0 {
            return invalid("the number of steps must be at least 1".into());
        }
        if self.num_steps > MAX_STEPS {
            return invalid(format!("{} steps is more than {MAX_STEPS}", self.num_steps));
        }
        if !self.true_cfg_scale.is_finite() || self.true_cfg_scale < 0.0 {
            return invalid(format!("the CFG scale {} must be ≥ 0", self.true_cfg_scale));
        }
        if let Err(msg) = self.guardrail.map_or(Ok(()), check_drift_threshold) {
            return invalid(msg);
        }
        if self.negative_prompt.as_deref() == Some("") {
            return invalid("the negative prompt is empty (use \" \" for a blank one)".into());
        }
        let n = self.images.len();
        if n == 0 || n > variant.max_images() {
            return invalid(match variant {
                Variant::Edit => format!("Qwen-Image-Edit takes exactly 1 input image, got {n}"),
                Variant::EditPlus => format!("Qwen-Image-Edit-Plus takes 1 to 3 input images, got {n}"),
            });
        }
        if let Some(img) = self.images.iter().find(|i| i.width() == 0 || i.height() == 0) {
            return invalid(format!("an input image is empty ({}×{})", img.width(), img.height()));
        }
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v.filter(|v| !OUTPUT_SIDES.contains(v)) {
                let (lo, hi) = (OUTPUT_SIDES.start(), OUTPUT_SIDES.end());
                return invalid(format!("{name} {v} must be between {lo} and {hi}"));
            }
        }
        if self.areas.vae < 32 * 32 || self.areas.condition < 32 * 32 {
            return invalid("image areas must be at least 32×32 pixels".into());
        }
        EditSizes::new(self, variant).map(drop)
    }
}

/// Checks `schedule` for a run of `num_steps` steps on a DiT of `num_layers` blocks with `num_images` condition
/// images, before any weights are loaded: it is dry-run ([`dry_run`]) on a representative token layout with evenly
/// spaced σ values, so every structural error (reuse before caching, steps beyond the run, layer ranges beyond the
/// model, unsupported plan parts) is found. Schedules whose plans depend on σ or token counts are checked again
/// with the real values when the edit runs.
pub fn check_schedule(
    schedule: &dyn ScheduleFactory,
    num_steps: usize,
    num_layers: usize,
    num_images: usize,
) -> Result<()> {
    let sigmas: Vec<f32> = (0..=num_steps).map(|i| 1.0 - i as f32 / num_steps.max(1) as f32).collect();
    // Four target tokens, so that a schedule computing a target subset plans a strict one.
    dry_run_each(schedule, &sigmas, num_layers, &[TokenLayout::new(1, 4, vec![4; num_images])])
}

/// Dry-runs a fresh schedule from `schedule` on each of `layouts` (one per CFG branch).
pub(crate) fn dry_run_each(
    schedule: &dyn ScheduleFactory,
    sigmas: &[f32],
    num_layers: usize,
    layouts: &[TokenLayout],
) -> Result<()> {
    for layout in layouts {
        let mut fresh = schedule.build()?;
        dry_run(fresh.as_mut(), sigmas, num_layers, layout)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_image::processor::RgbImage;
    use qwen_image_pruning::ScheduleSpec;

    fn request() -> EditRequest {
        EditRequest::new(vec![RgbImage::new(64, 48)], "x")
    }

    #[test]
    fn bad_requests_are_refused_without_weights() {
        let check = |edit: &dyn Fn(&mut EditRequest), want: &str| {
            let mut r = request();
            edit(&mut r);
            let err = r.validate(Variant::Edit).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        };
        check(&|r| r.prompt = " ".into(), "prompt is empty");
        check(&|r| r.num_steps = 0, "at least 1");
        check(&|r| r.true_cfg_scale = -1.0, "CFG scale");
        check(&|r| r.guardrail = Some(-0.1), "drift threshold");
        check(&|r| r.guardrail = Some(f32::NAN), "drift threshold");
        check(&|r| r.images.push(RgbImage::new(8, 8)), "exactly 1 input image");
        check(&|r| r.width = Some(8), "width 8");
        check(&|r| r.images = vec![RgbImage::new(20_000, 1)], "too extreme");
        assert!(request().validate(Variant::Edit).is_ok());
        let mut three = request();
        three.images = vec![RgbImage::new(8, 8); 3];
        assert!(three.validate(Variant::EditPlus).is_ok() && three.validate(Variant::Edit).is_err());
    }

    #[test]
    fn schedules_are_checked_against_steps_and_layers() {
        let spec = |s: &str| s.parse::<ScheduleSpec>().unwrap();
        assert!(check_schedule(&spec("cat"), 4, 2, 1).is_ok());
        assert!(check_schedule(&spec("reuse:2,5"), 4, 2, 1).unwrap_err().to_string().contains("step 5"));
        assert!(check_schedule(&spec("cat@0-9"), 4, 2, 1).unwrap_err().to_string().contains("layer range"));
        for ok in ["region", "region:0.1,0,3/recompute@0-1", "adaptive:0.2"] {
            check_schedule(&spec(ok), 4, 2, 3).unwrap();
        }
        assert!(check_schedule(&spec("region:0.1,1,5"), 4, 2, 1).unwrap_err().to_string().contains("step 5"));
    }
}
