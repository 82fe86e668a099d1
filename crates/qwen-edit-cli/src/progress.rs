//! Progress bars (indicatif) for loading and denoising: the CLI's implementation of the pipeline's
//! [`Progress`] trait. Bars go to stderr and are hidden when stderr is not a terminal or with `--quiet`.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qwen_image_pipeline::{Progress, Stage, StepReport};

/// The CLI's progress display.
#[derive(Debug)]
pub struct Bars {
    quiet: bool,
    stage: Option<ProgressBar>,
    steps: Option<ProgressBar>,
}

impl Bars {
    /// Bars, or nothing with `quiet`.
    pub fn new(quiet: bool) -> Self {
        Bars { quiet, stage: None, steps: None }
    }

    fn target(&self) -> ProgressDrawTarget {
        if self.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        }
    }
}

impl Progress for Bars {
    fn stage_started(&mut self, stage: Stage) {
        if stage == Stage::Denoise {
            return;
        }
        let bar = ProgressBar::with_draw_target(None, self.target());
        bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"));
        bar.set_message(stage.label());
        bar.enable_steady_tick(Duration::from_millis(120));
        self.stage = Some(bar);
    }

    fn stage_finished(&mut self, stage: Stage, time: Duration) {
        if let Some(bar) = self.stage.take() {
            bar.finish_with_message(format!("{} ({:.2} s)", stage.label(), time.as_secs_f64()));
            bar.finish_and_clear();
        }
        if stage == Stage::Denoise {
            if let Some(bar) = self.steps.take() {
                bar.finish_and_clear();
            }
        }
    }

    fn denoise_started(&mut self, num_steps: usize) {
        let bar = ProgressBar::with_draw_target(Some(num_steps as u64), self.target());
        bar.set_style(
            ProgressStyle::with_template("denoise [{bar:30}] {pos}/{len} steps {elapsed} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        self.steps = Some(bar);
    }

    fn step_finished(&mut self, report: &StepReport) {
        if let Some(bar) = &self.steps {
            bar.set_message(format!("{} ({:.2} s)", report.plan_summary, report.time.as_secs_f64()));
            bar.inc(1);
        }
    }
}
