//! LoRA parity against diffusers' `load_lora_weights` (fixture from `tools/fixtures/pipeline.py`): four key
//! conventions merged at load time, runtime adapters, strength, and the errors for files that do not fit.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use qwen_image::{
    dit::QwenImageTransformer,
    tensor_io::{rel_l2, write_f32, TensorFile},
    CpuBackend,
};
use qwen_image_edit::reference::dit_forward;
use qwen_image_pipeline::{lora::LoraWeights, PipelineError};

type B = CpuBackend;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/lora")
}

fn model() -> QwenImageTransformer<B> {
    QwenImageTransformer::load(&dir().join("transformer"), DType::F32, &Default::default()).unwrap()
}

fn run(m: &QwenImageTransformer<B>) -> Vec<f32> {
    dit_forward(m, &dir().join("inputs.safetensors")).unwrap().0
}

fn expected(name: &str) -> Vec<f32> {
    TensorFile::open(&dir().join("expected.safetensors")).unwrap().f32(name).unwrap().0
}

const FORMATS: [&str; 4] = ["lightning", "peft_default", "kohya", "diffusers_noalpha"];

#[test]
fn merged_lora_matches_diffusers_in_every_key_convention() {
    let base = model();
    assert!(rel_l2(&run(&base), &expected("base")) <= 1e-5);
    for fmt in FORMATS {
        let lora = LoraWeights::load(&dir().join(format!("{fmt}.safetensors")), base.num_layers()).unwrap();
        assert_eq!(lora.len(), 2 * 12 + 1, "{fmt}");
        let mut m = base.clone();
        assert_eq!(lora.merge_into(&mut m, 1.0).unwrap(), 25);
        let err = rel_l2(&run(&m), &expected(fmt));
        println!("{fmt}: merged rel L2 {err:.2e}");
        assert!(err <= 1e-4, "{fmt}: merged LoRA differs from diffusers by {err:.3e}");
    }
}

#[test]
fn runtime_adapters_equal_merging_and_detach_cleanly() {
    let base = model();
    let plain = run(&base);
    let lora = LoraWeights::load(&dir().join("lightning.safetensors"), base.num_layers()).unwrap();
    let mut merged = base.clone();
    lora.merge_into(&mut merged, 1.0).unwrap();
    let merged_out = run(&merged);

    let mut m = base.clone();
    let id = lora.attach(&mut m, 1.0).unwrap();
    let runtime = run(&m);
    let err = rel_l2(&runtime, &merged_out);
    println!(
        "runtime vs merged rel L2 {err:.2e}; vs diffusers {:.2e}",
        rel_l2(&runtime, &expected("lightning"))
    );
    assert!(err <= 1e-5, "runtime vs merged: {err:.3e}");
    assert!(rel_l2(&runtime, &expected("lightning")) <= 1e-4);

    // Two LoRAs at once, then remove one without reloading: half strength twice = full strength.
    let other = LoraWeights::load(&dir().join("kohya.safetensors"), base.num_layers()).unwrap();
    assert_eq!(lora.detach(&mut m, id), 25);
    assert_eq!(run(&m), plain, "detaching must restore the plain model exactly");
    let a = lora.attach(&mut m, 0.5).unwrap();
    let half = run(&m);
    let e = rel_l2(&half, &expected("lightning_half"));
    println!("half strength vs diffusers set_adapters(0.5): {e:.2e}");
    assert!(e <= 1e-4);
    let b = other.attach(&mut m, 0.5).unwrap();
    assert!(rel_l2(&run(&m), &expected("lightning")) <= 1e-4);
    assert_eq!(qwen_image_pipeline::lora::attached_adapters(&m), vec![a, b]);
    other.detach(&mut m, b);
    assert!(rel_l2(&run(&m), &half) <= 1e-6);
}

#[test]
fn the_fixture_catches_a_wrong_scale() {
    // Ignoring alpha (scale 1 instead of alpha/rank = 0.5) must break parity.
    let base = model();
    let mut lora = LoraWeights::load(&dir().join("lightning.safetensors"), base.num_layers()).unwrap();
    lora.modules.values_mut().for_each(|m| m.alpha = None);
    let mut m = base.clone();
    lora.merge_into(&mut m, 1.0).unwrap();
    let err = rel_l2(&run(&m), &expected("lightning"));
    assert!(err > 1e-2, "dropping alpha changed the output by only {err:.2e}");
}

/// Writes `tensors` (name, safetensors dtype, shape, little-endian bytes) as a safetensors file.
fn write_raw(path: &Path, tensors: &[(String, &str, Vec<usize>, Vec<u8>)]) {
    let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
    for (name, dtype, shape, bytes) in tensors {
        let offsets = [data.len(), data.len() + bytes.len()];
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": offsets}),
        );
        data.extend_from_slice(bytes);
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    file.extend(data);
    std::fs::write(path, file).unwrap();
}

#[test]
fn integer_alphas_are_read_as_their_value() {
    // The Lightning file with every `.alpha` stored as an integer scalar: I64 0-d and I32 [1], alternately.
    let base = model();
    let source = TensorFile::open(&dir().join("lightning.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for (i, name) in source.names().into_iter().enumerate() {
        let (values, shape) = source.f32(name).unwrap();
        let entry = if name.ends_with(".alpha") {
            let alpha = values[0];
            assert!(alpha.fract() == 0.0 && alpha > 0.0, "{name} = {alpha}");
            if i % 2 == 0 {
                (name.to_string(), "I64", vec![], (alpha as i64).to_le_bytes().to_vec())
            } else {
                (name.to_string(), "I32", vec![1], (alpha as i32).to_le_bytes().to_vec())
            }
        } else {
            (name.to_string(), "F32", shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
        };
        tensors.push(entry);
    }
    assert!(tensors.iter().any(|t| t.1 == "I64") && tensors.iter().any(|t| t.1 == "I32"));
    let p = tmp("int_alpha.safetensors");
    write_raw(&p, &tensors);
    let lora = LoraWeights::load(&p, base.num_layers()).unwrap();
    let float = LoraWeights::load(&dir().join("lightning.safetensors"), base.num_layers()).unwrap();
    assert_eq!(lora.modules, float.modules);
    let mut m = base.clone();
    lora.merge_into(&mut m, 1.0).unwrap();
    assert!(rel_l2(&run(&m), &expected("lightning")) <= 1e-4);

    // An alpha that is not a scalar is still refused.
    let i = tensors.iter().position(|t| t.0.ends_with(".alpha")).unwrap();
    tensors[i] =
        (tensors[i].0.clone(), "I64", vec![2], [8i64, 8].iter().flat_map(|v| v.to_le_bytes()).collect());
    write_raw(&p, &tensors);
    let msg = LoraWeights::load(&p, base.num_layers()).unwrap_err().to_string();
    assert!(msg.contains("must be a scalar"), "{msg}");
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen-lora-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn loras_that_do_not_fit_are_clear_errors() {
    let base = model();
    let layers = base.num_layers();
    let dim = base.config.inner_dim();
    let down = |i: usize| (vec![0.1f32; 4 * i], vec![4, i]);
    let up = |o: usize| (vec![0.1f32; o * 4], vec![o, 4]);

    // Keys of another model / beyond the model's blocks.
    let p = tmp("unmatched.safetensors");
    let (d, ds) = down(dim);
    let (u, us) = up(dim);
    write_f32(
        &p,
        &[
            ("transformer_blocks.7.attn.to_q.lora_down.weight", d.clone(), ds.clone()),
            ("transformer_blocks.7.attn.to_q.lora_up.weight", u.clone(), us.clone()),
            ("double_blocks.0.img_attn.qkv.lora_down.weight", d.clone(), ds.clone()),
        ],
    )
    .unwrap();
    let err = LoraWeights::load(&p, layers).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PipelineError::Lora { .. }), "{msg}");
    assert!(msg.contains("transformer_blocks.7.attn.to_q") && msg.contains("double_blocks.0"), "{msg}");

    // Half a pair.
    let p = tmp("incomplete.safetensors");
    write_f32(&p, &[("transformer_blocks.0.attn.to_q.lora_down.weight", d.clone(), ds.clone())]).unwrap();
    let msg = LoraWeights::load(&p, layers).unwrap_err().to_string();
    assert!(msg.contains("incomplete") && msg.contains("transformer_blocks.0.attn.to_q"), "{msg}");

    // Shapes of another model size: detected before anything changes.
    let p = tmp("shape.safetensors");
    let (d2, ds2) = down(dim + 8);
    write_f32(
        &p,
        &[
            ("transformer_blocks.0.attn.to_k.lora_down.weight", d2, ds2),
            ("transformer_blocks.0.attn.to_k.lora_up.weight", u.clone(), us.clone()),
        ],
    )
    .unwrap();
    let lora = LoraWeights::load(&p, layers).unwrap();
    let mut m = base.clone();
    let msg = lora.merge_into(&mut m, 1.0).unwrap_err().to_string();
    assert!(msg.contains("transformer_blocks.0.attn.to_k") && msg.contains("does not match"), "{msg}");
    assert!(lora.attach(&mut m, 1.0).is_err());
    assert_eq!(run(&m), run(&base), "a failed merge must leave the model unchanged");

    // Not a LoRA at all, and a missing file.
    let p = tmp("empty.safetensors");
    write_f32(&p, &[("transformer_blocks.0.attn.to_q.weight", u, us)]).unwrap();
    assert!(LoraWeights::load(&p, layers).is_err());
    assert!(LoraWeights::load(&tmp("missing.safetensors"), layers).is_err());
}
