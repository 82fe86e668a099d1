//! The denoising loop: flow-matching Euler steps of the DiT under a pruning schedule, with optional true CFG.

use std::time::Instant;

use burn::tensor::{backend::Backend, Bool, DType, Tensor};
use qwen_image::{
    dit::{DitInput, ImageShape, ModulationMode, ModulationTable, QwenImageTransformer},
    ops::QwenBackend,
};
use qwen_image_pruning::{
    PruningSchedule, StepContext, StepOutcome, StepPlan, StepStats, TokenLayout, TokenPruningCache,
};

use crate::{
    progress::sync,
    region::target_signals,
    report::{GuardrailEvent, StepReport},
    PipelineError, Result,
};

/// Text conditioning of one branch (prompt or negative prompt).
#[derive(Clone, Debug)]
pub struct TextConditioning<B: Backend> {
    /// `[1, text_tokens, joint_attention_dim]`.
    pub embeds: Tensor<B, 3>,
    /// `[1, text_tokens]`, `true` = valid; `None` when every token is valid.
    pub mask: Option<Tensor<B, 2, Bool>>,
}

/// Everything the loop needs besides the model and the schedule.
#[derive(Clone, Debug)]
pub struct DenoiseInputs<B: Backend> {
    /// Initial noise, packed: `[1, target_tokens, in_channels]`.
    pub latents: Tensor<B, 3>,
    /// Packed condition-image latents, all images concatenated: `[1, condition_tokens, in_channels]`.
    pub image_latents: Tensor<B, 3>,
    /// The prompt.
    pub prompt: TextConditioning<B>,
    /// The negative prompt; with `cfg_scale > 1` the loop runs true CFG.
    pub negative: Option<TextConditioning<B>>,
    /// True-CFG scale; CFG runs only when it is > 1 and a negative prompt is given.
    pub cfg_scale: f32,
    /// Token grids: the target first, then each condition image.
    pub img_shapes: Vec<ImageShape>,
    /// `num_steps + 1` values of σ (the last one usually 0); the Euler update is `x += (σ_{i+1} − σ_i)·v`.
    pub sigmas: Vec<f32>,
    /// The timestep fed to the DiT at each step (`num_steps` values): σ itself, or σ as the pipeline rounds it.
    pub timesteps: Vec<f32>,
    /// The DiT's modulation rows, kept across runs by the caller ([`QwenImageTransformer::extend_modulation_table`]).
    /// The rows of timesteps it lacks are computed before the first step (into a copy: extend the table beforehand
    /// to keep them); without a table, a model in table mode gets one for this run, and a model in resident mode
    /// computes its rows in every forward pass.
    pub modulation: Option<ModulationTable<B>>,
}

/// The pruning caches of one denoising run: one per CFG branch (the branches see different text, so their
/// condition tokens' K/V differ).
#[derive(Clone, Debug, Default)]
pub struct DenoiseCaches<B: Backend> {
    /// Cache of the prompt branch.
    pub prompt: TokenPruningCache<B>,
    /// Cache of the negative-prompt branch.
    pub negative: TokenPruningCache<B>,
}

impl<B: Backend> DenoiseCaches<B> {
    /// Drops every entry of both caches.
    pub fn clear(&mut self) {
        self.prompt.clear();
        self.negative.clear();
    }

    /// Bytes held by both caches.
    pub fn size_bytes(&self) -> usize {
        self.prompt.size_bytes() + self.negative.size_bytes()
    }
}

fn summarize(plan: &StepPlan, layout: &TokenLayout) -> String {
    use qwen_image_pruning::GroupAction::*;
    let (mut c, mut s, mut r) = (0, 0, 0);
    for l in &plan.layers {
        for g in &l.conditions {
            match g.action {
                Compute => c += 1,
                ComputeAndCache => s += 1,
                Reuse(_) => r += 1,
            }
        }
    }
    let target = match plan.target_subset(layout.target_tokens) {
        Some(idx) => format!(", target {}/{} tokens", idx.len(), layout.target_tokens),
        None => String::new(),
    };
    format!("compute {c}, cache {s}, reuse {r}{target}")
}

fn rel_change<B: Backend>(a: &Tensor<B, 3>, b: &Tensor<B, 3>) -> f32 {
    let a = a.clone().cast(DType::F32);
    let b = b.clone().cast(DType::F32);
    let num: f32 = (a - b.clone()).square().sum().into_scalar().to_f32();
    let den: f32 = b.square().sum().into_scalar().to_f32();
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    }
}

trait ToF32 {
    fn to_f32(self) -> f32;
}
impl<E: burn::tensor::ElementConversion> ToF32 for E {
    fn to_f32(self) -> f32 {
        self.elem::<f32>()
    }
}

/// True CFG with per-token norm rescaling: `comb = neg + s·(cond − neg)`, rescaled so that each token's L2 norm over
/// the channels equals the conditional prediction's
/// ([diffusers](https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L797-L801)).
pub fn true_cfg<B: Backend>(cond: Tensor<B, 3>, neg: Tensor<B, 3>, scale: f32) -> Tensor<B, 3> {
    let comb = neg.clone() + (cond.clone() - neg) * scale;
    let norm = |t: Tensor<B, 3>| t.square().sum_dim(2).sqrt();
    let (cond_norm, comb_norm) = (norm(cond), norm(comb.clone()));
    comb * (cond_norm / comb_norm)
}

/// Runs the Euler loop. Returns the final latents `[1, target_tokens, channels]` (in the model dtype) and one
/// report per step; `on_step` sees each report as soon as the step ends.
pub fn denoise<B: QwenBackend>(
    model: &QwenImageTransformer<B>,
    inputs: &DenoiseInputs<B>,
    schedule: &mut dyn PruningSchedule,
    caches: &mut DenoiseCaches<B>,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<(Tensor<B, 3>, Vec<StepReport>)> {
    denoise_with(model, inputs, schedule, caches, &mut |r| {
        on_step(r);
        Ok(())
    })
}

/// [`denoise`] whose `on_step` may stop the loop after any step by returning an error (e.g.
/// [`PipelineError::Cancelled`]), which the loop returns.
pub fn denoise_with<B: QwenBackend>(
    model: &QwenImageTransformer<B>,
    inputs: &DenoiseInputs<B>,
    schedule: &mut dyn PruningSchedule,
    caches: &mut DenoiseCaches<B>,
    on_step: &mut dyn FnMut(&StepReport) -> Result<()>,
) -> Result<(Tensor<B, 3>, Vec<StepReport>)> {
    let run = DenoiseRun::new(model, inputs)?;
    // K and V only when the schedule never reads the hidden states (a third less cache).
    let hidden = schedule.needs_cached_hidden_states();
    caches.prompt.keep_hidden_states(hidden);
    caches.negative.keep_hidden_states(hidden);
    let mut x = inputs.latents.clone().cast(model.dtype());
    let mut last_v: Option<Tensor<B, 3>> = None;
    let mut reports = Vec::with_capacity(run.num_steps);
    for step in 0..run.num_steps {
        let (next, v, report) = run.step(step, x, last_v.as_ref(), schedule, caches)?;
        (x, last_v) = (next, Some(v));
        on_step(&report)?;
        reports.push(report);
    }
    Ok((x, reports))
}

/// Checks that there are `num_steps + 1` σ values (`num_steps` ≥ 1) and `num_steps` timesteps; returns `num_steps`.
fn checked_num_steps<B: Backend>(inputs: &DenoiseInputs<B>) -> Result<usize> {
    let num_steps = inputs.sigmas.len().saturating_sub(1);
    if num_steps == 0 || inputs.timesteps.len() != num_steps {
        return Err(PipelineError::invalid(format!(
            "{} sigmas and {} timesteps: need num_steps + 1 sigmas (num_steps ≥ 1) and num_steps timesteps",
            inputs.sigmas.len(),
            inputs.timesteps.len()
        )));
    }
    Ok(num_steps)
}

/// The modulation rows of every step: the caller's table extended with the rows of the timesteps it lacks (or a
/// new table); `None` for a model in resident mode without a table (it computes its rows in every forward pass).
fn step_modulation<B: QwenBackend>(
    model: &QwenImageTransformer<B>,
    inputs: &DenoiseInputs<B>,
) -> Result<Option<ModulationTable<B>>> {
    // The prompt and the negative prompt share the rows: they depend on the timestep only.
    match (&inputs.modulation, model.modulation_mode()) {
        (None, ModulationMode::Resident) => Ok(None),
        (table, _) => {
            let mut table = table.clone().unwrap_or_default();
            let calls: Vec<&[f32]> = inputs.timesteps.iter().map(std::slice::from_ref).collect();
            model.extend_modulation_table(&mut table, &calls)?;
            Ok(Some(table))
        }
    }
}

/// One denoising run: the model, its inputs, and what every step shares.
struct DenoiseRun<'a, B: QwenBackend> {
    model: &'a QwenImageTransformer<B>,
    inputs: &'a DenoiseInputs<B>,
    num_steps: usize,
    /// The negative prompt, when true CFG runs.
    cfg: Option<&'a TextConditioning<B>>,
    modulation: Option<ModulationTable<B>>,
    /// The condition images' packed latents in the model dtype.
    image_latents: Tensor<B, 3>,
}

/// One step's inputs: its index, the latents it starts from and the DiT input of the prompt branch.
struct StepInput<B: Backend> {
    step: usize,
    x: Tensor<B, 3>,
    cond: DitInput<B>,
}

/// The velocity of a step under the plan the schedule kept, what computing it took, and the outcome so far.
struct Prediction<B: Backend> {
    v: Tensor<B, 3>,
    /// Both runs' when the schedule's review had the step run again.
    stats: StepStats,
    velocity_change: Option<f32>,
    guardrail: Option<GuardrailEvent>,
    outcome: StepOutcome,
}

impl<'a, B: QwenBackend> DenoiseRun<'a, B> {
    fn new(model: &'a QwenImageTransformer<B>, inputs: &'a DenoiseInputs<B>) -> Result<Self> {
        let num_steps = checked_num_steps(inputs)?;
        let modulation = step_modulation(model, inputs)?;
        Ok(DenoiseRun {
            model,
            inputs,
            num_steps,
            cfg: inputs.negative.as_ref().filter(|_| inputs.cfg_scale > 1.0),
            modulation,
            image_latents: inputs.image_latents.clone().cast(model.dtype()),
        })
    }

    /// Step `step` from the latents `x`: the plan, the velocity, the Euler step, the report; the schedule observes
    /// the outcome. Returns the next latents, the velocity and the report.
    fn step(
        &self,
        step: usize,
        x: Tensor<B, 3>,
        last_v: Option<&Tensor<B, 3>>,
        schedule: &mut dyn PruningSchedule,
        caches: &mut DenoiseCaches<B>,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 3>, StepReport)> {
        let start = Instant::now();
        let (sigma, sigma_next) = (self.inputs.sigmas[step], self.inputs.sigmas[step + 1]);
        let input = StepInput { step, cond: self.dit_input(step, &self.inputs.prompt, &x), x };
        let layout = input.cond.layout();
        let num_layers = self.model.num_layers();
        let ctx =
            StepContext { step, num_steps: self.num_steps, sigma, sigma_next, num_layers, layout: &layout };
        let plan = schedule.plan_step(&ctx)?;
        let p = self.predict(&input, plan, last_v, schedule, caches)?;
        let target = match schedule.needs_target_signals(step) {
            true => {
                Some(target_signals(&input.x, &p.v, sigma, &self.image_latents, &self.inputs.img_shapes)?)
            }
            false => None,
        };
        // Euler step in f32, stored in the model dtype (as diffusers does).
        let xf = input.x.cast(DType::F32) + p.v.clone().cast(DType::F32) * (sigma_next - sigma);
        let x = xf.cast(self.model.dtype());
        sync::<B>(self.model.device())?;
        let report = StepReport {
            step,
            sigma,
            time: start.elapsed(),
            stats: p.stats,
            cache_bytes: caches.size_bytes(),
            velocity_change: p.velocity_change,
            plan_summary: summarize(&p.outcome.plan, &layout),
            guardrail: p.guardrail,
        };
        let mut outcome = p.outcome;
        outcome.stats = p.stats;
        outcome.cache_bytes = report.cache_bytes;
        outcome.velocity_change = p.velocity_change;
        outcome.seconds = Some(report.time.as_secs_f64());
        outcome.target = target;
        schedule.observe(&outcome);
        Ok((x, p.v, report))
    }

    /// The velocity under `plan`; when the schedule's review rejects the step (a guardrail), again under the
    /// schedule's fallback plan.
    fn predict(
        &self,
        input: &StepInput<B>,
        plan: StepPlan,
        last_v: Option<&Tensor<B, 3>>,
        schedule: &mut dyn PruningSchedule,
        caches: &mut DenoiseCaches<B>,
    ) -> Result<Prediction<B>> {
        let (mut v, mut stats) = self.velocity(input, &plan, caches)?;
        let mut velocity_change = last_v.map(|p| rel_change(&v, p));
        let mut outcome = StepOutcome::new(input.step, plan);
        outcome.velocity_change = velocity_change;
        let mut guardrail = None;
        if let Some(fallback) = schedule.review(&outcome) {
            let again = Instant::now();
            let drift = velocity_change.unwrap_or(0.0);
            let (v2, stats2) = self.velocity(input, &fallback, caches)?;
            velocity_change = last_v.map(|p| rel_change(&v2, p));
            v = v2;
            stats += stats2;
            outcome.plan = fallback;
            guardrail = Some(GuardrailEvent { drift, seconds: again.elapsed().as_secs_f64() });
        }
        Ok(Prediction { v, stats, velocity_change, guardrail, outcome })
    }

    /// The velocity under `plan`: the prompt branch's, or with true CFG both branches' combined ([`true_cfg`]);
    /// with what both branches computed.
    fn velocity(
        &self,
        input: &StepInput<B>,
        plan: &StepPlan,
        caches: &mut DenoiseCaches<B>,
    ) -> Result<(Tensor<B, 3>, StepStats)> {
        let step = input.step;
        let (v_cond, mut stats) = self.model.forward_planned(&input.cond, plan, step, &mut caches.prompt)?;
        let v = match self.cfg {
            Some(neg) => {
                let neg_input = self.dit_input(step, neg, &input.x);
                let (v_neg, neg_stats) =
                    self.model.forward_planned(&neg_input, plan, step, &mut caches.negative)?;
                stats += neg_stats;
                true_cfg(v_cond, v_neg, self.inputs.cfg_scale)
            }
            None => v_cond,
        };
        Ok((v, stats))
    }

    /// The DiT's input at step `step` for the branch of `text`, from the latents `x`.
    fn dit_input(&self, step: usize, text: &TextConditioning<B>, x: &Tensor<B, 3>) -> DitInput<B> {
        DitInput {
            hidden_states: Tensor::cat(vec![x.clone(), self.image_latents.clone()], 1),
            encoder_hidden_states: text.embeds.clone(),
            encoder_hidden_states_mask: text.mask.clone(),
            timestep: vec![self.inputs.timesteps[step]],
            img_shapes: self.inputs.img_shapes.clone(),
            modulation: self.modulation.clone(),
        }
    }
}
