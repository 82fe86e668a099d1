//! Qwen2.5-VL text-encoder parity against transformers (fixtures from `tools/fixtures/text_encoder.py`): the vision
//! tower, the last hidden state with zero, one and two images, padding, both key namings and config layouts, bf16,
//! the example's code path, clear errors, and checks that the fixtures catch the classic porting mistakes.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Int, Tensor, TensorData};
use qwen_image::{
    quant::Fp8Options,
    tensor_io::{rel_l2, to_f32_vec, write_f32, TensorFile},
    text_encoder::{
        language::DecoderLayers, GridThw, PositionMode, Qwen25VlTextEncoder, TextEncoderInput,
        TextEncoderLoadOptions, TokenTensor, TEXT_ENCODER_FP8_KEEP,
    },
    CpuBackend, ModelError,
};
use qwen_image_edit::reference::{read_text_encoder_input, text_encode};

type B = CpuBackend;
type Model = Qwen25VlTextEncoder<B>;

/// `legacy` cases (f32 weights, legacy names, flat config, one file).
const CASES: [&str; 4] = ["two_images", "one_image", "text_only", "padded"];
const IMAGE_CASES: [&str; 3] = ["two_images", "one_image", "padded"];

fn root(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text_encoder").join(model)
}

fn load(model: &str, dtype: DType) -> Model {
    Model::load(&root(model).join("text_encoder"), dtype, &Default::default()).unwrap()
}

fn inputs_path(model: &str, case: &str) -> PathBuf {
    root(model).join(format!("{case}_inputs.safetensors"))
}

fn input(model: &str, case: &str) -> TextEncoderInput<B> {
    read_text_encoder_input(&TensorFile::open(&inputs_path(model, case)).unwrap(), &Default::default())
        .unwrap()
}

fn expected(model: &str, case: &str, suffix: &str, name: &str) -> Vec<f32> {
    TensorFile::open(&root(model).join(format!("{case}_{suffix}.safetensors"))).unwrap().f32(name).unwrap().0
}

/// Which output rows are real tokens (the attention mask, or all rows).
fn valid_rows(model: &str, case: &str, rows: usize) -> Vec<bool> {
    let file = TensorFile::open(&inputs_path(model, case)).unwrap();
    match file.i64("attention_mask") {
        Ok((mask, _)) => mask.iter().map(|&m| m == 1).collect(),
        Err(_) => vec![true; rows],
    }
}

/// Relative L2 error over the real tokens' rows; also checks that padded rows are zero.
fn hidden_error(out: &[f32], want: &[f32], valid: &[bool]) -> f64 {
    let width = out.len() / valid.len();
    let pick = |v: &[f32], keep: bool| -> Vec<f32> {
        v.chunks(width).zip(valid).filter(|(_, &ok)| ok == keep).flat_map(|(row, _)| row.to_vec()).collect()
    };
    assert!(pick(out, false).iter().all(|&x| x == 0.0), "padded rows are not zero");
    rel_l2(&pick(out, true), &pick(want, true))
}

fn run(model: &Model, input: &TextEncoderInput<B>) -> Vec<f32> {
    to_f32_vec(model.forward(input).unwrap())
}

fn case_error(model_name: &str, model: &Model, case: &str, suffix: &str) -> f64 {
    let out = run(model, &input(model_name, case));
    let want = expected(model_name, case, suffix, "last_hidden_state");
    assert_eq!(out.len(), want.len(), "{case}: output size");
    hidden_error(&out, &want, &valid_rows(model_name, case, out.len() / model.hidden_size()))
}

fn vision_error(model_name: &str, model: &Model, case: &str, suffix: &str) -> f64 {
    let input = input(model_name, case);
    let out = model.vision_forward(input.pixel_values.clone().unwrap(), &input.image_grid_thw).unwrap();
    let want = expected(model_name, case, suffix, "image_embeds");
    let out = to_f32_vec(out);
    assert_eq!(out.len(), want.len(), "{case}: vision output size");
    rel_l2(&out, &want)
}

#[test]
fn vision_tower_matches_transformers_f32() {
    let legacy = load("legacy", DType::F32);
    for case in IMAGE_CASES {
        let err = vision_error("legacy", &legacy, case, "expected");
        println!("legacy {case}: vision rel L2 {err:.2e}");
        assert!(err <= 1e-4, "{case}: vision relative L2 error {err:.3e} > 1e-4");
    }
    let held = load("heldout", DType::F32);
    let err = vision_error("heldout", &held, "heldout", "expected");
    println!("heldout: vision rel L2 {err:.2e}");
    assert!(err <= 1e-4, "heldout: vision relative L2 error {err:.3e} > 1e-4");
}

#[test]
fn padded_vision_mlps_still_match_transformers() {
    // On CUDA the vision MLPs' hidden width is padded with zero features (3420 → 3424, `dense_width_multiple`); the
    // CPU does not pad, so the same padding is forced here (48 → 64) and the tower must still match transformers.
    let mut legacy = load("legacy", DType::F32);
    let width = legacy.vision.blocks[0].mlp.gate_proj.out_dim();
    for block in &mut legacy.vision.blocks {
        block.mlp = block.mlp.clone().pad_intermediate(32);
        assert_eq!(block.mlp.gate_proj.out_dim(), width.next_multiple_of(32));
        assert_eq!(block.mlp.down_proj.in_dim(), width.next_multiple_of(32));
    }
    assert!(width % 32 != 0, "the fixture's width {width} would not be padded");
    for case in IMAGE_CASES {
        let err = vision_error("legacy", &legacy, case, "expected");
        println!(
            "legacy {case}, MLPs padded {width} -> {}: vision rel L2 {err:.2e}",
            width.next_multiple_of(32)
        );
        assert!(err <= 1e-4, "{case}: padded vision relative L2 error {err:.3e} > 1e-4");
    }
}

#[test]
fn last_hidden_state_matches_transformers_f32() {
    // legacy: legacy key names, flat config, one f32 file. heldout: transformers 5 names, nested config, bf16 shards.
    let legacy = load("legacy", DType::F32);
    for case in CASES {
        let err = case_error("legacy", &legacy, case, "expected");
        println!("legacy {case}: rel L2 {err:.2e}");
        assert!(err <= 1e-4, "{case}: relative L2 error {err:.3e} > 1e-4");
    }
    let held = load("heldout", DType::F32);
    let err = case_error("heldout", &held, "heldout", "expected");
    println!("heldout: rel L2 {err:.2e}");
    assert!(err <= 1e-4, "heldout: relative L2 error {err:.3e} > 1e-4");
}

#[test]
fn bf16_matches_transformers_bf16() {
    let legacy = load("legacy", DType::BF16);
    for case in CASES {
        let err = case_error("legacy", &legacy, case, "expected_bf16");
        println!("legacy {case} bf16: rel L2 {err:.2e}");
        assert!(err <= 2e-2, "{case}: bf16 relative L2 error {err:.3e} > 2e-2");
    }
    for case in IMAGE_CASES {
        let err = vision_error("legacy", &legacy, case, "expected_bf16");
        println!("legacy {case} bf16: vision rel L2 {err:.2e}");
        assert!(err <= 2e-2, "{case}: bf16 vision relative L2 error {err:.3e} > 2e-2");
    }
    let held = load("heldout", DType::BF16);
    let err = case_error("heldout", &held, "heldout", "expected_bf16");
    println!("heldout bf16: rel L2 {err:.2e}");
    assert!(err <= 2e-2, "heldout: bf16 relative L2 error {err:.3e} > 2e-2");
}

#[test]
fn sequential_positions_match_transformers_without_token_types() {
    // transformers 5 computes M-RoPE positions only when `mm_token_type_ids` is passed; diffusers does not pass it.
    let model = load("legacy", DType::F32);
    let out = run(&model, &input("legacy", "one_image").with_positions(PositionMode::Sequential));
    let want = expected("legacy", "one_image", "expected", "last_hidden_state_sequential");
    let err = rel_l2(&out, &want);
    let multimodal = expected("legacy", "one_image", "expected", "last_hidden_state");
    let apart = rel_l2(&multimodal, &want);
    println!("sequential positions: rel L2 {err:.2e} (the two modes differ by {apart:.2e})");
    assert!(err <= 1e-4, "relative L2 error {err:.3e} > 1e-4");
    assert!(apart > 1e-2, "the fixture does not tell the position modes apart ({apart:.2e})");
}

#[test]
fn the_example_code_path_matches_on_the_heldout_checkpoint() {
    let model = load("heldout", DType::F32);
    let (out, shape) =
        text_encode(&model, &inputs_path("heldout", "heldout"), PositionMode::Multimodal).unwrap();
    assert_eq!(shape, vec![1, 31, 48]);
    let err = rel_l2(&out, &expected("heldout", "heldout", "expected", "last_hidden_state"));
    println!("text_encode on heldout: rel L2 {err:.2e}");
    assert!(err <= 1e-4, "relative L2 error {err:.3e} > 1e-4");
}

#[test]
fn image_embeds_and_device_token_ids_give_the_same_result() {
    let model = load("legacy", DType::F32);
    let base = input("legacy", "two_images");
    let reference = run(&model, &base);
    // Precomputed vision output (reuse across edits of one image).
    let embeds = model.vision_forward(base.pixel_values.clone().unwrap(), &base.image_grid_thw).unwrap();
    let mut reuse = base.clone();
    reuse.pixel_values = None;
    let reuse = reuse.with_image_embeds(embeds, base.image_grid_thw.clone());
    assert_eq!(run(&model, &reuse), reference);
    // Token ids as a device tensor.
    let (ids, shape) = base.input_ids.to_host().unwrap();
    let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let mut device = base.clone();
    device.input_ids =
        TokenTensor::Device(Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), &Default::default()));
    assert_eq!(run(&model, &device), reference);
}

/// Copies the legacy checkpoint into a temporary folder, with its keys renamed by `rename` and its config edited.
fn rewritten_checkpoint(
    tag: &str,
    rename: impl Fn(&str) -> Vec<String>,
    config: impl Fn(String) -> String,
) -> PathBuf {
    let src = root("legacy").join("text_encoder");
    let dir = std::env::temp_dir().join(format!("qwen-te-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = TensorFile::open(&src.join("model.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for name in file.names() {
        let (values, shape) = file.f32(name).unwrap();
        for new in rename(name) {
            tensors.push((new, values.clone(), shape.clone()));
        }
    }
    let named: Vec<(&str, Vec<f32>, Vec<usize>)> =
        tensors.iter().map(|(n, v, s)| (n.as_str(), v.clone(), s.clone())).collect();
    write_f32(&dir.join("model.safetensors"), &named).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config(std::fs::read_to_string(src.join("config.json")).unwrap()),
    )
    .unwrap();
    dir
}

fn v5_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("visual.") {
        format!("model.visual.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.") {
        format!("model.language_model.{rest}")
    } else {
        name.to_string()
    }
}

#[test]
fn both_key_namings_load_the_same_weights() {
    let legacy = load("legacy", DType::F32);
    let dir = rewritten_checkpoint("v5", |n| vec![v5_name(n)], |c| c);
    let v5 = Model::load(&dir, DType::F32, &Default::default()).unwrap();
    let input = input("legacy", "two_images");
    assert_eq!(run(&v5, &input), run(&legacy, &input));

    // A checkpoint mixing both namings is refused.
    let mixed = rewritten_checkpoint(
        "mixed",
        |n| if n == "model.norm.weight" { vec![n.to_string(), v5_name(n)] } else { vec![n.to_string()] },
        |c| c,
    );
    let err = Model::load(&mixed, DType::F32, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("mixes"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&mixed).ok();
}

#[test]
fn checkpoint_errors_are_clear() {
    let dev = Default::default();
    // No folder at all.
    let err = Model::load(Path::new("/nonexistent/text_encoder"), DType::F32, &dev).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }) && err.to_string().contains("config.json"), "{err}");

    // A config without weights.
    let dir = std::env::temp_dir().join(format!("qwen-te-noweights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(root("legacy").join("text_encoder/config.json"), dir.join("config.json")).unwrap();
    let err = Model::load(&dir, DType::F32, &dev).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }) && err.to_string().contains("model.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).ok();

    // One layer more than the checkpoint holds: the missing key is named.
    let more = rewritten_checkpoint(
        "layers",
        |n| vec![n.to_string()],
        |c| c.replace("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4"),
    );
    let err = Model::load(&more, DType::F32, &dev).unwrap_err();
    assert!(
        matches!(err, ModelError::MissingKey { ref key, .. } if key.starts_with("model.layers.3.")),
        "{err}"
    );
    std::fs::remove_dir_all(&more).ok();

    // Another MLP width: a shape mismatch naming the key.
    let wide = rewritten_checkpoint(
        "width",
        |n| vec![n.to_string()],
        |c| c.replace("\"intermediate_size\": 48", "\"intermediate_size\": 64"),
    );
    let err = Model::load(&wide, DType::F32, &dev).unwrap_err();
    assert!(
        matches!(err, ModelError::ShapeMismatch { ref key, .. } if key == "visual.blocks.0.mlp.gate_proj.weight"),
        "{err}"
    );
    std::fs::remove_dir_all(&wide).ok();

    // Foreign keys are reported; lm_head is not.
    let extra = rewritten_checkpoint(
        "extra",
        |n| {
            if n == "model.norm.weight" {
                vec![n.to_string(), "model.extra.weight".into()]
            } else {
                vec![n.to_string()]
            }
        },
        |c| c,
    );
    let err = Model::load(&extra, DType::F32, &dev).unwrap_err();
    assert!(
        matches!(err, ModelError::UnexpectedKeys { .. }) && err.to_string().contains("model.extra"),
        "{err}"
    );
    assert!(!err.to_string().contains("lm_head"), "{err}");
    std::fs::remove_dir_all(&extra).ok();

    // Another architecture.
    let other = rewritten_checkpoint(
        "arch",
        |n| vec![n.to_string()],
        |c| c.replace("\"qwen2_5_vl\"", "\"qwen2_vl\""),
    );
    let err = Model::load(&other, DType::F32, &dev).unwrap_err();
    assert!(matches!(err, ModelError::Config { .. }) && err.to_string().contains("model_type"), "{err}");
    std::fs::remove_dir_all(&other).ok();
}

fn input_error(model: &Model, input: &TextEncoderInput<B>) -> String {
    let err = model.forward(input).unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    err.to_string()
}

#[test]
fn input_errors_are_clear() {
    let model = load("legacy", DType::F32);
    let base = input("legacy", "one_image");
    let (ids, _) = base.input_ids.to_host().unwrap();
    let image = model.config.image_token_id;

    // One image token too few, and one too many.
    let pos = ids.iter().position(|&i| i == image).unwrap();
    let mut fewer = ids.clone();
    fewer.remove(pos);
    let mut case = base.clone();
    case.input_ids = fewer.into();
    let msg = input_error(&model, &case);
    assert!(msg.contains("5 image tokens") && msg.contains("6 embeddings"), "{msg}");
    let mut more = ids.clone();
    more.insert(pos, image);
    case.input_ids = more.into();
    assert!(input_error(&model, &case).contains("7 image tokens"));

    // Image tokens without images.
    let mut no_images = TextEncoderInput::<B>::new(ids.clone());
    assert!(input_error(&model, &no_images).contains("0 embeddings"));
    no_images.image_grid_thw = vec![GridThw::new(1, 6, 4)];
    assert!(input_error(&model, &no_images).contains("without pixel_values"));

    // pixel_values of the wrong width, or not matching the grids.
    let pixels = base.pixel_values.clone().unwrap();
    let mut case = base.clone();
    case.pixel_values = Some(pixels.clone().narrow(1, 0, 1175));
    assert!(input_error(&model, &case).contains("1175 features"));
    case.pixel_values = Some(pixels.clone().narrow(0, 0, 20));
    assert!(input_error(&model, &case).contains("20 rows"));
    case.pixel_values = Some(pixels);
    case.image_grid_thw = vec![GridThw::new(1, 3, 8)];
    assert!(input_error(&model, &case).contains("multiples of spatial_merge_size"));

    // Token ids outside the vocabulary, masks of the wrong shape or masking everything, video tokens.
    let mut case = base.clone();
    let mut bad = ids.clone();
    bad[0] = 128;
    case.input_ids = bad.into();
    assert!(input_error(&model, &case).contains("outside the vocabulary"));
    let case = base.clone().with_attention_mask(vec![1; ids.len() - 1]);
    assert!(input_error(&model, &case).contains("attention_mask has shape"));
    let case = base.clone().with_attention_mask(vec![0; ids.len()]);
    assert!(input_error(&model, &case).contains("masks every token"));
    let mut case = base.clone();
    let mut video = ids.clone();
    video[1] = model.config.video_token_id;
    case.input_ids = video.into();
    assert!(input_error(&model, &case).contains("videos are not supported"));
}

/// Error of the legacy `two_images` output after `edit` changed the model.
fn perturbed_error(edit: impl Fn(&mut Model)) -> f64 {
    let mut model = load("legacy", DType::F32);
    edit(&mut model);
    let out = run(&model, &input("legacy", "two_images"));
    rel_l2(&out, &expected("legacy", "two_images", "expected", "last_hidden_state"))
}

/// Rows of a `[heads·head_dim, in]` projection reordered so that rotate-half on the result equals an interleaved
/// (`(2k, 2k+1)` pairs) rotation of the original: the "interleaved RoPE" porting mistake.
fn interleave_rows(w: Tensor<B, 2>, head_dim: usize) -> Tensor<B, 2> {
    let rows = w.dims()[0];
    let index: Vec<i32> = (0..rows)
        .map(|r| {
            let (head, i) = (r / head_dim, r % head_dim);
            let half = head_dim / 2;
            let src = if i < half { 2 * i } else { 2 * (i - half) + 1 };
            (head * head_dim + src) as i32
        })
        .collect();
    w.select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(index, [rows]), &Default::default()))
}

#[test]
fn the_fixtures_catch_porting_mistakes() {
    // Ten times the f32 tolerance: each mistake must stand out of the parity tolerance by an order of magnitude.
    let tol = 1e-3;
    let check = |what: &str, err: f64| {
        println!("{what}: rel L2 {err:.2e}");
        assert!(err > tol, "{what} changed the output by only {err:.2e}");
    };
    check(
        "interleaved instead of rotate-half M-RoPE",
        perturbed_error(|m| {
            let DecoderLayers::Device(layers) = &mut m.language.layers else { panic!("resident layers") };
            for layer in layers {
                let hd = layer.self_attn.head_dim;
                for proj in [&mut layer.self_attn.q_proj, &mut layer.self_attn.k_proj] {
                    proj.weight = interleave_rows(proj.weight.to_dense(), hd).into();
                    let bias = proj.bias.clone().unwrap();
                    let n = bias.dims()[0];
                    proj.bias = Some(interleave_rows(bias.reshape([n, 1]), hd).reshape([n]));
                }
            }
        }),
    );
    check(
        "interleaved instead of rotate-half vision rotary",
        perturbed_error(|m| {
            for block in &mut m.vision.blocks {
                let (hd, dim) = (block.attn.head_dim, block.attn.proj.out_dim());
                let qkv = &mut block.attn.qkv;
                let parts = qkv.weight.to_dense().split(dim, 0);
                let bias = qkv.bias.clone().unwrap().reshape([3 * dim, 1]).split(dim, 0);
                let mix = |p: Vec<Tensor<B, 2>>| {
                    Tensor::cat(
                        vec![
                            interleave_rows(p[0].clone(), hd),
                            interleave_rows(p[1].clone(), hd),
                            p[2].clone(),
                        ],
                        0,
                    )
                };
                qkv.weight = mix(parts).into();
                qkv.bias = Some(mix(bias).reshape([3 * dim]));
            }
        }),
    );
    check(
        "mrope_section [3, 3, 2] instead of [2, 3, 3]",
        perturbed_error(|m| m.config.text.mrope_section = [3, 3, 2]),
    );
    check("one window cell per window", perturbed_error(|m| m.vision.config.window_size = 28));
    check("windows of 4 cells", perturbed_error(|m| m.vision.config.window_size = 112));
    check(
        "full attention in every vision block",
        perturbed_error(|m| m.vision.blocks.iter_mut().for_each(|b| b.full_attention = true)),
    );
    check(
        "no full-attention block",
        perturbed_error(|m| m.vision.blocks.iter_mut().for_each(|b| b.full_attention = false)),
    );
    let model = load("legacy", DType::F32);
    let out = run(&model, &input("legacy", "two_images").with_positions(PositionMode::Sequential));
    check(
        "sequential instead of M-RoPE positions",
        rel_l2(&out, &expected("legacy", "two_images", "expected", "last_hidden_state")),
    );
}

#[test]
fn weights_left_on_the_host_give_the_same_outputs() {
    // Token embeddings on the host, decoder layers streamed, both: the same outputs bit for bit, and the device
    // and planned bytes moved by exactly the table and the parked layers. Both fixtures and dtype conversions
    // (legacy: f32 file in bf16; heldout: bf16 shards in f32), with dense and with FP8 linear layers.
    let cases = [("legacy", "two_images", DType::BF16, false), ("heldout", "heldout", DType::F32, true)];
    for (name, case, dtype, fp8) in cases {
        let dir = root(name).join("text_encoder");
        let config = qwen_image::text_encoder::Qwen25VlConfig::from_file(&dir.join("config.json")).unwrap();
        let load_with = |host_embeddings: bool, stream_layers: bool| {
            let mut store = Model::open_store(&dir, dtype).unwrap();
            if fp8 {
                store.quantize_linears(Some(Fp8Options::keeping(TEXT_ENCODER_FP8_KEEP)));
            }
            let options = TextEncoderLoadOptions { host_embeddings, stream_layers };
            let model =
                Model::from_store_with(config.clone(), &mut store, &options, &Default::default()).unwrap();
            (model, store.device_bytes(), store.planned_bytes())
        };
        let (device, device_bytes, device_plan) = load_with(false, false);
        assert_eq!(device.language.streamed_layer_bytes(), 0);
        let input = input(name, case);
        let want = run(&device, &input);
        let table = config.text.vocab_size * config.text.hidden_size * dtype.size();
        for (host_embeddings, stream_layers) in [(true, false), (false, true), (true, true)] {
            let what = format!("{name}, host embeddings {host_embeddings}, streamed layers {stream_layers}");
            let (model, bytes, plan) = load_with(host_embeddings, stream_layers);
            let layers: Vec<usize> = match &model.language.layers {
                DecoderLayers::Streamed { layers, .. } => layers.iter().map(|l| l.size_bytes()).collect(),
                DecoderLayers::Device(_) => vec![],
            };
            assert_eq!(layers.len(), if stream_layers { config.text.num_hidden_layers } else { 0 }, "{what}");
            let moved = if host_embeddings { table } else { 0 } + layers.iter().sum::<usize>();
            assert_eq!(device_bytes - bytes, moved, "{what}: device bytes");
            assert_eq!(plan.host, moved as u64, "{what}: planned on the host");
            assert_eq!(plan.device + plan.host, device_plan.device, "{what}: planned in all");
            let largest = layers.iter().max().copied().unwrap_or(0) as u64;
            assert_eq!(model.language.streamed_layer_bytes(), largest, "{what}: the streamed layer");
            assert_eq!(run(&model, &input), want, "{what}: same last hidden state");
        }
        let (host, ..) = load_with(true, true);
        let err = host.language.embed(&[0, config.text.vocab_size as i64]).unwrap_err().to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
    }
    // A store without files (the random full-size demo): the rows of the table it makes.
    let dir = root("legacy").join("text_encoder");
    let config = qwen_image::text_encoder::Qwen25VlConfig::from_file(&dir.join("config.json")).unwrap();
    let make = |host_embeddings: bool| {
        let mut store = qwen_image::weights::WeightStore::random(DType::F32, 5);
        let options = TextEncoderLoadOptions { host_embeddings, stream_layers: false };
        Model::from_store_with(config.clone(), &mut store, &options, &Default::default()).unwrap()
    };
    let ids = [3, 0, 7, 3];
    let (a, b) = (make(false).language.embed(&ids).unwrap(), make(true).language.embed(&ids).unwrap());
    assert_eq!(to_f32_vec(a), to_f32_vec(b));
}
