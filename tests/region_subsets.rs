//! Target-token subsets in the model (edit-region pruning) on the tiny random DiT fixtures: a subset computes only
//! its tokens and matches a full computation where the cached K/V are exact, the other tokens keep their last
//! prediction, and a plan needing a missing cache entry fails before computing. Then the region schedules through the
//! denoising loop (with CFG) and the FLOPs their steps ran, and `mask:FILE` through the pipeline (unmasked pixels
//! bit-identical to the source).

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use qwen_image::{
    dit::QwenImageTransformer,
    tensor_io::{rel_l2, to_f32_vec, TensorFile},
    CpuBackend,
};
use qwen_image_edit::reference::read_dit_input;
use qwen_image_eval::flops::{executed_flops, planned_step_flops};
use qwen_image_pipeline::{
    demo, denoise, DenoiseCaches, DenoiseInputs, EditRequest, LoadOptions, NoProgress, QwenImageEditPipeline,
    TextConditioning,
};
use qwen_image_pruning::{
    full_cache_plan, GroupAction, GroupPlan, LayerPlan, ReuseMode, ScheduleSpec, StepPlan, TokenLayout,
    TokenPruningCache,
};

type B = CpuBackend;

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dit").join(case)
}

fn load(case: &str) -> (QwenImageTransformer<B>, qwen_image::dit::DitInput<B>) {
    let model =
        QwenImageTransformer::load(&case_dir(case).join("transformer"), DType::F32, &Default::default())
            .unwrap();
    let file = TensorFile::open(&case_dir(case).join("inputs.safetensors")).unwrap();
    let input = read_dit_input::<B>(&file, model.device()).unwrap();
    (model, input)
}

/// Every layer: the target `subset` (rest reused in `mode`), the condition images reused in `mode`.
fn subset_plan(layers: usize, conditions: usize, subset: &[u32], mode: ReuseMode) -> StepPlan {
    let layer = LayerPlan {
        target: GroupPlan::subset(subset.to_vec(), mode),
        ..LayerPlan::with_conditions(conditions, GroupAction::Reuse(mode))
    };
    StepPlan::new(vec![layer; layers])
}

/// Per token (`channels` values each), the rows of `values` listed in `rows`.
fn rows(values: &[f32], channels: usize, rows: impl Iterator<Item = usize>) -> Vec<f32> {
    rows.flat_map(|r| values[r * channels..(r + 1) * channels].to_vec()).collect()
}

#[test]
fn a_subset_computes_its_tokens_as_the_full_pass_and_holds_the_rest() {
    for case in ["plain", "zero_cond"] {
        let (model, input) = load(case);
        let layout = input.layout();
        let (layers, n, t) = (model.num_layers(), layout.condition_tokens.len(), layout.target_tokens);
        let channels = model.config.out_features();
        let subset: Vec<u32> = (0..t as u32).filter(|i| i % 3 == 1).collect();
        let rest: Vec<usize> = (0..t).filter(|i| i % 3 != 1).collect();
        for mode in [ReuseMode::KeyValue, ReuseMode::RecomputeKeyValue] {
            let mut cache = TokenPruningCache::new();
            let (full, full_stats) =
                model.forward_planned(&input, &full_cache_plan(layers, n), 0, &mut cache).unwrap();
            let full = to_f32_vec(full);
            assert_eq!(full_stats.cached_entries, layers * (n + 1));
            assert!(cache.target_bytes() > 0);
            // The same input again: the cached K/V are exactly what a full pass computes, so the subset's tokens
            // must come out as in the full pass (up to summation order), and the rest is the held prediction.
            let plan = subset_plan(layers, n, &subset, mode);
            let (out, stats) = model.forward_planned(&input, &plan, 1, &mut cache).unwrap();
            let out = to_f32_vec(out);
            assert_eq!(out.len(), full.len());
            let (got, want) = (
                rows(&out, channels, subset.iter().map(|&i| i as usize)),
                rows(&full, channels, subset.iter().map(|&i| i as usize)),
            );
            let err = rel_l2(&got, &want);
            println!("{case} {mode:?}: subset tokens vs full pass rel L2 {err:.2e}");
            assert!(err <= 1e-5, "{case} {mode:?}: {err:.3e}");
            assert_eq!(
                rows(&out, channels, rest.iter().copied()),
                rows(&full, channels, rest.iter().copied())
            );
            assert_eq!(stats.computed_tokens, subset.len() * layers);
            assert_eq!(
                stats.reused_tokens,
                (rest.len() + layout.condition_tokens.iter().sum::<usize>()) * layers
            );
        }
    }
}

#[test]
fn the_held_tokens_keep_the_last_prediction_while_the_subset_moves() {
    let (model, mut input) = load("plain");
    let layout = input.layout();
    let (layers, n, t) = (model.num_layers(), layout.condition_tokens.len(), layout.target_tokens);
    let channels = model.config.out_features();
    let mut cache = TokenPruningCache::new();
    let (full, _) = model.forward_planned(&input, &full_cache_plan(layers, n), 0, &mut cache).unwrap();
    let full = to_f32_vec(full);
    input.timestep = vec![input.timestep[0] * 0.5];
    let (moved, _) = model
        .forward_planned(&input, &subset_plan(layers, n, &[0], ReuseMode::KeyValue), 1, &mut cache)
        .unwrap();
    let moved = to_f32_vec(moved);
    assert!(rel_l2(&moved[..channels], &full[..channels]) > 1e-3, "the computed token did not change");
    assert_eq!(moved[channels..], full[channels..]);
    // The next subset step holds what the last one predicted (token 0 included).
    let (next, _) = model
        .forward_planned(&input, &subset_plan(layers, n, &[t as u32 - 1], ReuseMode::KeyValue), 2, &mut cache)
        .unwrap();
    assert_eq!(to_f32_vec(next)[..channels], moved[..channels]);
}

#[test]
fn a_subset_of_every_token_is_the_full_plan_bit_for_bit() {
    let (model, input) = load("zero_cond");
    let layout = input.layout();
    let (layers, n, t) = (model.num_layers(), layout.condition_tokens.len(), layout.target_tokens);
    let mut cache = TokenPruningCache::new();
    model.forward_planned(&input, &full_cache_plan(layers, n), 0, &mut cache).unwrap();
    let all: Vec<u32> = (0..t as u32).collect();
    let (a, _) = model
        .forward_planned(&input, &subset_plan(layers, n, &all, ReuseMode::KeyValue), 1, &mut cache)
        .unwrap();
    let reuse =
        StepPlan::new(vec![LayerPlan::with_conditions(n, GroupAction::Reuse(ReuseMode::KeyValue)); layers]);
    let (b, _) = model.forward_planned(&input, &reuse, 1, &mut cache).unwrap();
    let (a, b) = (to_f32_vec(a), to_f32_vec(b));
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn subset_plans_without_their_cache_fail_before_computing() {
    let (model, input) = load("plain");
    let layout = input.layout();
    let (layers, n) = (model.num_layers(), layout.condition_tokens.len());
    let plan = subset_plan(layers, n, &[0, 2], ReuseMode::KeyValue);
    // Nothing cached.
    let mut cache = TokenPruningCache::new();
    let err = model.forward_planned(&input, &plan, 1, &mut cache).unwrap_err();
    assert!(err.to_string().contains("target is reused but nothing was cached"), "{err}");
    assert!(cache.is_empty() && cache.stats().reuses == 0);
    // Only the condition images cached (a `cat` step): the target is still missing.
    let cat = StepPlan::new(vec![LayerPlan::with_conditions(n, GroupAction::ComputeAndCache); layers]);
    model.forward_planned(&input, &cat, 0, &mut cache).unwrap();
    let err = model.forward_planned(&input, &plan, 1, &mut cache).unwrap_err();
    assert!(err.to_string().contains("layer 0: target is reused"), "{err}");
    // A subset with recomputed K/V needs the target's block inputs: present after a full caching step.
    model.forward_planned(&input, &full_cache_plan(layers, n), 0, &mut cache).unwrap();
    model
        .forward_planned(&input, &subset_plan(layers, n, &[1], ReuseMode::RecomputeKeyValue), 1, &mut cache)
        .unwrap();
    // Subsets differing between blocks are refused.
    let mut mixed = plan.clone();
    mixed.layers[1].target = GroupPlan::subset(vec![1], ReuseMode::KeyValue);
    let err = model.forward_planned(&input, &mixed, 1, &mut cache).unwrap_err();
    assert!(err.to_string().contains("differs from layer 0"), "{err}");
}

fn denoise_inputs(model: &QwenImageTransformer<B>, cfg: bool) -> DenoiseInputs<B> {
    let file = TensorFile::open(&case_dir("plain").join("denoise_inputs.safetensors")).unwrap();
    let dev = model.device();
    let embeds: burn::tensor::Tensor<B, 3> = file.tensor("encoder_hidden_states", dev).unwrap();
    let sigmas = vec![1.0, 0.9, 0.75, 0.5, 0.0];
    DenoiseInputs {
        latents: file.tensor("latents", dev).unwrap(),
        image_latents: file.tensor("image_latents", dev).unwrap(),
        prompt: TextConditioning { embeds: embeds.clone(), mask: None },
        negative: cfg.then(|| TextConditioning { embeds: embeds.clone() * 0.5, mask: None }),
        cfg_scale: if cfg { 3.0 } else { 1.0 },
        img_shapes: qwen_image_edit::reference::read_img_shapes(&file).unwrap(),
        timesteps: sigmas[..4].to_vec(),
        sigmas,
        modulation: None,
    }
}

#[test]
fn region_schedules_run_in_the_denoising_loop_with_and_without_cfg() {
    let (model, _) = load("plain");
    for cfg in [false, true] {
        let inputs = denoise_inputs(&model, cfg);
        let run = |spec: &str| {
            let mut schedule = spec.parse::<ScheduleSpec>().unwrap().build().unwrap();
            let mut caches = DenoiseCaches::default();
            let (x, reports) = denoise(&model, &inputs, schedule.as_mut(), &mut caches, &mut |_| {}).unwrap();
            (to_f32_vec(x), reports, caches)
        };
        let (none, ..) = run("none");
        // Threshold 0: every token changes, so the region is the whole target and steps 2–4 equal `reuse:2,3,4`.
        let (all, reports, _) = run("region:0,0");
        let (reuse, ..) = run("reuse:2,3,4");
        assert_eq!(all, reuse, "cfg {cfg}");
        assert!(reports[1].plan_summary.contains("reuse"), "{}", reports[1].plan_summary);
        // A high threshold: a one-token region; the others hold step 1's velocity.
        let (tiny, reports, caches) = run("region:1000,0/recompute");
        assert!(reports[1].plan_summary.contains("target 1/"), "{}", reports[1].plan_summary);
        assert!(caches.prompt.target_bytes() > 0 && (caches.negative.target_bytes() > 0) == cfg);
        let d = rel_l2(&tiny, &none);
        assert!(d > 1e-4 && d.is_finite(), "cfg {cfg}: {d:.2e}");
        // Budget 0: step 2 reuses (no drift measured yet), every later step re-caches.
        let (_, reports, _) = run("adaptive:0");
        assert!(reports[1].stats.reused_tokens > 0);
        assert!(reports[2..].iter().all(|r| r.stats.reused_tokens == 0), "budget 0 refreshes after step 2");
        let (_, reports, _) = run("adaptive:1000");
        assert!(reports[1..].iter().all(|r| r.stats.reused_tokens > 0), "a large budget never refreshes");
    }
}

/// The eval's FLOPs (`qwen_image_eval::flops::executed_flops`) count what each step ran, from its stats: for
/// schedules whose plans do not depend on measurements they equal the dry run's planned count (with and without
/// CFG, with cached or recomputed K/V); for a region they count the tokens the edit chose, which the dry run (a
/// one-token region) cannot know.
#[test]
fn executed_flops_count_the_plans_that_ran() {
    let (model, _) = load("plain");
    let config = &model.config;
    for cfg in [false, true] {
        // Both branches have the same text length here, so the planned count (prompt's length twice) is exact.
        let inputs = denoise_inputs(&model, cfg);
        let conditions = inputs.img_shapes[1..].iter().map(|s| s.tokens()).collect();
        let layout =
            TokenLayout::new(inputs.prompt.embeds.dims()[1], inputs.img_shapes[0].tokens(), conditions);
        let branches = if cfg { 2 } else { 1 };
        let executed = |spec: &str| -> Vec<f64> {
            let mut schedule = spec.parse::<ScheduleSpec>().unwrap().build().unwrap();
            let mut caches = DenoiseCaches::default();
            let (_, reports) = denoise(&model, &inputs, schedule.as_mut(), &mut caches, &mut |_| {}).unwrap();
            reports.iter().map(|r| executed_flops(config, &r.stats)).collect()
        };
        let planned = |spec: &str| -> Vec<f64> {
            let spec = spec.parse::<ScheduleSpec>().unwrap();
            planned_step_flops(config, &spec, &inputs.sigmas, &layout, branches).unwrap()
        };
        let same = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-12 * y.abs());
        for spec in ["none", "cat", "reuse:2,3,4", "cat/recompute", "region:1000,0/recompute"] {
            let (ran, plan) = (executed(spec), planned(spec));
            assert!(same(&ran, &plan), "cfg {cfg}, {spec}: ran {ran:?}, planned {plan:?}");
        }
        // Threshold 0: the region is the whole target, so the steps after the first cost what `reuse:2,3,4`'s
        // do; the dry run's one-token region counts far less.
        let (region, reuse, none) = (executed("region:0,0"), executed("reuse:2,3,4"), executed("none"));
        assert!(same(&region, &reuse), "cfg {cfg}: {region:?} vs {reuse:?}");
        assert!(planned("region:0,0")[1] < 0.9 * region[1], "cfg {cfg}: the dry run's region is one token");
        assert!(region[0] == none[0] && region[1] < none[1], "cfg {cfg}: {region:?} vs {none:?}");
    }
}

/// The pipeline of the snapshot folder `dir`, on the CPU.
fn pipeline(dir: &Path) -> QwenImageEditPipeline<B> {
    let options = LoadOptions::default();
    QwenImageEditPipeline::load(dir.to_str().unwrap(), &options, &Default::default(), &mut NoProgress)
        .unwrap()
}

#[test]
fn mask_keeps_unmasked_pixels_bit_identical_and_budget_and_guardrail_are_reported() {
    let dir = std::env::temp_dir().join(format!("qwen-region-{}", std::process::id()));
    let snapshot = demo::write_demo_snapshot(&dir.join("snapshot")).unwrap();
    let mut pipe = pipeline(&snapshot);
    let image = demo::sample_image().unwrap();
    let mut request = EditRequest::new(vec![image.clone()], "Make it purple");
    request.areas = demo::demo_areas();
    let none = pipe.edit(&request, &"none".parse::<ScheduleSpec>().unwrap(), &mut NoProgress).unwrap();
    let (w, h) = none.image.dimensions();
    // White on the left half.
    let mask_path = dir.join("mask.png");
    let mask = image::GrayImage::from_fn(w, h, |x, _| image::Luma([if x < w / 2 { 255 } else { 0 }]));
    mask.save(&mask_path).unwrap();
    let spec: ScheduleSpec = format!("mask:{}", mask_path.display()).parse().unwrap();
    let out = pipe.edit(&request, &spec, &mut NoProgress).unwrap();
    let source = qwen_image::processor::resize(&image, w, h, qwen_image::processor::Filter::Lanczos).unwrap();
    for (x, y, p) in out.image.enumerate_pixels() {
        if x >= w / 2 {
            assert_eq!(p, source.get_pixel(x, y), "pixel ({x}, {y}) outside the mask");
        }
    }
    assert!(out.report.steps[1].plan_summary.contains("target"), "{}", out.report.steps[1].plan_summary);
    // Guardrail at 0 and a cache budget that holds nothing: reported, and the edit still runs.
    request.guardrail = Some(0.0);
    request.cache_budget = Some(0);
    let guarded = pipe.edit(&request, &"region".parse::<ScheduleSpec>().unwrap(), &mut NoProgress).unwrap();
    assert!(
        guarded.report.schedule.contains("budget") && guarded.report.schedule.contains("dropped"),
        "{}",
        guarded.report.schedule
    );
    request.cache_budget = None;
    let guarded = pipe.edit(&request, &"cat".parse::<ScheduleSpec>().unwrap(), &mut NoProgress).unwrap();
    assert!(guarded.report.steps[1].guardrail.is_some(), "the guardrail did not fire");
    assert_eq!(guarded.latents, none.latents, "a guardrail firing at every reuse step gives the baseline");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn region_runs_on_edit_plus_with_three_images() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/snapshot_plus");
    let mut pipe = pipeline(&root);
    let img = demo::sample_image().unwrap();
    let mut r = EditRequest::new(vec![img.clone(), img.clone(), img], "Combine them");
    r.areas = demo::demo_areas();
    for spec in ["region:0.01,1", "region:0.01,0,3/recompute@0-1", "adaptive:0.1"] {
        let out = pipe.edit(&r, &spec.parse::<ScheduleSpec>().unwrap(), &mut NoProgress).unwrap();
        assert_eq!(out.report.condition_tokens.len(), 3);
        assert!(out.report.steps[1].stats.reused_tokens > 0, "{spec}");
    }
}
