//! GPU correctness of whole networks and of weight loading on the CUDA fast path (feature `cuda`; needs an NVIDIA
//! GPU, so CI only compiles it). The fast operations one by one: `gpu_fast_ops.rs`.
//!
//! The tiny DiT and VAE fixtures run on the GPU and are compared with the CPU; the modulation table is compared bit
//! for bit with rows computed per call; the full-size FP8 DiT against bf16, and its 8-bit pruning cache against the
//! bf16 cache; weights are uploaded straight from the memory-mapped checkpoint.
//! Build and run as `gpu_fast_ops.rs` says.
#![cfg(feature = "cuda")]

mod gpu_support;

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Tensor, TensorData};
use gpu_support::{assert_fast, dev, randn, reset_stats, setup, stats, ATTENTION, CONV, FP8, G, GEMM, GLUE};
use qwen_image::{
    dit::{DitConfig, DitInput, DitLoadOptions, ImageShape, ModulationMode, QwenImageTransformer},
    ops::QwenBackend,
    quant::Fp8Options,
    synthetic,
    tensor_io::{rel_l2, to_f32_vec, TensorFile},
    text_encoder::{Qwen25VlConfig, Qwen25VlTextEncoder, TextEncoderLoadOptions, TEXT_ENCODER_FP8_KEEP},
    weights::WeightStore,
    CpuBackend,
};
use qwen_image_edit::reference::{dit_forward, read_dit_input, read_text_encoder_input};

// ---------------------------------------------------------------------------------------------------------------
// The DiT

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dit").join(case)
}

#[test]
fn tiny_dit_on_the_gpu_matches_the_cpu() {
    let _g = setup();
    // (`heldout`, head dim 8, is left out: its attention falls back to burn's own CUDA attention, whose autotuning
    // takes minutes per shape; the CPU parity tests cover that fixture.)
    for case in ["plain", "zero_cond"] {
        let dir = fixture(case);
        let inputs = dir.join("inputs.safetensors");
        let gpu = QwenImageTransformer::<G>::load(&dir.join("transformer"), DType::BF16, &dev()).unwrap();
        reset_stats();
        let (out, shape) = dit_forward(&gpu, &inputs).unwrap();
        let s = stats();
        let calls: Vec<u64> = s.iter().map(|k| k.calls).collect();
        let fallbacks: Vec<u64> = s.iter().map(|k| k.fallbacks).collect();
        println!("{case}: fast-path calls {calls:?}, fallbacks {fallbacks:?}");
        // GEMMs, attention and glue ran fast; no FP8 layer and no convolution here.
        assert!(
            [GEMM, ATTENTION, GLUE].iter().all(|&k| calls[k] > 0)
                && fallbacks.iter().all(|&f| f == 0)
                && calls[FP8] == 0
                && calls[CONV] == 0,
            "{case}: not all on the fast path: {s:?}"
        );
        let cpu = QwenImageTransformer::<CpuBackend>::load(
            &dir.join("transformer"),
            DType::BF16,
            &Default::default(),
        )
        .unwrap();
        let (want, _) = dit_forward(&cpu, &inputs).unwrap();
        let bad = out.iter().filter(|v| !v.is_finite()).count();
        assert_eq!(bad, 0, "{case}: non-finite outputs");
        let err = rel_l2(&out, &want);
        let diffusers =
            TensorFile::open(&dir.join("expected_bf16.safetensors")).unwrap().f32("sample").unwrap().0;
        let err_ref = rel_l2(&out, &diffusers);
        println!("{case}: shape {shape:?}, GPU vs CPU (bf16) rel L2 {err:.2e}, GPU vs diffusers bf16 {err_ref:.2e}");
        assert!(err <= 2e-2 && err_ref <= 2e-2, "{case}: {err:.3e} / {err_ref:.3e}");
    }
}

#[test]
fn the_modulation_table_is_bit_identical_on_the_gpu() {
    let _g = setup();
    use ModulationMode::{Resident, Table};
    let options = |modulation| DitLoadOptions { modulation, ..Default::default() };
    let mut cases = Vec::new();
    for case in ["plain", "zero_cond"] {
        let dir = fixture(case).join("transformer");
        let [resident, table] = [Resident, Table]
            .map(|m| QwenImageTransformer::<G>::load_with(&dir, DType::BF16, &options(m), &dev()).unwrap());
        let file = TensorFile::open(&fixture(case).join("inputs.safetensors")).unwrap();
        cases.push((format!("{case} fixture"), resident, table, read_dit_input::<G>(&file, &dev()).unwrap()));
    }
    // Two full-width blocks with random weights: the real modulation GEMM, [rows, 3072] × [18432, 3072]ᵀ.
    for zero_cond_t in [false, true] {
        let config = DitConfig { num_layers: 2, zero_cond_t, ..DitConfig::default() };
        let [resident, table] = [Resident, Table].map(|m| {
            let mut store = WeightStore::random(DType::BF16, 3);
            QwenImageTransformer::<G>::from_store_with(config.clone(), &mut store, &options(m), &dev())
                .unwrap()
        });
        let input = DitInput {
            hidden_states: randn([1, 32, config.in_channels], 1.0),
            encoder_hidden_states: randn([1, 8, config.joint_attention_dim], 1.0),
            encoder_hidden_states_mask: None,
            timestep: vec![0.7],
            img_shapes: vec![ImageShape::new(4, 4), ImageShape::new(4, 4)],
            modulation: None,
        };
        cases.push((format!("2 full-width blocks, zero_cond_t {zero_cond_t}"), resident, table, input));
    }
    let bits = |t: Tensor<G, 3>| to_f32_vec(t).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (name, resident, table_mode, mut input) in cases {
        // Rows computed in every forward pass from resident weights (the layout before the table), after a warm-up;
        // then table mode without a table (each layer made on the GPU for the call), and with one.
        drop(resident.forward(&input).unwrap());
        let want = bits(resident.forward(&input).unwrap());
        assert!(want.iter().all(|&b| f32::from_bits(b).is_finite()), "{name}: non-finite outputs");
        assert_eq!(bits(table_mode.forward(&input).unwrap()), want, "{name}: rows made per call differ");
        let timesteps = input.timestep.clone();
        input.modulation = Some(table_mode.modulation_table(&[&timesteps]).unwrap());
        assert_eq!(bits(table_mode.forward(&input).unwrap()), want, "{name}: table rows differ");
        println!("{name}: {} outputs, table vs rows computed per forward pass: bit-identical", want.len());
    }
}

/// Random inputs of the full-size DiT at Edit v1 1024²: 4096 target + 4096 condition tokens, 512 text tokens.
fn full_size_input(config: &DitConfig) -> DitInput<G> {
    DitInput {
        hidden_states: randn([1, 8192, config.in_channels], 1.0),
        encoder_hidden_states: randn([1, 512, config.joint_attention_dim], 1.0),
        encoder_hidden_states_mask: None,
        timestep: vec![0.75],
        img_shapes: vec![ImageShape::new(64, 64), ImageShape::new(64, 64)],
        modulation: None,
    }
}

/// Issue 13's FP8 quality number: the velocity of the full-size DiT (60 blocks, random weights) with FP8 weights
/// (default keep list) against bf16, at Edit v1 1024² (4096 target + 4096 condition tokens, 512 text tokens).
#[test]
fn fp8_dit_at_full_size_against_bf16() {
    let _g = setup();
    let config = DitConfig::default();
    let input = full_size_input(&config);
    let velocity = |fp8: Option<Fp8Options>| {
        let options = DitLoadOptions { fp8, ..Default::default() };
        let mut store = WeightStore::random(DType::BF16, 11);
        let model =
            QwenImageTransformer::<G>::from_store_with(config.clone(), &mut store, &options, &dev()).unwrap();
        println!("{}", model.linear_weights().describe());
        let table = model.modulation_table(&[&input.timestep]).unwrap();
        let out = model.forward(&DitInput { modulation: Some(table), ..input.clone() }).unwrap();
        to_f32_vec(out)
    };
    let bf16 = velocity(None);
    reset_stats();
    let fp8 = velocity(Some(Fp8Options::default()));
    assert_fast(FP8, "FP8 DiT");
    assert!(fp8.iter().all(|v| v.is_finite()), "non-finite FP8 outputs");
    let err = rel_l2(&fp8, &bf16);
    println!("full-size DiT, random weights, Edit v1 1024²: FP8 (default keep list) vs bf16 velocity rel L2 {err:.3e}");
    assert!(err < 0.15, "{err:.3e}");
    // The joint attention in FP8 too (`--fp8-attention`): its own kernel, every call on the fast path.
    reset_stats();
    let attention = velocity(Some(Fp8Options { attention: true, ..Default::default() }));
    assert_fast(ATTENTION, "FP8 attention in the DiT");
    assert!(attention.iter().all(|v| v.is_finite()), "non-finite outputs with FP8 attention");
    let (err_a, err_fp8) = (rel_l2(&attention, &bf16), rel_l2(&attention, &fp8));
    println!("  with FP8 attention: vs bf16 {err_a:.3e}, vs FP8 GEMMs alone {err_fp8:.3e}");
    assert!(err_a < 0.2 && err_fp8 > 1e-4, "{err_a:.3e} / {err_fp8:.3e}");
}

/// The full-size number of the 8-bit pruning cache (`--fp8-cache`): a `cat` reuse step of the FP8 DiT (60 blocks,
/// random weights, Edit v1 1024²) whose condition image's K/V come from the 8-bit cache, against the same step with
/// the cache in bf16. The caching step before it is the same for both, bit for bit.
#[test]
fn fp8_cache_at_full_size_against_the_bf16_cache() {
    use qwen_image_pruning::{
        full_cache_plan, GroupAction, LayerPlan, ReuseMode, StepPlan, TokenPruningCache,
    };
    let _g = setup();
    let config = DitConfig::default();
    let input = full_size_input(&config);
    let layers = config.num_layers;
    let reuse =
        StepPlan::new(vec![LayerPlan::with_conditions(1, GroupAction::Reuse(ReuseMode::KeyValue)); layers]);
    // (caching step, reuse step, cache bytes) with the cache in bf16 or in 8 bits.
    let steps = |cache: bool| {
        let options =
            DitLoadOptions { fp8: Some(Fp8Options { cache, ..Default::default() }), ..Default::default() };
        let mut store = WeightStore::random(DType::BF16, 11);
        let model =
            QwenImageTransformer::<G>::from_store_with(config.clone(), &mut store, &options, &dev()).unwrap();
        let table = model.modulation_table(&[&input.timestep]).unwrap();
        let input = DitInput { modulation: Some(table), ..input.clone() };
        let mut kv = TokenPruningCache::new();
        kv.keep_hidden_states(false);
        let (first, _) = model.forward_planned(&input, &full_cache_plan(layers, 1), 0, &mut kv).unwrap();
        let (second, _) = model.forward_planned(&input, &reuse, 1, &mut kv).unwrap();
        (to_f32_vec(first), to_f32_vec(second), kv.size_bytes())
    };
    let (first, dense, dense_bytes) = steps(false);
    reset_stats();
    let (first8, eight, eight_bytes) = steps(true);
    assert_fast(FP8, "8-bit cache: quantized and restored on the fast path");
    assert_eq!(first8, first, "the caching step changed with the 8-bit cache");
    assert!(eight.iter().all(|v| v.is_finite()), "non-finite outputs with the 8-bit cache");
    let err = rel_l2(&eight, &dense);
    println!(
        "full-size FP8 DiT, random weights, Edit v1 1024²: `cat` reuse step with the 8-bit cache vs the bf16 cache, \
         velocity rel L2 {err:.3e}; cache {:.2} → {:.2} GiB",
        dense_bytes as f64 / (1u64 << 30) as f64,
        eight_bytes as f64 / (1u64 << 30) as f64
    );
    assert!(err > 1e-4 && err < 0.05, "{err:.3e}");
    assert!(eight_bytes * 19 < dense_bytes * 10, "{eight_bytes} / {dense_bytes} bytes");
}

// ---------------------------------------------------------------------------------------------------------------
// Weight loading: straight from the memory-mapped checkpoint into device memory

#[test]
fn weights_upload_straight_from_the_memory_map() {
    let _g = setup();
    let dir = std::env::temp_dir().join(format!("qwen-gpu-upload-{}", std::process::id()));
    let tensors: Vec<(String, Vec<usize>)> = vec![
        ("a.weight".into(), vec![3, 1000]),
        ("b.weight".into(), vec![4097, 33]),
        ("c.bias".into(), vec![7]),
    ];
    // Small shards: the three tensors land in two files, the second at an offset inside its file.
    synthetic::write_random_checkpoint(&dir, "model", &tensors, 10_000, 7).expect("checkpoint");
    let mut gpu_store = WeightStore::open_dir(&dir, "model", DType::BF16).expect("open");
    let mut cpu_store = WeightStore::open_dir(&dir, "model", DType::BF16).expect("open");
    let a: Tensor<G, 2> = gpu_store.tensor("a.weight", [3, 1000], &dev()).expect("a");
    let b: Tensor<G, 2> = gpu_store.tensor("b.weight", [4097, 33], &dev()).expect("b");
    let c: Tensor<G, 1> = gpu_store.tensor("c.bias", [7], &dev()).expect("c");
    assert_fast(GLUE, "weight upload");
    let cpu = Default::default();
    let want_b: Tensor<CpuBackend, 2> = cpu_store.tensor("b.weight", [4097, 33], &cpu).expect("b");
    let want_c: Tensor<CpuBackend, 1> = cpu_store.tensor("c.bias", [7], &cpu).expect("c");
    let want_a: Tensor<CpuBackend, 2> = cpu_store.tensor("a.weight", [3, 1000], &cpu).expect("a");
    let host = |d: TensorData| d.convert::<f32>().to_vec::<f32>().unwrap();
    // Bit-exact copies, and burn's kernels that read them right away see the uploaded values (ordering).
    assert_eq!(to_f32_vec(a), host(want_a.into_data()));
    assert_eq!(to_f32_vec(c), host(want_c.into_data()));
    let doubled = to_f32_vec(b * 2.0);
    let want = host(want_b.mul_scalar(2.0).into_data());
    assert_eq!(doubled, want);
    assert!(doubled.iter().any(|&v| v != 0.0), "the checkpoint values are random, not zero");
    // f32 host data (LoRA adapters are uploaded this way, then cast to the model dtype).
    let values: Vec<f32> = (0..35).map(|i| i as f32 * 0.25 - 3.0).collect();
    let f32_tensor: Tensor<G, 2> = G::upload(TensorData::new(values.clone(), [5, 7]), &dev());
    assert_eq!(f32_tensor.dtype(), DType::F32);
    assert_eq!(to_f32_vec(f32_tensor.cast(DType::BF16)), values, "exact in bf16 too (multiples of 1/4)");
    assert_fast(GLUE, "f32 upload");
    println!("weight upload: 3 tensors from 2 mapped shards and one f32 tensor, bit-exact");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn streamed_text_encoder_layers_are_bit_identical() {
    // Low-memory mode's text encoder on the fixture checkpoint, bf16 with FP8 linear layers: decoder layers parked in
    // page-locked host memory and uploaded for each use give the resident model's outputs bit for bit.
    let _g = setup();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text_encoder/legacy");
    let dir = root.join("text_encoder");
    let config = Qwen25VlConfig::from_file(&dir.join("config.json")).expect("config");
    let load = |stream_layers: bool| {
        let mut store = Qwen25VlTextEncoder::<G>::open_store(&dir, DType::BF16).expect("store");
        store.quantize_linears(Some(Fp8Options::keeping(TEXT_ENCODER_FP8_KEEP)));
        let options = TextEncoderLoadOptions { host_embeddings: stream_layers, stream_layers };
        Qwen25VlTextEncoder::<G>::from_store_with(config.clone(), &mut store, &options, &dev()).expect("load")
    };
    let file = TensorFile::open(&root.join("two_images_inputs.safetensors")).expect("inputs");
    let input = read_text_encoder_input::<G>(&file, &dev()).expect("input");
    let (resident, streamed) = (load(false), load(true));
    reset_stats();
    let got = to_f32_vec(streamed.forward(&input).expect("streamed"));
    let glue = &stats()[GLUE];
    assert!(glue.calls > 0 && glue.errors == 0, "streamed layer uploads: {glue:?}");
    let want = to_f32_vec(resident.forward(&input).expect("resident"));
    assert_eq!(got, want, "streamed layers change the last hidden state");
    assert!(got.iter().any(|&v| v != 0.0));
    // Twice more: the parked layers are read, never consumed; then the streamed model is dropped (its page-locked
    // memory freed after the stream has finished reading it) while the resident one keeps working.
    assert_eq!(to_f32_vec(streamed.forward(&input).expect("again")), want);
    drop(streamed);
    assert_eq!(to_f32_vec(resident.forward(&input).expect("after drop")), want);
    println!("streamed text-encoder layers: {} values bit-identical to the resident model", want.len());
}

#[test]
fn padded_vision_mlps_on_the_gpu_match_transformers() {
    // The vision MLPs' hidden width padded with zero features (on CUDA `dense_width_multiple` pads 3420 → 3424; the
    // fixture's 48 is a multiple of 8 already, so 48 → 64 is forced here): bf16 on the GPU against transformers'
    // bf16 image embeddings, with the padded GEMMs on cuBLASLt.
    let _g = setup();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text_encoder/legacy");
    let mut model =
        Qwen25VlTextEncoder::<G>::load(&root.join("text_encoder"), DType::BF16, &dev()).expect("load");
    assert_eq!(G::dense_width_multiple(), 8);
    for block in &mut model.vision.blocks {
        block.mlp = block.mlp.clone().pad_intermediate(32);
        assert_eq!(block.mlp.down_proj.in_dim(), 64);
    }
    for case in ["two_images", "one_image"] {
        let file = TensorFile::open(&root.join(format!("{case}_inputs.safetensors"))).expect("inputs");
        let input = read_text_encoder_input::<G>(&file, &dev()).expect("input");
        reset_stats();
        let got = model.vision_forward(input.pixel_values.clone().expect("pixels"), &input.image_grid_thw);
        let got = to_f32_vec(got.expect("vision"));
        assert_fast(GEMM, "padded vision MLP");
        let want = TensorFile::open(&root.join(format!("{case}_expected_bf16.safetensors")))
            .and_then(|f| f.f32("image_embeds"))
            .expect("expected")
            .0;
        let err = rel_l2(&got, &want);
        println!("padded vision MLPs, {case}: rel L2 {err:.2e} against transformers bf16");
        assert!(err <= 2e-2, "{case}: {err:.3e} > 2e-2");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The VAE

#[test]
fn tiny_vae_on_the_gpu_matches_the_cpu() {
    let _g = setup();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae/tiny");
    let inputs = dir.join("inputs.safetensors");
    let gpu =
        qwen_image::vae::AutoencoderKLQwenImage::<G>::load(&dir.join("vae"), DType::BF16, &dev()).unwrap();
    let cpu = qwen_image::vae::AutoencoderKLQwenImage::<CpuBackend>::load(
        &dir.join("vae"),
        DType::BF16,
        &Default::default(),
    )
    .unwrap();
    reset_stats();
    let g = qwen_image_edit::reference::vae_file(&gpu, &inputs, None).unwrap();
    assert_fast(CONV, "tiny VAE convolutions through cuDNN (needs libcudnn.so.9 on LD_LIBRARY_PATH)");
    let c = qwen_image_edit::reference::vae_file(&cpu, &inputs, None).unwrap();
    // Against diffusers (the quality bar's bf16 tolerance), in bf16 and in f32. GPU vs CPU compares two bf16 runs
    // with independent roundings, so its bound is looser.
    let reference = |file: &str, name: &str| TensorFile::open(&dir.join(file)).unwrap().f32(name).unwrap().0;
    for ((name, got, _), (_, cpu_out, _)) in g.into_iter().zip(c) {
        let (bf16, f32) =
            (reference("expected_bf16.safetensors", name), reference("expected.safetensors", name));
        let (err, err_bf16, err_f32) = (rel_l2(&got, &cpu_out), rel_l2(&got, &bf16), rel_l2(&got, &f32));
        println!(
            "tiny VAE {name}: GPU vs diffusers bf16 rel L2 {err_bf16:.2e}, vs diffusers f32 {err_f32:.2e}, vs CPU \
             (bf16) {err:.2e} (CPU vs diffusers bf16 {:.2e})",
            rel_l2(&cpu_out, &bf16)
        );
        assert!(got.iter().all(|v| v.is_finite()), "{name}: non-finite outputs");
        assert!(
            err_bf16 <= 2e-2 && err_f32 <= 2e-2 && err <= 3e-2,
            "{name}: {err_bf16:.3e} / {err_f32:.3e} / {err:.3e}"
        );
    }
}
