//! The pipeline's behaviour beyond numerical parity, on the built-in demo snapshot: request validation, the
//! schedule check before anything runs, the pruning-cache lifecycle, seeded noise, Edit-Plus with 3 images,
//! runtime LoRA swapping, progress events and the typed report.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use qwen_image::{processor::RgbImage, tensor_io::rel_l2, CpuBackend};
use qwen_image_pipeline::{
    demo, lora::LoraWeights, EditReport, EditRequest, ExactAllocation, LoadOptions, NoProgress,
    PipelineError, Progress, QwenImageEditPipeline, Stage, StepReport,
};
use qwen_image_pruning::{
    from_fn, GroupAction, GroupPlan, LayerPlan, PruneError, PruningSchedule, ReuseMode, ScheduleSpec,
    StepContext, StepPlan, TokenSubset,
};

type B = CpuBackend;

fn snapshot() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("qwen-pipeline-api-{}", std::process::id()));
        demo::write_demo_snapshot(&dir).unwrap()
    })
    .clone()
}

fn pipe() -> QwenImageEditPipeline<B> {
    pipe_with(&LoadOptions::default())
}

fn pipe_with(options: &LoadOptions) -> QwenImageEditPipeline<B> {
    QwenImageEditPipeline::load(snapshot().to_str().unwrap(), options, &Default::default(), &mut NoProgress)
        .unwrap()
}

fn request(prompt: &str) -> EditRequest {
    let mut r = EditRequest::new(vec![demo::sample_image().unwrap()], prompt);
    r.areas = demo::demo_areas();
    r.num_steps = 3;
    r
}

fn spec(s: &str) -> ScheduleSpec {
    s.parse().unwrap()
}

/// Reuses the condition tokens at every step, including the first. `Clone`, so `&AlwaysReuse` is a factory.
#[derive(Clone, Debug)]
struct AlwaysReuse;

impl PruningSchedule for AlwaysReuse {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        let n = ctx.layout.condition_tokens.len();
        Ok(StepPlan::new(vec![
            LayerPlan::with_conditions(n, GroupAction::Reuse(ReuseMode::KeyValue));
            ctx.num_layers
        ]))
    }
    fn name(&self) -> String {
        "always-reuse".into()
    }
}

#[test]
fn invalid_requests_are_refused_before_running() {
    let mut p = pipe();
    let none = spec("none");
    let err = |r: &EditRequest, p: &mut QwenImageEditPipeline<B>| {
        p.edit(r, &none, &mut NoProgress).unwrap_err().to_string()
    };
    assert!(err(&request(""), &mut p).contains("prompt is empty"));
    let mut r = request("x");
    r.num_steps = 0;
    assert!(err(&r, &mut p).contains("at least 1"));
    let mut r = request("x");
    r.images.push(r.images[0].clone());
    assert!(err(&r, &mut p).contains("exactly 1 input image"));
    let mut r = request("x");
    r.images.clear();
    assert!(err(&r, &mut p).contains("exactly 1"));
    let mut r = request("x");
    r.noise = Some(vec![0.0; 5]);
    assert!(err(&r, &mut p).contains("noise"));
    let mut r = request("x");
    r.width = Some(8);
    assert!(err(&r, &mut p).contains("width"));
    let mut r = request("x");
    r.negative_prompt = Some(String::new());
    assert!(err(&r, &mut p).contains("negative prompt"));
    let mut r = request("x");
    r.images = vec![RgbImage::new(0, 0)];
    assert!(err(&r, &mut p).contains("empty"));
}

#[test]
fn a_schedule_that_reuses_before_caching_is_refused_before_anything_runs() {
    let mut p = pipe();
    let mut events = Events::default();
    let e = p.edit(&request("Make it purple"), &AlwaysReuse, &mut events).unwrap_err();
    assert!(matches!(e, PipelineError::Prune(PruneError::CacheMiss { step: 0, .. })), "{e}");
    assert!(!events.stages.contains(&Stage::EncodePrompt), "the text encoder ran: {:?}", events.stages);
    assert_eq!(p.cache_bytes(), 0);
}

#[test]
fn the_cache_is_cleared_between_edits_unless_kept() {
    let mut p = pipe();
    let first = p.edit(&request("Make it purple"), &spec("cat"), &mut NoProgress).unwrap();
    assert!(first.report.cache_bytes > 0 && p.cache_bytes() == first.report.cache_bytes);
    assert!(first.report.steps[1].stats.reused_tokens > 0);
    // Not kept: cleared, and a plan that reuses at step 1 is refused.
    assert!(p.edit(&request("Make it purple"), &AlwaysReuse, &mut NoProgress).is_err());
    let baseline = p.edit(&request("Make it purple"), &spec("none"), &mut NoProgress).unwrap();
    assert_eq!(baseline.report.cache_bytes, 0);
    assert_eq!(baseline.report.reused_tokens(), 0);
    // Kept: an edit of the same image can reuse the previous edit's condition tokens from its first step.
    p.edit(&request("Make it purple"), &spec("cat"), &mut NoProgress).unwrap();
    let mut again = request("Add a hat");
    again.keep_cache = true;
    let reused = p.edit(&again, &AlwaysReuse, &mut NoProgress).unwrap();
    assert!(reused.report.steps.iter().all(|s| s.stats.reused_tokens > 0));
    assert_eq!(
        reused.report.steps[0].stats.computed_tokens,
        reused.report.target_tokens * p.transformer().num_layers()
    );
}

#[test]
fn a_dropped_cache_changes_no_pixel_and_is_not_kept() {
    // Dropping the cache after the loop frees it before the decode; the image is the kept-cache run's, and a next
    // request's keep_cache finds nothing (a plan that reuses at step 0 is refused, as after a cleared cache).
    let mut kept = pipe();
    let want = kept.edit(&request("Make it purple"), &spec("cat"), &mut NoProgress).unwrap();
    let mut p = pipe_with(&LoadOptions { drop_cache_after_denoise: true, ..LoadOptions::default() });
    let got = p.edit(&request("Make it purple"), &spec("cat"), &mut NoProgress).unwrap();
    assert_eq!(got.image, want.image);
    assert!(got.report.cache_peak_bytes > 0 && got.report.cache_bytes == 0 && p.cache_bytes() == 0);
    let mut again = request("Add a hat");
    again.keep_cache = true;
    assert!(p.edit(&again, &AlwaysReuse, &mut NoProgress).is_err());
}

#[test]
fn image_encoding_is_awaited_when_each_stage_gives_its_memory_back_and_no_pixel_changes() {
    // Queued image encoding (the default) and awaited image encoding (after every stage memory is given back, so
    // each stage is finished first) run the same networks on the same inputs: the same image, bit for bit.
    let queued = pipe().edit(&request("Make it purple"), &spec("cat"), &mut NoProgress).unwrap();
    assert!(queued.report.stages.iter().any(|s| s.queued));
    for options in [
        LoadOptions { release_memory: true, ..LoadOptions::default() },
        LoadOptions { exact_allocation: ExactAllocation::Vae, ..LoadOptions::default() },
    ] {
        let awaited =
            pipe_with(&options).edit(&request("Make it purple"), &spec("cat"), &mut NoProgress).unwrap();
        assert!(awaited.report.stages.iter().all(|s| !s.queued), "{:?}", awaited.report.stages);
        assert_eq!(awaited.image, queued.image);
        assert_eq!(awaited.latents, queued.latents);
    }
}

#[test]
fn seeded_noise_is_reproducible_and_supplied_noise_is_used() {
    let mut p = pipe();
    let mut r = request("Make it purple");
    r.seed = 11;
    let a = p.edit(&r, &spec("none"), &mut NoProgress).unwrap();
    let b = p.edit(&r, &spec("none"), &mut NoProgress).unwrap();
    assert_eq!(a.image, b.image);
    assert_eq!(a.latents, b.latents);
    r.seed = 12;
    let c = p.edit(&r, &spec("none"), &mut NoProgress).unwrap();
    assert!(rel_l2(&c.latents, &a.latents) > 1e-2);
    let n = a.report.target_tokens * 16;
    r.noise = Some(qwen_image_pipeline::noise::gaussian_noise(5, n));
    let d = p.edit(&r, &spec("none"), &mut NoProgress).unwrap();
    assert_eq!(d.report.seed, None);
}

#[derive(Default)]
struct Events {
    stages: Vec<Stage>,
    finished: Vec<(Stage, Duration)>,
    steps: Vec<usize>,
    denoise_steps: Option<usize>,
}

impl Progress for Events {
    fn stage_started(&mut self, stage: Stage) {
        self.stages.push(stage);
    }
    fn stage_finished(&mut self, stage: Stage, time: Duration) {
        self.finished.push((stage, time));
    }
    fn denoise_started(&mut self, n: usize) {
        self.denoise_steps = Some(n);
    }
    fn step_finished(&mut self, r: &StepReport) {
        self.steps.push(r.step);
    }
}

#[test]
fn progress_and_report_describe_the_run() {
    let mut events = Events::default();
    let mut p = QwenImageEditPipeline::<B>::load(
        snapshot().to_str().unwrap(),
        &LoadOptions::default(),
        &Default::default(),
        &mut events,
    )
    .unwrap();
    let loads = [Stage::LoadProcessor, Stage::LoadTextEncoder, Stage::LoadVae, Stage::LoadTransformer];
    assert_eq!(events.stages, loads);
    assert_eq!(p.load_stages().len(), 4);
    let mut events = Events::default();
    let out = p.edit(&request("Make it purple"), &spec("reuse:2,3"), &mut events).unwrap();
    // With the modulation table stage: the default table mode computes the rows of the edit's timesteps first.
    let edit_stages = Stage::EDIT;
    assert_eq!(edit_stages[3], Stage::ModulationTable);
    assert_eq!(events.stages, edit_stages);
    assert_eq!(events.finished.len(), 6);
    assert_eq!((events.denoise_steps, events.steps.clone()), (Some(3), vec![0, 1, 2]));
    let r = &out.report;
    assert_eq!(r.stages.iter().map(|s| s.stage).collect::<Vec<_>>(), edit_stages);
    assert_eq!(r.steps.len(), 3);
    assert_eq!(r.sigmas.len(), 4);
    assert_eq!(r.schedule, "reuse:2,3");
    assert_eq!(r.steps[0].stats.reused_tokens, 0);
    assert!(r.steps[1].stats.reused_tokens > 0 && r.steps[2].stats.reused_tokens > 0);
    assert_eq!(r.reused_tokens(), r.steps.iter().map(|s| s.stats.reused_tokens).sum::<usize>());
    assert!(r.cache_peak_bytes > 0);
    assert_eq!((out.image.width(), out.image.height()), (r.width, r.height));
    assert!(r.size_adjustments.is_empty() && r.fast_path.is_none() && r.comparison.is_none());
    if cfg!(target_os = "linux") {
        assert!(r.memory.unwrap().host_rss_bytes.unwrap() > 0, "the default probe reads the host's memory");
    }
    // Image encoding is queued ahead of prompt encoding (the device computes it while the host prepares and queues
    // the text encoder's inputs), and the report says so.
    let queued: Vec<Stage> = r.stages.iter().filter(|s| s.queued).map(|s| s.stage).collect();
    assert_eq!(queued, [Stage::EncodeImage]);
    let json = serde_json::to_value(r).unwrap();
    assert_eq!(
        (&json["stages"][1]["stage"], &json["stages"][1]["queued"]),
        (&"encode_image".into(), &true.into())
    );
    assert!(json["stages"][2].get("queued").is_none(), "only a queued stage says so: {}", json["stages"]);
    assert_eq!(json["stages"][3]["stage"], "modulation_table");
    assert_eq!(json["stages"][4]["stage"], "denoise");
    assert_eq!(
        json["steps"][1]["reused_tokens"], r.steps[1].stats.reused_tokens,
        "step stats are flat in JSON"
    );
    assert!(json["steps"][1]["seconds"].is_f64() && json["steps"][1]["plan"].is_string());
    let back: EditReport = serde_json::from_value(json).unwrap();
    assert_eq!(back.steps.len(), r.steps.len());
    assert_eq!(back.stages, r.stages);
    assert_eq!(
        (back.width, back.schedule.as_str(), back.sigmas.clone()),
        (r.width, "reuse:2,3", r.sigmas.clone())
    );
}

#[test]
fn a_rounded_output_size_is_in_the_report() {
    let mut p = pipe();
    let mut r = request("Make it purple");
    (r.width, r.height) = (Some(97), Some(64));
    let out = p.edit(&r, &spec("none"), &mut NoProgress).unwrap();
    assert_eq!((out.image.width(), out.image.height()), (96, 64));
    assert_eq!(out.report.size_adjustments, r.size_adjustments());
    assert_eq!(out.report.size_adjustments[0].to_string(), "width 97 rounded down to 96 (a multiple of 16)");
}

/// `cat`, but as a user-written schedule with its own state (the number of steps it planned).
#[derive(Clone, Debug, Default)]
struct CountingCat {
    planned: usize,
}

impl PruningSchedule for CountingCat {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        assert_eq!(self.planned, ctx.step, "each run starts from a fresh clone");
        self.planned += 1;
        qwen_image_pruning::Cat::default().plan_step(ctx)
    }
    fn name(&self) -> String {
        "counting-cat".into()
    }
}

#[test]
fn schedules_are_passed_as_specs_clone_values_or_closures() {
    let mut p = pipe();
    let by_spec = p.edit(&request("Make it purple"), &spec("cat"), &mut NoProgress).unwrap();
    let by_value = p.edit(&request("Make it purple"), &CountingCat::default(), &mut NoProgress).unwrap();
    let by_fn = p.edit(&request("Make it purple"), &from_fn(CountingCat::default), &mut NoProgress).unwrap();
    assert_eq!(by_value.latents, by_spec.latents);
    assert_eq!(by_fn.latents, by_spec.latents);
    assert_eq!(by_value.report.schedule, "counting-cat");
}

/// Plans a token subset of the condition image at the second step.
#[derive(Clone, Debug)]
struct Subset;

impl PruningSchedule for Subset {
    fn plan_step(&mut self, ctx: &StepContext<'_>) -> Result<StepPlan, PruneError> {
        let mut plan = qwen_image_pruning::Cat::default().plan_step(ctx)?;
        if ctx.step == 1 {
            plan.layers[0].conditions[0] = GroupPlan {
                action: GroupAction::Compute,
                tokens: TokenSubset::Indices(vec![0, 1]),
                rest: GroupAction::Reuse(ReuseMode::KeyValue),
            };
        }
        Ok(plan)
    }
    fn name(&self) -> String {
        "subset".into()
    }
}

#[test]
fn prune_errors_arrive_by_one_path() {
    let mut p = pipe();
    // Token subsets are refused by the plan's validation, before anything runs.
    let e = p.edit(&request("Make it purple"), &Subset, &mut NoProgress).unwrap_err();
    assert!(matches!(e, PipelineError::Prune(PruneError::Unsupported(_))), "{e:?}");
    // A kept cache of a condition image of another size: the model finds the mismatch while running, and it
    // still arrives as `PipelineError::Prune`, not as `PipelineError::Model`.
    p.edit(&request("Make it purple"), &spec("cat"), &mut NoProgress).unwrap();
    let mut other = request("Make it purple");
    (other.areas.vae, other.keep_cache) = (96 * 96, true);
    let e = p.edit(&other, &AlwaysReuse, &mut NoProgress).unwrap_err();
    assert!(matches!(e, PipelineError::Prune(PruneError::CacheShapeMismatch { .. })), "{e:?}");
}

#[test]
fn runtime_lora_can_be_attached_and_detached_between_edits() {
    let mut p = pipe();
    let base = p.edit(&request("Make it purple"), &spec("none"), &mut NoProgress).unwrap();
    let dir = std::env::temp_dir().join(format!("qwen-pipeline-api-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lora.safetensors");
    let dim = p.transformer().config.inner_dim();
    qwen_image::tensor_io::write_f32(
        &path,
        &[
            ("transformer_blocks.1.img_mlp.net.2.lora_down.weight", vec![0.2; 2 * 4 * dim], vec![2, 4 * dim]),
            ("transformer_blocks.1.img_mlp.net.2.lora_up.weight", vec![0.3; dim * 2], vec![dim, 2]),
        ],
    )
    .unwrap();
    let lora = LoraWeights::load(&path, p.transformer().num_layers()).unwrap();
    let id = lora.attach(p.transformer_mut(), 1.0).unwrap();
    let with = p.edit(&request("Make it purple"), &spec("none"), &mut NoProgress).unwrap();
    assert!(rel_l2(&with.latents, &base.latents) > 1e-3);
    lora.detach(p.transformer_mut(), id);
    let without = p.edit(&request("Make it purple"), &spec("none"), &mut NoProgress).unwrap();
    assert_eq!(without.latents, base.latents);
}

#[test]
fn edit_plus_takes_up_to_three_images() {
    // The Edit-Plus fixture snapshot (zero_cond_t, like 2511).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/snapshot_plus");
    let mut p = QwenImageEditPipeline::<B>::load(
        root.to_str().unwrap(),
        &LoadOptions::default(),
        &Default::default(),
        &mut NoProgress,
    )
    .unwrap();
    let img = demo::sample_image().unwrap();
    let pixels: Vec<u8> = (0..40 * 90 * 3).map(|i| (i * 7 % 256) as u8).collect();
    let tall = RgbImage::from_raw(40, 90, pixels).unwrap();
    let mut r = request("Combine them");
    r.images = vec![img.clone(), tall.clone(), img.clone()];
    let out = p.edit(&r, &spec("cat"), &mut NoProgress).unwrap();
    assert_eq!(out.report.condition_tokens.len(), 3);
    assert_ne!(out.report.condition_tokens[0], out.report.condition_tokens[1]);
    // The output takes the last image's aspect ratio.
    assert!(out.image.width() > out.image.height());
    r.images.push(tall);
    let e = p.edit(&r, &spec("none"), &mut NoProgress).unwrap_err();
    assert!(e.to_string().contains("1 to 3 input images"), "{e}");
}
