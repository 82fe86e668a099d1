//! A user-written pruning schedule, run through the pipeline on the built-in demo model (random weights).
//!
//! ```text
//! cargo run --release --example custom_schedule
//! ```
//!
//! `DriftRefresh` caches the condition tokens at the first step and reuses their K/V afterwards, but only in the
//! second half of the network, and recomputes (refreshes the cache) as soon as the prediction changed by more than
//! a threshold at the previous step. It uses both halves of the [`PruningSchedule`] trait: `plan_step` decides,
//! `observe` sees what each step did. It is `Clone`, so the pipeline takes it as it is (`&DriftRefresh::new(0.5)`)
//! and runs a fresh clone for each use; a schedule that cannot be cloned is passed as
//! `&qwen_image_pruning::from_fn(|| MySchedule::new())`.

use qwen_image::CpuBackend;
use qwen_image_pipeline::{demo, metrics, EditRequest, LoadOptions, NoProgress, QwenImageEditPipeline};
use qwen_image_pruning::{
    GroupAction, LayerPlan, PruneError, PruningSchedule, ReuseMode, ScheduleSpec, StepContext, StepOutcome,
    StepPlan,
};

#[derive(Clone, Debug)]
struct DriftRefresh {
    threshold: f32,
    last_change: Option<f32>,
}

impl DriftRefresh {
    /// Refreshes when the velocity changed by more than `threshold` (relative L2) at the previous step.
    fn new(threshold: f32) -> Self {
        DriftRefresh { threshold, last_change: None }
    }
}

impl PruningSchedule for DriftRefresh {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        // `ctx.step` is 0-based: 0 is the first step (step 1 in specs and printed tables).
        let refresh = ctx.step == 0 || self.last_change.is_some_and(|c| c > self.threshold);
        let n = ctx.layout.condition_tokens.len();
        let layers = (0..ctx.num_layers)
            .map(|layer| {
                let deep = layer >= ctx.num_layers / 2;
                let action = match (refresh, deep) {
                    (true, _) => GroupAction::ComputeAndCache,
                    (false, true) => GroupAction::Reuse(ReuseMode::KeyValue),
                    // Shallow layers compute; the first deep layer after a reuse reads its input from the cache.
                    (false, false) => GroupAction::Compute,
                };
                LayerPlan::with_conditions(n, action)
            })
            .collect();
        Ok(StepPlan::new(layers))
    }

    fn observe(&mut self, outcome: &StepOutcome) {
        self.last_change = outcome.velocity_change;
    }

    fn name(&self) -> String {
        format!("drift-refresh>{}", self.threshold)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("Built-in demo model: RANDOM WEIGHTS (this shows the mechanics, not edit quality).");
    let dir = std::env::temp_dir().join(format!("qwen-custom-schedule-{}", std::process::id()));
    let model = demo::write_demo_snapshot(&dir)?;
    let mut pipe = QwenImageEditPipeline::<CpuBackend>::load(
        model.to_str().ok_or("path")?,
        &LoadOptions::default(),
        &Default::default(),
        &mut NoProgress,
    )?;
    let mut request = EditRequest::new(vec![demo::sample_image()?], "Make it purple");
    request.areas = demo::demo_areas();
    request.num_steps = 6;

    let baseline = pipe.edit(&request, &ScheduleSpec::None, &mut NoProgress)?;
    // The pipeline builds fresh clones: one to check the schedule (dry run), another to run it.
    let custom = pipe.edit(&request, &DriftRefresh::new(0.5), &mut NoProgress)?;
    for s in &custom.report.steps {
        println!(
            "step {}: {} (velocity change {:?}), reused {} tokens",
            s.step + 1,
            s.plan_summary,
            s.velocity_change,
            s.stats.reused_tokens
        );
    }
    let (w, h) = baseline.image.dimensions();
    let psnr = metrics::psnr(baseline.image.as_raw(), custom.image.as_raw())?;
    let ssim = metrics::ssim(baseline.image.as_raw(), custom.image.as_raw(), w as usize, h as usize, 3)?;
    println!(
        "{}: denoise {:.4} s vs baseline {:.4} s; PSNR {psnr:.2} dB, SSIM {ssim:.4} against the baseline",
        custom.report.schedule,
        custom.report.stage_seconds(qwen_image_pipeline::Stage::Denoise),
        baseline.report.stage_seconds(qwen_image_pipeline::Stage::Denoise)
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
