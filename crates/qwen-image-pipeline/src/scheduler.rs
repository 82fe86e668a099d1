//! The flow-matching Euler scheduler (diffusers' `FlowMatchEulerDiscreteScheduler`) as Qwen-Image-Edit uses it.
//!
//! How to use:
//!
//! ```
//! use qwen_image_pipeline::scheduler::{FlowMatchEulerScheduler, SchedulerConfig};
//!
//! // The base model: the shift depends on the number of noisy tokens (4096 for a 1024² image), and the last σ is
//! // stretched to 0.02.
//! let base = FlowMatchEulerScheduler::new(SchedulerConfig::qwen_image()).unwrap();
//! let s = base.set_timesteps(4, Some(base.mu(4096))).unwrap();
//! assert!((s.sigmas[1] - 0.766709).abs() < 1e-5 && (s.sigmas[3] - 0.02).abs() < 1e-6);
//!
//! // The Lightning LoRAs were distilled with a static shift of 3: σ' = 3σ / (1 + 2σ).
//! let lightning = FlowMatchEulerScheduler::new(SchedulerConfig::lightning()).unwrap();
//! let s = lightning.set_timesteps(4, None).unwrap();
//! assert_eq!(s.sigmas, vec![1.0, 0.9, 0.75, 0.5, 0.0]);
//! ```
//!
//! The config is read from a snapshot's `scheduler/scheduler_config.json` with
//! [`SchedulerConfig::from_file`]; missing keys take diffusers' constructor defaults. All arithmetic mirrors
//! diffusers (numpy float32 after the initial float64 `linspace`), so the σ values are bit-identical.

use std::path::Path;

use burn::tensor::{bf16, f16, DType};
use serde::{Deserialize, Serialize};

use crate::{PipelineError, Result};

/// How the dynamic shift maps σ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeShiftType {
    /// `σ' = e^μ / (e^μ + (1/σ − 1))`.
    Exponential,
    /// `σ' = μ / (μ + (1/σ − 1))`.
    Linear,
}

fn d_base_seq() -> usize {
    256
}
fn d_max_seq() -> usize {
    4096
}
fn d_base_shift() -> f64 {
    0.5
}
fn d_max_shift() -> f64 {
    1.15
}
fn d_train() -> usize {
    1000
}
fn d_shift() -> f64 {
    1.0
}
fn d_shift_type() -> TimeShiftType {
    TimeShiftType::Exponential
}

/// `scheduler/scheduler_config.json`. Unknown keys are ignored; missing keys take the defaults of diffusers'
/// `FlowMatchEulerDiscreteScheduler.__init__`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_flow_match_euler_discrete.py#L92
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// diffusers class name; must be `FlowMatchEulerDiscreteScheduler` when present.
    #[serde(rename = "_class_name", default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Noisy-token count at which μ = `base_shift`.
    #[serde(default = "d_base_seq")]
    pub base_image_seq_len: usize,
    /// Noisy-token count at which μ = `max_shift`.
    #[serde(default = "d_max_seq")]
    pub max_image_seq_len: usize,
    /// μ at `base_image_seq_len`.
    #[serde(default = "d_base_shift")]
    pub base_shift: f64,
    /// μ at `max_image_seq_len`.
    #[serde(default = "d_max_shift")]
    pub max_shift: f64,
    /// Timesteps of training (timestep = 1000·σ).
    #[serde(default = "d_train")]
    pub num_train_timesteps: usize,
    /// Static shift (used only without dynamic shifting).
    #[serde(default = "d_shift")]
    pub shift: f64,
    /// The last σ is stretched to this value (`None`/0 = no stretch).
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    /// Dynamic-shift formula.
    #[serde(default = "d_shift_type")]
    pub time_shift_type: TimeShiftType,
    /// Resolution-dependent shifting with μ.
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    /// Not supported (must be false).
    #[serde(default)]
    pub invert_sigmas: bool,
    /// Not supported (must be false).
    #[serde(default)]
    pub stochastic_sampling: bool,
    /// Not supported (must be false).
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// Not supported (must be false).
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    /// Not supported (must be false).
    #[serde(default)]
    pub use_beta_sigmas: bool,
}

impl Default for SchedulerConfig {
    /// diffusers' constructor defaults.
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl SchedulerConfig {
    /// The config of Qwen-Image / Qwen-Image-Edit (`scheduler/scheduler_config.json` of the hub snapshots):
    /// exponential dynamic shift between (256, 0.5) and (8192, 0.9), last σ stretched to 0.02.
    pub fn qwen_image() -> Self {
        SchedulerConfig {
            class_name: Some("FlowMatchEulerDiscreteScheduler".into()),
            base_image_seq_len: 256,
            max_image_seq_len: 8192,
            base_shift: 0.5,
            max_shift: 0.9,
            shift_terminal: Some(0.02),
            use_dynamic_shifting: true,
            ..Default::default()
        }
    }

    /// The Qwen-Image-Lightning config (ModelTC `generate_with_diffusers.py`): μ = ln 3 at every resolution, i.e.
    /// `σ' = 3σ/(1 + 2σ)`, and no terminal stretch.
    pub fn lightning() -> Self {
        let ln3 = 3f64.ln();
        SchedulerConfig {
            class_name: Some("FlowMatchEulerDiscreteScheduler".into()),
            base_image_seq_len: 256,
            max_image_seq_len: 8192,
            base_shift: ln3,
            max_shift: ln3,
            shift_terminal: None,
            use_dynamic_shifting: true,
            ..Default::default()
        }
    }

    /// Reads and validates `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PipelineError::invalid(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&text)
            .map_err(|e| PipelineError::invalid(format!("scheduler config {}: {e}", path.display())))
    }

    /// Parses and validates a config from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: SchedulerConfig =
            serde_json::from_str(text).map_err(|e| PipelineError::invalid(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the config describes a schedule this crate implements.
    pub fn validate(&self) -> Result<()> {
        if let Some(name) = &self.class_name {
            if name != "FlowMatchEulerDiscreteScheduler" {
                return Err(PipelineError::invalid(format!(
                    "scheduler `{name}` is not supported; expected FlowMatchEulerDiscreteScheduler"
                )));
            }
        }
        let unsupported = [
            ("invert_sigmas", self.invert_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(PipelineError::invalid(format!("scheduler option `{name}` is not supported")));
        }
        if self.max_image_seq_len == self.base_image_seq_len && self.max_shift != self.base_shift {
            return Err(PipelineError::invalid("max_image_seq_len equals base_image_seq_len".to_string()));
        }
        if self.num_train_timesteps == 0 || self.shift.is_nan() || self.shift <= 0.0 {
            return Err(PipelineError::invalid("num_train_timesteps and shift must be positive".to_string()));
        }
        if let Some(t) = self.shift_terminal {
            if !(0.0..1.0).contains(&t) {
                return Err(PipelineError::invalid(format!("shift_terminal {t} must be in [0, 1)")));
            }
        }
        Ok(())
    }
}

/// The σ values and timesteps of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// `num_steps + 1` values of σ; the last is 0.
    pub sigmas: Vec<f32>,
    /// `num_steps` timesteps `1000·σ` (f32), as diffusers' `scheduler.timesteps`.
    pub timesteps: Vec<f32>,
}

impl Schedule {
    /// Number of denoising steps.
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// What the DiT receives at each step for a run in `dtype` (see [`dit_timestep`]).
    pub fn dit_timesteps(&self, dtype: DType, num_train_timesteps: usize) -> Vec<f32> {
        self.timesteps.iter().map(|&t| dit_timestep(t, dtype, num_train_timesteps)).collect()
    }
}

/// `FlowMatchEulerDiscreteScheduler` with a validated config.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_flow_match_euler_discrete.py#L48
#[derive(Clone, Debug, PartialEq)]
pub struct FlowMatchEulerScheduler {
    config: SchedulerConfig,
}

impl FlowMatchEulerScheduler {
    /// A scheduler with `config` (validated).
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.validate()?;
        Ok(FlowMatchEulerScheduler { config })
    }

    /// The configuration (shifts, training timesteps, …), as validated by [`new`](Self::new).
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// μ for `image_seq_len` noisy tokens (diffusers' `calculate_shift` with the config's values; the
    /// condition-image tokens do not count).
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let c = &self.config;
        let m = (c.max_shift - c.base_shift) / (c.max_image_seq_len as f64 - c.base_image_seq_len as f64);
        let m = if m.is_finite() { m } else { 0.0 };
        let b = c.base_shift - m * c.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }

    /// The schedule of `num_steps` steps starting from the pipelines' default σ = `linspace(1, 1/n, n)`.
    ///
    /// `mu` is required with dynamic shifting (use [`mu`](Self::mu)); with a config whose `base_shift` equals
    /// `max_shift` (Lightning) it may be `None`.
    pub fn set_timesteps(&self, num_steps: usize, mu: Option<f64>) -> Result<Schedule> {
        if num_steps == 0 {
            return Err(PipelineError::invalid("the number of steps must be at least 1"));
        }
        self.set_timesteps_with_sigmas(&linspace(1.0, 1.0 / num_steps as f64, num_steps), mu)
    }

    /// The schedule from user-given σ values (before shifting), as `set_timesteps(sigmas=…, mu=…)`.
    pub fn set_timesteps_with_sigmas(&self, sigmas: &[f64], mu: Option<f64>) -> Result<Schedule> {
        let c = &self.config;
        if sigmas.is_empty() {
            return Err(PipelineError::invalid("the number of steps must be at least 1"));
        }
        if sigmas.iter().any(|s| !s.is_finite() || *s <= 0.0 || *s > 1.0) {
            return Err(PipelineError::invalid(format!("sigmas must lie in (0, 1], got {sigmas:?}")));
        }
        let mut s: Vec<f32> = sigmas.iter().map(|&v| v as f32).collect();
        if c.use_dynamic_shifting {
            let mu = match mu {
                Some(mu) => mu,
                None if c.base_shift == c.max_shift => c.base_shift,
                None => return Err(PipelineError::invalid("mu must be given with dynamic shifting")),
            };
            match c.time_shift_type {
                TimeShiftType::Exponential => {
                    let e = mu.exp() as f32;
                    s.iter_mut().for_each(|v| *v = e / (e + (1.0 / *v - 1.0)));
                }
                TimeShiftType::Linear => {
                    let m = mu as f32;
                    s.iter_mut().for_each(|v| *v = m / (m + (1.0 / *v - 1.0)));
                }
            }
        } else {
            let shift = c.shift as f32;
            s.iter_mut().for_each(|v| *v = shift * *v / (1.0 + (shift - 1.0) * *v));
        }
        if let Some(terminal) = c.shift_terminal.filter(|t| *t != 0.0) {
            let last = 1.0 - *s.last().expect("non-empty");
            if last <= 0.0 {
                // diffusers divides 0 by 0 here (a single step, whose σ is 1) and returns NaN.
                return Err(PipelineError::invalid(format!(
                    "the terminal stretch to {terminal} needs a last σ below 1; use at least 2 steps"
                )));
            }
            let scale = last / (1.0 - terminal as f32);
            s.iter_mut().for_each(|v| *v = 1.0 - (1.0 - *v) / scale);
        }
        let train = c.num_train_timesteps as f32;
        let timesteps = s.iter().map(|v| v * train).collect();
        s.push(0.0);
        Ok(Schedule { sigmas: s, timesteps })
    }
}

/// `numpy.linspace(start, stop, n)` in f64 (same rounding: `i·step + start`, last value exactly `stop`).
pub fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = stop;
            v
        }
    }
}

fn round_to(v: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(v).to_f32(),
        DType::F16 => f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// The σ the DiT receives for scheduler timestep `t` in a run whose latents are in `dtype`.
///
/// diffusers casts the timestep to the latents' dtype and divides by 1000 in that dtype:
/// `dtype(dtype(t) / 1000)` (t = 766.709 → 768 → 0.76953125 in bf16). In f32 this is `f32(t) / 1000`, which is
/// not always bit-equal to σ.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py#L814-L818
pub fn dit_timestep(t: f32, dtype: DType, num_train_timesteps: usize) -> f32 {
    round_to(round_to(t, dtype) / num_train_timesteps as f32, dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn reference_tables() {
        // σ of diffusers' `set_timesteps` with the Qwen-Image config and `mu = calculate_shift(4096)`, to 6 decimals:
        // https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_flow_match_euler_discrete.py#L283
        // https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py#L71
        let base = FlowMatchEulerScheduler::new(SchedulerConfig::qwen_image()).unwrap();
        let mu = base.mu(4096);
        assert!((mu - 0.693548).abs() < 1e-6, "{mu}");
        let s4 = base.set_timesteps(4, Some(mu)).unwrap();
        assert!(close(&s4.sigmas, &[1.0, 0.766709, 0.455614, 0.02, 0.0], 1e-6), "{:?}", s4.sigmas);
        let s8 = base.set_timesteps(8, Some(mu)).unwrap();
        let want = [1.0, 0.916024, 0.820046, 0.709295, 0.580075, 0.427347, 0.244054, 0.02, 0.0];
        assert!(close(&s8.sigmas, &want, 1e-6), "{:?}", s8.sigmas);
        let s50 = base.set_timesteps(50, Some(mu)).unwrap();
        assert!(close(&s50.sigmas[..4], &[1.0, 0.989701, 0.979191, 0.968465], 1e-6));
        assert!(
            close(&s50.sigmas[47..], &[0.095499, 0.058476, 0.02, 0.0][..], 1e-6),
            "{:?}",
            &s50.sigmas[47..]
        );

        let light = FlowMatchEulerScheduler::new(SchedulerConfig::lightning()).unwrap();
        let l4 = light.set_timesteps(4, Some(light.mu(4096))).unwrap();
        assert!(close(&l4.sigmas, &[1.0, 0.9, 0.75, 0.5, 0.0], 1e-7));
        assert!(close(&l4.timesteps, &[1000.0, 900.0, 750.0, 500.0], 1e-4));
        // Lightning is resolution independent.
        assert_eq!(light.set_timesteps(4, Some(light.mu(300))).unwrap(), l4);
        let l8 = light.set_timesteps(8, None).unwrap();
        let want = [1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0];
        assert!(close(&l8.sigmas, &want, 1e-6), "{:?}", l8.sigmas);
    }

    #[test]
    fn the_terminal_stretch_and_the_shift_matter() {
        // Guards against silently dropping either part of the base config.
        let mu = 0.693548;
        let mut no_stretch = SchedulerConfig::qwen_image();
        no_stretch.shift_terminal = None;
        let s = FlowMatchEulerScheduler::new(no_stretch).unwrap().set_timesteps(4, Some(mu)).unwrap();
        assert!((s.sigmas[3] - 0.02).abs() > 0.1);
        let mut no_shift = SchedulerConfig::qwen_image();
        no_shift.use_dynamic_shifting = false;
        let s = FlowMatchEulerScheduler::new(no_shift).unwrap().set_timesteps(4, Some(mu)).unwrap();
        assert!((s.sigmas[1] - 0.766709).abs() > 1e-3);
    }

    #[test]
    fn bf16_timestep_quirk() {
        assert_eq!(dit_timestep(766.709, DType::BF16, 1000), 0.76953125);
        assert_eq!(dit_timestep(1000.0, DType::BF16, 1000), 1.0);
        assert_eq!(dit_timestep(750.0, DType::F32, 1000), 0.75);
    }

    #[test]
    fn configs_parse_with_defaults_and_reject_what_is_unsupported() {
        let cfg = SchedulerConfig::from_json(
            r#"{"_class_name":"FlowMatchEulerDiscreteScheduler","_diffusers_version":"0.35.0.dev0",
            "base_image_seq_len":256,"base_shift":0.5,"invert_sigmas":false,"max_image_seq_len":8192,"max_shift":0.9,
            "num_train_timesteps":1000,"shift":1.0,"shift_terminal":0.02,"stochastic_sampling":false,
            "time_shift_type":"exponential","use_beta_sigmas":false,"use_dynamic_shifting":true,
            "use_exponential_sigmas":false,"use_karras_sigmas":false}"#,
        )
        .unwrap();
        assert_eq!(cfg, SchedulerConfig::qwen_image());
        let d = SchedulerConfig::from_json("{}").unwrap();
        assert_eq!((d.max_image_seq_len, d.max_shift, d.use_dynamic_shifting), (4096, 1.15, false));
        assert!(SchedulerConfig::from_json(r#"{"use_karras_sigmas":true}"#).is_err());
        assert!(SchedulerConfig::from_json(r#"{"_class_name":"DDIMScheduler"}"#).is_err());
        assert!(SchedulerConfig::from_json(r#"{"time_shift_type":"cubic"}"#).is_err());
        let base = FlowMatchEulerScheduler::new(SchedulerConfig::qwen_image()).unwrap();
        assert!(base.set_timesteps(0, Some(0.5)).is_err());
        assert!(base.set_timesteps(4, None).is_err(), "base config needs mu");
        assert!(base.set_timesteps(1, Some(0.5)).is_err(), "a single step cannot be stretched");
    }

    #[test]
    fn linspace_matches_numpy() {
        assert_eq!(linspace(1.0, 0.25, 4), vec![1.0, 0.75, 0.5, 0.25]);
        assert_eq!(linspace(1.0, 1.0, 1), vec![1.0]);
    }
}
