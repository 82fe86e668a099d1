//! FP8 weights (crates/qwen-image/src/quant, docs/fp8.md): the e4m3 rounding, the per-channel weight quantization
//! and the FP8 GEMM against PyTorch (fixtures from `tools/fixtures/fp8.py`), the whole DiT in FP8 against the
//! unquantized one, LoRAs on an FP8 base, pre-quantized ("scaled fp8") checkpoints, and the errors.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Tensor};
use qwen_image::{
    dit::{
        dit_linear_plan, DitConfig, DitInput, DitLoadOptions, ImageShape, ModulationMode,
        QwenImageTransformer,
    },
    nn::{Linear, LinearWeight},
    ops::QwenBackend,
    quant::{e4m3, Fp8Options, Fp8Weight},
    tensor_io::{rel_l2, to_f32_vec, TensorFile},
    weights::WeightStore,
    CpuBackend, ModelError,
};
use qwen_image_edit::reference::dit_forward;
use qwen_image_pipeline::{lora::LoraWeights, PipelineError};

type B = CpuBackend;

fn fixtures(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn pytorch() -> TensorFile {
    TensorFile::open(&fixtures("fp8/e4m3.safetensors")).unwrap()
}

fn bytes(file: &TensorFile, name: &str) -> Vec<u8> {
    file.i64(name).unwrap().0.into_iter().map(|b| b as u8).collect()
}

fn fp8(keep: Option<&[&str]>) -> DitLoadOptions {
    let fp8 = keep.map_or_else(Fp8Options::default, |k| Fp8Options::keeping(k.iter().copied()));
    DitLoadOptions { fp8: Some(fp8), ..Default::default() }
}

fn load(dir: &Path, dtype: DType, options: &DitLoadOptions) -> QwenImageTransformer<B> {
    QwenImageTransformer::load_with(dir, dtype, options, &Default::default()).unwrap()
}

fn plain() -> PathBuf {
    fixtures("dit/plain/transformer")
}

fn velocity(model: &QwenImageTransformer<B>) -> Vec<f32> {
    dit_forward(model, &fixtures("dit/plain/inputs.safetensors")).unwrap().0
}

/// Every linear layer of the model with its name (the struct's fields, so that a test can change them).
fn linears(model: &mut QwenImageTransformer<B>) -> Vec<(String, &mut Linear<B>)> {
    let mut out: Vec<(String, &mut Linear<B>)> = vec![
        ("img_in".into(), &mut model.img_in),
        ("txt_in".into(), &mut model.txt_in),
        ("time_text_embed.timestep_embedder.linear_1".into(), &mut model.time_embed.linear_1),
        ("time_text_embed.timestep_embedder.linear_2".into(), &mut model.time_embed.linear_2),
        ("norm_out.linear".into(), &mut model.norm_out),
        ("proj_out".into(), &mut model.proj_out),
    ];
    for (i, block) in model.blocks.iter_mut().enumerate() {
        let a = &mut block.attn;
        let layers: [(&str, &mut Linear<B>); 12] = [
            ("attn.to_q", &mut a.to_q),
            ("attn.to_k", &mut a.to_k),
            ("attn.to_v", &mut a.to_v),
            ("attn.add_q_proj", &mut a.add_q_proj),
            ("attn.add_k_proj", &mut a.add_k_proj),
            ("attn.add_v_proj", &mut a.add_v_proj),
            ("attn.to_out.0", &mut a.to_out),
            ("attn.to_add_out", &mut a.to_add_out),
            ("img_mlp.net.0.proj", &mut block.img_mlp.proj_in),
            ("img_mlp.net.2", &mut block.img_mlp.proj_out),
            ("txt_mlp.net.0.proj", &mut block.txt_mlp.proj_in),
            ("txt_mlp.net.2", &mut block.txt_mlp.proj_out),
        ];
        out.extend(layers.into_iter().map(|(n, l)| (format!("transformer_blocks.{i}.{n}"), l)));
    }
    out
}

fn bits_and_scales(w: &Fp8Weight<B>) -> (Vec<u8>, Vec<f32>) {
    (w.bits.clone().into_data().iter::<u8>().collect(), to_f32_vec(w.scales.clone()))
}

#[test]
fn e4m3_rounding_matches_pytorch() {
    let file = pytorch();
    let (values, _) = file.f32("values").unwrap();
    let want = bytes(&file, "values_bits");
    let mismatches: Vec<String> = values
        .iter()
        .zip(&want)
        .filter(|(v, b)| e4m3::encode(**v) != **b)
        .map(|(v, b)| format!("{v:e}: ours {:#04x}, PyTorch {b:#04x}", e4m3::encode(*v)))
        .collect();
    assert!(mismatches.is_empty(), "{} of {} differ: {:?}", mismatches.len(), values.len(), &mismatches[..]);
    // The fixture covers what matters: ties, subnormals and saturation.
    assert!(values.len() > 5000 && want.contains(&0x7E) && want.contains(&0x80) && want.contains(&0x01));
}

#[test]
fn per_channel_weight_quantization_matches_pytorch() {
    let file = pytorch();
    let weight: Tensor<B, 2> = file.tensor("weight", &Default::default()).unwrap();
    let q = Fp8Weight::quantize(weight.cast(DType::BF16));
    let (bits, scales) = bits_and_scales(&q);
    assert_eq!(scales, file.f32("weight_scales").unwrap().0);
    assert_eq!(bits, bytes(&file, "weight_bits"));
    assert_eq!(scales[7], 1.0, "the all-zero row keeps scale 1");
}

#[test]
fn the_fp8_linear_matches_pytorch_scaled_mm() {
    let file = pytorch();
    let dev = Default::default();
    let q = Fp8Weight::quantize(file.tensor::<B, 2>("weight", &dev).unwrap().cast(DType::BF16));
    let (x, bias) = (file.tensor::<B, 3>("x", &dev).unwrap(), file.tensor::<B, 1>("bias", &dev).unwrap());
    let y = to_f32_vec(B::dense_fp8(x, &q, Some(&bias)));
    let err = rel_l2(&y, &file.f32("linear").unwrap().0);
    println!("FP8 linear vs torch._scaled_mm: rel L2 {err:.2e}");
    assert!(err <= 1e-6, "{err:.3e}");
}

#[test]
fn the_fp8_dit_stays_close_to_the_unquantized_one() {
    let dense = velocity(&load(&plain(), DType::F32, &Default::default()));
    let err = rel_l2(&velocity(&load(&plain(), DType::F32, &fp8(None))), &dense);
    let all = rel_l2(&velocity(&load(&plain(), DType::F32, &fp8(Some(&[])))), &dense);
    let bf16 = rel_l2(&velocity(&load(&plain(), DType::BF16, &Default::default())), &dense);
    let bf16_fp8 = rel_l2(&velocity(&load(&plain(), DType::BF16, &fp8(None))), &dense);
    println!(
        "velocity rel L2 vs f32: fp8 (default keep list) {err:.2e}, fp8 every layer {all:.2e}, bf16 {bf16:.2e}, \
         bf16 + fp8 {bf16_fp8:.2e}"
    );
    assert!(err > 1e-4 && err < 0.05, "fp8 vs f32: {err:.3e}");
    assert!(all >= err && all < 0.08, "fp8 on every layer: {all:.3e}");
    assert!(bf16_fp8 < 0.05, "bf16 + fp8 vs f32: {bf16_fp8:.3e}");
    // A broken scale layout must fall far outside that bound. The fixture's rows all have about the same magnitude
    // (i.i.d. random weights), so give every layer's rows magnitudes 2⁻³…2³ first, then compare the quantized
    // model with the right per-channel scales and with each layer's scales in reverse order.
    let mut scaled = load(&plain(), DType::F32, &Default::default());
    for (_, layer) in linears(&mut scaled) {
        let [out, _] = layer.weight.dims();
        let factors: Vec<f32> = (0..out).map(|n| 2f32.powf(((n * 7919) % 61) as f32 / 10.0 - 3.0)).collect();
        let f = Tensor::<B, 1>::from_floats(factors.as_slice(), &Default::default()).unsqueeze_dim(1);
        layer.weight = (layer.weight.to_dense() * f).into();
    }
    let reference = velocity(&scaled);
    let keep = Fp8Options::default();
    let quantize = |model: &mut QwenImageTransformer<B>, reverse: bool| {
        for (name, layer) in linears(model) {
            if !keep.keeps(&name) {
                let mut w = Fp8Weight::quantize(layer.weight.to_dense());
                if reverse {
                    w.scales = w.scales.clone().flip([0]);
                }
                layer.weight = LinearWeight::Fp8(w);
            }
        }
    };
    let (mut right, mut broken) = (scaled.clone(), scaled);
    quantize(&mut right, false);
    quantize(&mut broken, true);
    let (right, broken) = (rel_l2(&velocity(&right), &reference), rel_l2(&velocity(&broken), &reference));
    println!("rows of different magnitudes: fp8 {right:.2e}, with reversed per-channel scales {broken:.2e}");
    assert!(right < 0.15, "{right:.3e}");
    assert!(broken > 4.0 * right && broken > 0.4, "{broken:.3e}");
}

#[test]
fn the_keep_list_decides_which_layers_are_fp8_and_the_dry_run_plan_agrees() {
    let config = load(&plain(), DType::F32, &Default::default()).config;
    // `txt_in` (24 inputs) does not fit the FP8 GEMM and stays dense whatever the keep list says.
    for (keep, fp8_layers) in [(None, 33), (Some(&[][..]), 47), (Some(&["attn", "img_in"][..]), 48 - 2 - 24)]
    {
        let options = DitLoadOptions { modulation: ModulationMode::Resident, ..fp8(keep) };
        let loaded = load(&plain(), DType::BF16, &options).linear_weights();
        assert_eq!(loaded.fp8_layers, fp8_layers, "{keep:?}");
        assert_eq!(loaded.dense_layers + loaded.fp8_layers, 48);
        assert_eq!(loaded, dit_linear_plan(&config, DType::BF16, &options).unwrap(), "{keep:?}");
        assert!(loaded.fp8_bytes < loaded.fp8_unquantized_bytes && loaded.saved_bytes() > 0);
    }
    // In table mode the modulation layers stay on the host and are counted apart; without FP8 nothing is quantized.
    let table = load(&plain(), DType::BF16, &fp8(None)).linear_weights();
    assert_eq!((table.fp8_layers, table.host_layers, table.dense_layers), (33, 6, 9));
    let none = load(&plain(), DType::F32, &Default::default()).linear_weights();
    assert_eq!((none.fp8_layers, none.keep.as_ref()), (0, None));
}

#[test]
fn a_lora_on_an_fp8_base_is_the_quantized_merged_model() {
    let dir = fixtures("pipeline/lora");
    let lora = LoraWeights::load(&dir.join("lightning.safetensors"), 2).unwrap();
    let inputs = dir.join("inputs.safetensors");
    let transformer = dir.join("transformer");
    // quantize(merge(base, lora)): merged in f32, then every layer the FP8 model quantizes is quantized.
    let mut fp8_model = load(&transformer, DType::F32, &fp8(None));
    assert_eq!(lora.merge_into(&mut fp8_model, 1.0).unwrap(), 25);
    let mut expected = load(&transformer, DType::F32, &Default::default());
    lora.merge_into(&mut expected, 1.0).unwrap();
    let mut quantized = 0;
    for ((name, got), (_, want)) in linears(&mut fp8_model).into_iter().zip(linears(&mut expected)) {
        match &got.weight {
            LinearWeight::Fp8(g) => {
                let w = Fp8Weight::quantize(want.weight.to_dense());
                assert_eq!(bits_and_scales(g), bits_and_scales(&w), "{name}");
                want.weight = LinearWeight::Fp8(w);
                quantized += 1;
            }
            LinearWeight::Dense(g) => assert_eq!(to_f32_vec(g.clone()), to_f32_vec(want.weight.to_dense())),
        }
    }
    assert_eq!(quantized, 2 * 11, "every block layer but img_mlp.net.2");
    let (got, want) =
        (dit_forward(&fp8_model, &inputs).unwrap().0, dit_forward(&expected, &inputs).unwrap().0);
    assert_eq!(
        got, want,
        "the FP8 model with the LoRA merged is bit-identical to quantize(merge(base, lora))"
    );
    // The LoRA changed the output: the merge reached the quantized weights.
    let base = dit_forward(&load(&transformer, DType::F32, &fp8(None)), &inputs).unwrap().0;
    assert!(rel_l2(&got, &base) > 1e-3);
    // Runtime adapters on an FP8 base run in the model's dtype next to it.
    let mut attached = load(&transformer, DType::F32, &fp8(None));
    lora.attach(&mut attached, 1.0).unwrap();
    let err = rel_l2(&dit_forward(&attached, &inputs).unwrap().0, &got);
    assert!(err < 0.05, "attached vs merged on FP8: {err:.3e}");
}

#[test]
fn a_prequantized_checkpoint_loads_as_fp8() {
    let scaled = fixtures("fp8/scaled/transformer");
    let mut pre = load(&scaled, DType::F32, &Default::default());
    let summary = pre.linear_weights();
    assert_eq!((summary.fp8_layers, summary.keep), (33, None));
    // Per-channel layers hold exactly what quantizing the unquantized checkpoint at load time gives.
    let mut at_load = load(&plain(), DType::F32, &fp8(None));
    let file = TensorFile::open(&scaled.join("diffusion_pytorch_model.safetensors")).unwrap();
    for ((name, a), (_, b)) in linears(&mut pre).into_iter().zip(linears(&mut at_load)) {
        match (&a.weight, &b.weight) {
            (LinearWeight::Fp8(a), _) if name == "transformer_blocks.1.attn.to_k" => {
                assert_eq!(to_f32_vec(a.values_f32()), file.f32(&format!("{name}.weight")).unwrap().0);
                let scale = file.f32(&format!("{name}.scale_weight")).unwrap().0[0];
                let scales = to_f32_vec(a.scales.clone());
                assert!(scales.iter().all(|&s| s == scale), "one scale for the tensor, broadcast");
            }
            (LinearWeight::Fp8(a), LinearWeight::Fp8(b)) => {
                assert_eq!(bits_and_scales(a), bits_and_scales(b))
            }
            (LinearWeight::Dense(a), LinearWeight::Dense(b)) => {
                assert_eq!(to_f32_vec(a.clone()), to_f32_vec(b.clone()))
            }
            _ => panic!("{name}: stored differently"),
        }
    }
    let err = rel_l2(&velocity(&pre), &velocity(&at_load));
    assert!(err < 1e-2, "{err:.3e}");
    // A keep list that names a pre-quantized layer dequantizes it.
    let keep = Fp8Options::parse_keep("default,to_q").unwrap();
    let options = DitLoadOptions { fp8: Some(keep), ..Default::default() };
    let kept = load(&scaled, DType::F32, &options).linear_weights();
    assert_eq!(kept.fp8_layers, 33 - 3);
}

#[test]
fn merging_a_lora_into_prequantized_weights_is_refused_before_anything_changes() {
    let dir = fixtures("pipeline/lora");
    let lora = LoraWeights::load(&dir.join("lightning.safetensors"), 2).unwrap();
    // The LoRA fixture's model, with to_q of block 0 stored quantized (as a pre-quantized checkpoint would).
    let mut model = load(&dir.join("transformer"), DType::F32, &Default::default());
    let w = Fp8Weight::quantize(model.blocks[0].attn.to_q.weight.to_dense());
    let (bits, scales) = (w.bits.clone(), w.scales.clone());
    model.blocks[0].attn.to_q.weight =
        LinearWeight::Fp8(Fp8Weight::from_parts(bits, scales, DType::F32).unwrap());
    let before = dit_forward(&model, &dir.join("inputs.safetensors")).unwrap().0;
    let err = lora.merge_into(&mut model, 1.0).unwrap_err();
    assert!(matches!(err, PipelineError::Lora { .. }), "{err}");
    assert!(
        err.to_string().contains("transformer_blocks.0.attn.to_q") && err.to_string().contains("attach"),
        "{err}"
    );
    assert_eq!(dit_forward(&model, &dir.join("inputs.safetensors")).unwrap().0, before, "nothing changed");
    lora.attach(&mut model, 1.0).unwrap();
}

#[test]
fn bad_fp8_input_gives_clear_errors() {
    // Keep-list entries that name no layer, listed (checked before any weight is read).
    let err = QwenImageTransformer::<B>::load_with(
        &plain(),
        DType::F32,
        &fp8(Some(&["img_in", "attn.to_z", "blocks"])),
        &Default::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("attn.to_z, blocks"), "{err}");
    // FP8 on a model without weights: the folder holds only the config.
    let empty = std::env::temp_dir().join(format!("qwen-fp8-no-weights-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(plain().join("config.json"), empty.join("config.json")).unwrap();
    let err = QwenImageTransformer::<B>::load_with(&empty, DType::BF16, &fp8(None), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors") && err.contains("neither"), "{err}");
    let _ = std::fs::remove_dir_all(&empty);
    // Parts of an FP8 weight that do not fit together.
    let dev = Default::default();
    let bits = Fp8Weight::<B>::quantize(Tensor::ones([4, 8], &dev)).bits;
    let err = Fp8Weight::from_parts(bits, Tensor::ones([3], &dev), DType::F32).unwrap_err().to_string();
    assert!(err.contains("4 f32 scales"), "{err}");
    assert!(Fp8Options::parse_keep("img_in,,proj_out").unwrap_err().to_string().contains("empty entry"));
}

/// The pruning cache in 8 bits (`Fp8Options::cache`): a caching step's output does not change, the cache's K and V
/// take a byte per value and a scale per token, and a step reusing them (the condition images as `cat` does, and a
/// target subset whose other tokens come from the cache) stays close to the same step with the cache in the model's
/// dtype, without being equal to it.
#[test]
fn an_fp8_cache_holds_a_byte_per_value_and_reused_steps_stay_close() {
    use qwen_image_pruning::{
        full_cache_plan, GroupAction, GroupPlan, LayerPlan, ReuseMode, StepPlan, TokenPruningCache,
    };
    let with_cache = |cache: bool| DitLoadOptions {
        fp8: Some(Fp8Options { cache, ..Fp8Options::default() }),
        ..Default::default()
    };
    let (dense, eight) =
        (load(&plain(), DType::F32, &with_cache(false)), load(&plain(), DType::F32, &with_cache(true)));
    assert!(eight.fp8_cache() && !dense.fp8_cache());
    let file = TensorFile::open(&fixtures("dit/plain/inputs.safetensors")).unwrap();
    let input = qwen_image_edit::reference::read_dit_input::<B>(&file, dense.device()).unwrap();
    let layout = input.layout();
    let (layers, n, t) = (dense.num_layers(), layout.condition_tokens.len(), layout.target_tokens);
    let (mut dense_cache, mut eight_cache) = (TokenPruningCache::new(), TokenPruningCache::new());
    let plan = full_cache_plan(layers, n);
    let (a, _) = dense.forward_planned(&input, &plan, 0, &mut dense_cache).unwrap();
    let (b, _) = eight.forward_planned(&input, &plan, 0, &mut eight_cache).unwrap();
    assert_eq!(to_f32_vec(a), to_f32_vec(b), "caching changed the caching step's output");
    // Per cached token: K and V at 4 bytes per value (f32) against 1 byte per value and a 4-byte scale each.
    let inner = dense.config.inner_dim();
    let cached_tokens = layers * (t + layout.condition_tokens.iter().sum::<usize>());
    assert_eq!(
        dense_cache.size_bytes() - eight_cache.size_bytes(),
        cached_tokens * 2 * (4 * inner - (inner + 4)),
    );
    let cat =
        StepPlan::new(vec![LayerPlan::with_conditions(n, GroupAction::Reuse(ReuseMode::KeyValue)); layers]);
    let subset = StepPlan::new(vec![
        LayerPlan {
            target: GroupPlan::subset((0..t as u32).filter(|i| i % 2 == 0).collect(), ReuseMode::KeyValue),
            ..LayerPlan::with_conditions(n, GroupAction::Reuse(ReuseMode::KeyValue))
        };
        layers
    ]);
    for (name, plan) in [("conditions reused", cat), ("a target subset", subset)] {
        let (a, _) = dense.forward_planned(&input, &plan, 1, &mut dense_cache).unwrap();
        let (b, _) = eight.forward_planned(&input, &plan, 1, &mut eight_cache).unwrap();
        let err = rel_l2(&to_f32_vec(b), &to_f32_vec(a));
        println!("{name}: velocity with the 8-bit cache vs the f32 cache, rel L2 {err:.2e}");
        assert!(err > 1e-5 && err < 2e-2, "{name}: {err:.3e}");
    }
}

/// The velocity error of FP8 against bf16 at the real width (D = 3072, K up to 12288) on two blocks with random
/// weights: minutes on a CPU, so ignored by default (`cargo test --release --test fp8 -- --ignored --nocapture`).
/// The full 60-block number needs the GPU override (docs/fp8.md).
#[test]
#[ignore]
fn full_width_blocks_in_fp8_against_bf16() {
    let config = DitConfig { num_layers: 2, ..DitConfig::default() };
    let dev = Default::default();
    let model = |options: &DitLoadOptions| {
        let mut store = WeightStore::random(DType::BF16, 5);
        QwenImageTransformer::<B>::from_store_with(config.clone(), &mut store, options, &dev).unwrap()
    };
    let randn = |shape: [usize; 3]| {
        Tensor::<B, 3>::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), &dev).cast(DType::BF16)
    };
    let input = DitInput {
        hidden_states: randn([1, 2 * 128, config.in_channels]),
        encoder_hidden_states: randn([1, 32, config.joint_attention_dim]),
        encoder_hidden_states_mask: None,
        timestep: vec![0.75],
        img_shapes: vec![ImageShape::new(8, 16), ImageShape::new(8, 16)],
        modulation: None,
    };
    let bf16 = to_f32_vec(model(&Default::default()).forward(&input).unwrap());
    for (name, keep) in [("default keep list", None), ("every layer", Some(&[][..]))] {
        let fp8 = to_f32_vec(model(&fp8(keep)).forward(&input).unwrap());
        let err = rel_l2(&fp8, &bf16);
        println!(
            "2 full-width blocks, random weights, 288 tokens: fp8 ({name}) vs bf16 velocity rel L2 {err:.3e}"
        );
        assert!(err < 0.1, "{err:.3e}");
    }
}
