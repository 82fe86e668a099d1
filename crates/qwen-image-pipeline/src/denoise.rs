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
    let num_steps = inputs.sigmas.len().saturating_sub(1);
    if num_steps == 0 || inputs.timesteps.len() != num_steps {
        return Err(PipelineError::invalid(format!(
            "{} sigmas and {} timesteps: need num_steps + 1 sigmas (num_steps ≥ 1) and num_steps timesteps",
            inputs.sigmas.len(),
            inputs.timesteps.len()
        )));
    }
    let device = model.device().clone();
    let dtype = model.dtype();
    // The prompt and the negative prompt share the rows: they depend on the timestep only.
    let modulation = match (&inputs.modulation, model.modulation_mode()) {
        (None, ModulationMode::Resident) => None,
        (table, _) => {
            let mut table = table.clone().unwrap_or_default();
            let calls: Vec<&[f32]> = inputs.timesteps.iter().map(std::slice::from_ref).collect();
            model.extend_modulation_table(&mut table, &calls)?;
            Some(table)
        }
    };
    let cfg = inputs.negative.as_ref().filter(|_| inputs.cfg_scale > 1.0);
    let mut x = inputs.latents.clone().cast(dtype);
    let image_latents = inputs.image_latents.clone().cast(dtype);
    let mut reports = Vec::with_capacity(num_steps);
    let mut last_v: Option<Tensor<B, 3>> = None;

    for step in 0..num_steps {
        let start = Instant::now();
        let (sigma, sigma_next) = (inputs.sigmas[step], inputs.sigmas[step + 1]);
        let input_of = |text: &TextConditioning<B>, x: &Tensor<B, 3>| DitInput {
            hidden_states: Tensor::cat(vec![x.clone(), image_latents.clone()], 1),
            encoder_hidden_states: text.embeds.clone(),
            encoder_hidden_states_mask: text.mask.clone(),
            timestep: vec![inputs.timesteps[step]],
            img_shapes: inputs.img_shapes.clone(),
            modulation: modulation.clone(),
        };
        let cond_input = input_of(&inputs.prompt, &x);
        let layout = cond_input.layout();
        let ctx = StepContext {
            step,
            num_steps,
            sigma,
            sigma_next,
            num_layers: model.num_layers(),
            layout: &layout,
        };
        let plan = schedule.plan_step(&ctx)?;
        let run_plan = |plan: &StepPlan,
                        caches: &mut DenoiseCaches<B>|
         -> Result<(Tensor<B, 3>, StepStats)> {
            let (v_cond, mut stats) = model.forward_planned(&cond_input, plan, step, &mut caches.prompt)?;
            let v = match cfg {
                Some(neg) => {
                    let (v_neg, neg_stats) =
                        model.forward_planned(&input_of(neg, &x), plan, step, &mut caches.negative)?;
                    stats += neg_stats;
                    true_cfg(v_cond, v_neg, inputs.cfg_scale)
                }
                None => v_cond,
            };
            Ok((v, stats))
        };
        let (mut v, mut stats) = run_plan(&plan, caches)?;
        let mut velocity_change = last_v.as_ref().map(|p| rel_change(&v, p));
        let mut outcome = StepOutcome::new(step, plan);
        outcome.velocity_change = velocity_change;
        // The schedule may reject the step (a guardrail) and have it run again with another plan.
        let mut guardrail = None;
        if let Some(fallback) = schedule.review(&outcome) {
            let again = Instant::now();
            let drift = velocity_change.unwrap_or(0.0);
            let (v2, stats2) = run_plan(&fallback, caches)?;
            velocity_change = last_v.as_ref().map(|p| rel_change(&v2, p));
            v = v2;
            stats += stats2;
            outcome.plan = fallback;
            guardrail = Some(GuardrailEvent { drift, seconds: again.elapsed().as_secs_f64() });
        }
        let target = match schedule.needs_target_signals(step) {
            true => Some(target_signals(&x, &v, sigma, &image_latents, &inputs.img_shapes)?),
            false => None,
        };
        // Euler step in f32, stored in the model dtype (as diffusers does).
        let xf = x.cast(DType::F32) + v.clone().cast(DType::F32) * (sigma_next - sigma);
        x = xf.cast(dtype);
        sync::<B>(&device)?;
        last_v = Some(v);
        let report = StepReport {
            step,
            sigma,
            time: start.elapsed(),
            stats,
            cache_bytes: caches.size_bytes(),
            velocity_change,
            plan_summary: summarize(&outcome.plan, &layout),
            guardrail,
        };
        outcome.stats = stats;
        outcome.cache_bytes = report.cache_bytes;
        outcome.velocity_change = velocity_change;
        outcome.seconds = Some(report.time.as_secs_f64());
        outcome.target = target;
        schedule.observe(&outcome);
        on_step(&report)?;
        reports.push(report);
    }
    Ok((x, reports))
}
