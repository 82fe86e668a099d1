//! DiT parity against diffusers (fixtures from `tools/fixtures/dit.py`): the plain forward pass, the planned pass,
//! and 4-step denoising with every built-in schedule.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use qwen_image::{
    dit::{DitLoadOptions, ModulationMode, QwenImageTransformer},
    nn::PlacedLinear,
    tensor_io::{rel_l2, to_f32_vec, TensorFile},
    CpuBackend, ModelError,
};
use qwen_image_edit::reference::{denoise_file, dit_forward, read_dit_input};
use qwen_image_pruning::{ScheduleSpec, StepPlan, TokenPruningCache};

type B = CpuBackend;

const CASES: [&str; 3] = ["plain", "zero_cond", "heldout"];
const SPECS: [&str; 6] =
    ["none", "cat", "reuse:2,3,4", "cat@1-1", "reuse:2,4/recompute", "reuse:3,4/recompute@0-1"];
const SIGMAS: [f32; 5] = [1.0, 0.9, 0.75, 0.5, 0.0];

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dit").join(case)
}

fn load(case: &str, dtype: DType) -> QwenImageTransformer<B> {
    QwenImageTransformer::load(&case_dir(case).join("transformer"), dtype, &Default::default()).unwrap()
}

fn expected(case: &str, file: &str, name: &str) -> Vec<f32> {
    TensorFile::open(&case_dir(case).join(file)).unwrap().f32(name).unwrap().0
}

#[test]
fn forward_matches_diffusers_f32() {
    for case in CASES {
        let model = load(case, DType::F32);
        let (out, shape) = dit_forward(&model, &case_dir(case).join("inputs.safetensors")).unwrap();
        let want = expected(case, "expected.safetensors", "sample");
        let err = rel_l2(&out, &want);
        println!("{case}: shape {shape:?}, rel L2 {err:.2e}");
        assert!(err <= 1e-4, "{case}: relative L2 error {err:.3e} > 1e-4");
    }
}

#[test]
fn forward_matches_diffusers_bf16() {
    // bf16 weights and activations against diffusers run in bf16.
    for case in CASES {
        let model = load(case, DType::BF16);
        let (out, _) = dit_forward(&model, &case_dir(case).join("inputs.safetensors")).unwrap();
        let err = rel_l2(&out, &expected(case, "expected_bf16.safetensors", "sample"));
        println!("{case} bf16: rel L2 {err:.2e}");
        assert!(err <= 2e-2, "{case}: bf16 relative L2 error {err:.3e} > 2e-2");
    }
}

#[test]
fn planned_pass_without_pruning_is_bit_identical() {
    for case in CASES {
        let model = load(case, DType::F32);
        let file = TensorFile::open(&case_dir(case).join("inputs.safetensors")).unwrap();
        let input = read_dit_input::<B>(&file, model.device()).unwrap();
        let plain = to_f32_vec(model.forward(&input).unwrap());
        let layout = input.layout();
        let plan = StepPlan::compute_all(model.num_layers(), layout.condition_tokens.len());
        let mut cache = TokenPruningCache::new();
        let (planned, stats) = model.forward_planned(&input, &plan, 0, &mut cache).unwrap();
        let planned = to_f32_vec(planned);
        let target = layout.target_tokens * model.config.out_features() * input.timestep.len();
        let per_item = plain.len() / input.timestep.len();
        let plain_target: Vec<f32> =
            plain.chunks(per_item).flat_map(|item| item[..target / input.timestep.len()].to_vec()).collect();
        assert_eq!(planned.len(), target);
        assert!(
            planned.iter().zip(&plain_target).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{case}: not bit-identical"
        );
        assert_eq!(stats.reused_tokens, 0);
        assert_eq!(stats.computed_tokens, layout.image_tokens() * model.num_layers());
        assert!(cache.is_empty());
    }
}

#[test]
fn denoising_with_every_schedule_matches_the_reference() {
    for case in CASES {
        let model = load(case, DType::F32);
        let inputs = case_dir(case).join("denoise_inputs.safetensors");
        let reference = TensorFile::open(&case_dir(case).join("denoise_expected.safetensors")).unwrap();
        let none = reference.f32("none").unwrap().0;
        for spec in SPECS {
            let schedule: ScheduleSpec = spec.parse().unwrap();
            let (out, _, reports) = denoise_file(&model, &inputs, &SIGMAS, &schedule).unwrap();
            let want = reference.f32(spec).unwrap().0;
            let err = rel_l2(&out, &want);
            let vs_none = rel_l2(&want, &none);
            println!("{case} {spec:26}: rel L2 {err:.2e} (the schedule moves the result by {vs_none:.2e})");
            assert!(err <= 1e-4, "{case} {spec}: relative L2 error {err:.3e} > 1e-4");
            assert_eq!(reports.len(), 4);
            if schedule.prunes() {
                assert!(
                    reports.iter().any(|r| r.stats.reused_tokens > 0),
                    "{case} {spec}: nothing was reused"
                );
            }
        }
    }
}

#[test]
fn the_denoise_fixtures_discriminate_reuse_from_full_compute() {
    // A broken reuse that silently recomputed everything would land on `none`: make sure the fixtures tell apart.
    let reference = TensorFile::open(&case_dir("plain").join("denoise_expected.safetensors")).unwrap();
    let none = reference.f32("none").unwrap().0;
    for spec in &SPECS[1..] {
        let d = rel_l2(&reference.f32(spec).unwrap().0, &none);
        assert!(d > 2e-3, "{spec} differs from none by only {d:.2e}");
    }
}

#[test]
fn swapped_modulation_order_breaks_parity() {
    // The fixture is sensitive to the (shift, scale, gate) order: swapping shift and scale rows of img_mod must
    // push the error far above the tolerance.
    let options = DitLoadOptions { modulation: ModulationMode::Resident, ..Default::default() };
    let dir = case_dir("plain").join("transformer");
    let mut model =
        QwenImageTransformer::<B>::load_with(&dir, DType::F32, &options, &Default::default()).unwrap();
    let dim = model.config.inner_dim();
    for block in &mut model.blocks {
        let PlacedLinear::Resident(img_mod) = &mut block.img_mod else { panic!("resident mode") };
        let w = img_mod.weight.to_dense();
        let b = img_mod.bias.clone().unwrap();
        let swap2 = |t: burn::tensor::Tensor<B, 2>| {
            let parts = t.clone().split(dim, 0);
            let mut p = parts.clone();
            p.swap(0, 1);
            burn::tensor::Tensor::cat(p, 0)
        };
        let swap1 = |t: burn::tensor::Tensor<B, 1>| {
            let mut p = t.split(dim, 0);
            p.swap(0, 1);
            burn::tensor::Tensor::cat(p, 0)
        };
        img_mod.weight = swap2(w).into();
        img_mod.bias = Some(swap1(b));
    }
    let (out, _) = dit_forward(&model, &case_dir("plain").join("inputs.safetensors")).unwrap();
    let err = rel_l2(&out, &expected("plain", "expected.safetensors", "sample"));
    assert!(err > 1e-2, "swapping shift and scale changed the output by only {err:.2e}");
}

#[test]
fn mismatched_checkpoints_are_clear_errors() {
    let src = case_dir("plain").join("transformer");
    let tmp = std::env::temp_dir().join(format!("qwen-dit-mismatch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        tmp.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let dev = Default::default();

    // One layer more than the checkpoint holds: a missing key naming the block.
    std::fs::write(tmp.join("config.json"), config.replace("\"num_layers\": 3", "\"num_layers\": 4"))
        .unwrap();
    let err = QwenImageTransformer::<B>::load(&tmp, DType::F32, &dev).unwrap_err();
    assert!(
        matches!(err, ModelError::MissingKey { ref key, .. } if key.starts_with("transformer_blocks.3.")),
        "{err}"
    );

    // One layer fewer: the leftover block's keys are reported.
    std::fs::write(tmp.join("config.json"), config.replace("\"num_layers\": 3", "\"num_layers\": 2"))
        .unwrap();
    let err = QwenImageTransformer::<B>::load(&tmp, DType::F32, &dev).unwrap_err();
    assert!(
        matches!(err, ModelError::UnexpectedKeys { .. }) && err.to_string().contains("transformer_blocks.2."),
        "{err}"
    );

    // Another width: a shape mismatch naming the key and both shapes.
    std::fs::write(
        tmp.join("config.json"),
        config.replace("\"joint_attention_dim\": 24", "\"joint_attention_dim\": 32"),
    )
    .unwrap();
    let err = QwenImageTransformer::<B>::load(&tmp, DType::F32, &dev).unwrap_err();
    assert!(
        matches!(err, ModelError::ShapeMismatch { .. }) && err.to_string().contains("txt_norm.weight"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn reuse_before_caching_fails_before_computing() {
    let model = load("plain", DType::F32);
    let file = TensorFile::open(&case_dir("plain").join("inputs.safetensors")).unwrap();
    let input = read_dit_input::<B>(&file, model.device()).unwrap();
    let n = input.layout().condition_tokens.len();
    let plan = StepPlan::new(vec![
        qwen_image_pruning::LayerPlan::with_conditions(
            n,
            qwen_image_pruning::GroupAction::Reuse(qwen_image_pruning::ReuseMode::KeyValue)
        );
        model.num_layers()
    ]);
    let mut cache = TokenPruningCache::new();
    let err = model.forward_planned(&input, &plan, 0, &mut cache).unwrap_err();
    assert!(err.to_string().contains("nothing was cached"), "{err}");
}
