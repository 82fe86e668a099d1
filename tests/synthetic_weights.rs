//! Random weights and random checkpoints (`qwen_image::synthetic`, `WeightStore::random`), on the CPU at tiny
//! sizes: every network builds from its config alone and stays finite through as many layers as the full-size
//! model has; the random store asks for exactly the diffusers key set; a written random sharded checkpoint loads
//! through the strict loader, and a missing, extra or misshapen tensor in it is an error.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Distribution, Tensor};
use qwen_image::{
    dit::{DitConfig, DitInput, ImageShape, QwenImageTransformer},
    synthetic,
    text_encoder::{GridThw, Qwen25VlConfig, Qwen25VlTextEncoder, TextEncoderInput},
    vae::{AutoencoderKLQwenImage, VaeConfig},
    weights::WeightStore,
    CpuBackend, ModelError,
};
use qwen_image_pipeline::{demo, EditRequest, LoadOptions, NoProgress, QwenImageEditPipeline, Snapshot};

type B = CpuBackend;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/qwen-image-pipeline/assets/demo_snapshot").join(rel)
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qwen-synthetic-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().to_vec::<f32>().unwrap()
}

fn assert_sane(what: &str, v: &[f32]) {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    println!("{what}: max |x| {max:.3}, rms {rms:.3}");
    assert!(v.iter().all(|x| x.is_finite()), "{what}: non-finite values");
    assert!(max < 1e4 && rms > 1e-4, "{what}: max {max}, rms {rms}");
}

fn tiny_dit(layers: usize) -> DitConfig {
    DitConfig { num_layers: layers, ..DitConfig::from_file(&fixture("transformer/config.json")).unwrap() }
}

fn dit_input(config: &DitConfig) -> DitInput<B> {
    let dev = Default::default();
    DitInput {
        hidden_states: Tensor::random([1, 16, config.in_channels], Distribution::Normal(0.0, 1.0), &dev),
        encoder_hidden_states: Tensor::random(
            [1, 5, config.joint_attention_dim],
            Distribution::Normal(0.0, 1.0),
            &dev,
        ),
        encoder_hidden_states_mask: None,
        timestep: vec![0.5],
        img_shapes: vec![ImageShape::new(2, 4), ImageShape::new(2, 4)],
        modulation: None,
    }
}

#[test]
fn a_random_dit_with_60_blocks_stays_finite_in_bf16() {
    let config = tiny_dit(60);
    let mut store = WeightStore::random(DType::BF16, 1);
    let model =
        QwenImageTransformer::<B>::from_store(config.clone(), &mut store, &Default::default()).unwrap();
    store.finish().unwrap();
    assert_sane("DiT, 60 blocks", &values(model.forward(&dit_input(&config)).unwrap()));
}

#[test]
fn a_random_text_encoder_with_28_layers_stays_finite() {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("text_encoder/config.json")).unwrap()).unwrap();
    json["text_config"]["num_hidden_layers"] = 28.into();
    json["text_config"]["layer_types"] = serde_json::json!(vec!["full_attention"; 28]);
    let config = Qwen25VlConfig::from_json(&json.to_string()).unwrap();
    let mut store = WeightStore::random(DType::F32, 2);
    let dev = Default::default();
    let model = Qwen25VlTextEncoder::<B>::from_store(config.clone(), &mut store, &dev).unwrap();
    // 8 text tokens around a 4×4-patch image (4 merged tokens).
    let (img, start, end) = (config.image_token_id, config.vision_start_token_id, config.vision_end_token_id);
    let ids = vec![1, 20, 30, 40, start, img, img, img, img, end, 50, 60, 2, 70];
    let pixels = Tensor::random([16, config.vision.patch_features()], Distribution::Normal(0.0, 1.0), &dev);
    let input = TextEncoderInput::new(ids).with_images(pixels, vec![GridThw::new(1, 4, 4)]);
    assert_sane("text encoder, 28 layers", &values(model.forward(&input).unwrap()));
}

#[test]
fn a_random_vae_encodes_and_decodes_finite_values() {
    let config = VaeConfig::from_file(&fixture("vae/config.json")).unwrap();
    let mut store = WeightStore::random(DType::F32, 3);
    let dev = Default::default();
    let vae = AutoencoderKLQwenImage::<B>::from_store(config, &mut store, &dev).unwrap();
    let x = Tensor::random([1, 3, 64, 64], Distribution::Uniform(-1.0, 1.0), &dev);
    let z = vae.encode_mode(x).unwrap();
    assert_eq!(z.dims(), [1, vae.z_dim(), 8, 8]);
    assert_sane("VAE latents", &values(z.clone()));
    assert_sane("VAE decode", &values(vae.decode(z).unwrap()));
}

#[test]
fn the_random_store_asks_for_exactly_the_diffusers_dit_keys() {
    let config = tiny_dit(2);
    let mut store = WeightStore::random(DType::F32, 0);
    QwenImageTransformer::<B>::from_store(config.clone(), &mut store, &Default::default()).unwrap();
    let asked: Vec<(String, Vec<usize>)> =
        store.keys().iter().map(|k| (k.to_string(), store.shape(k).unwrap().to_vec())).collect();
    let mut listed = synthetic::dit_checkpoint_tensors(&config).unwrap();
    listed.sort();
    assert_eq!(asked, listed);
    // … which is the key set of the committed diffusers checkpoint.
    let file = WeightStore::open_dir(&fixture("transformer"), "diffusion_pytorch_model", DType::F32).unwrap();
    let stored: Vec<(String, Vec<usize>)> =
        file.keys().iter().map(|k| (k.to_string(), file.shape(k).unwrap().to_vec())).collect();
    assert_eq!(stored, listed);
}

/// Writes a random checkpoint of `tensors` with the config of `config` into a fresh folder.
fn write(name: &str, config: &DitConfig, tensors: &[(String, Vec<usize>)]) -> PathBuf {
    let dir = tmp(name);
    std::fs::write(dir.join("config.json"), synthetic::dit_config_json(config)).unwrap();
    // Small shards: several files and the index, as diffusers writes them.
    synthetic::write_random_checkpoint(&dir, "diffusion_pytorch_model", tensors, 4096, 9).unwrap();
    dir
}

#[test]
fn a_written_random_checkpoint_loads_through_the_strict_loader() {
    let config = tiny_dit(1);
    let tensors = synthetic::dit_checkpoint_tensors(&config).unwrap();
    let dir = write("ok", &config, &tensors);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("diffusion_pytorch_model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> =
        index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() > 2, "{shards:?}");
    assert!(shards
        .iter()
        .all(|s| s.starts_with("diffusion_pytorch_model-000") && s.ends_with(".safetensors")));
    let bytes: usize = tensors.iter().map(|(_, s)| 2 * s.iter().product::<usize>()).sum();
    assert_eq!(index["metadata"]["total_size"], bytes);
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("partial")));

    let model = QwenImageTransformer::<B>::load(&dir, DType::BF16, &Default::default()).unwrap();
    assert_eq!(model.num_layers(), 1);
    assert_sane("DiT from a written checkpoint", &values(model.forward(&dit_input(&config)).unwrap()));
    // Norm weights are ones, biases small, projections of the asked scale.
    let mut store = WeightStore::open_dir(&dir, "diffusion_pytorch_model", DType::F32).unwrap();
    assert!(store.host_f32("txt_norm.weight").unwrap().0.iter().all(|&v| v == 1.0));
    let (w, shape) = store.host_f32("transformer_blocks.0.img_mlp.net.2.weight").unwrap();
    let rms = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
    let want = 1.0 / (shape[1] as f32).sqrt();
    assert!((rms / want - 1.0).abs() < 0.05, "rms {rms}, want {want}");
    // The same seed writes the same bytes.
    let again = write("again", &config, &tensors);
    let first = shards.iter().next().unwrap();
    assert_eq!(std::fs::read(dir.join(first)).unwrap(), std::fs::read(again.join(first)).unwrap());
}

#[test]
fn a_checkpoint_with_a_missing_extra_or_misshapen_tensor_is_refused() {
    let config = tiny_dit(1);
    let tensors = synthetic::dit_checkpoint_tensors(&config).unwrap();
    let load =
        |dir: &Path| QwenImageTransformer::<B>::load(dir, DType::F32, &Default::default()).unwrap_err();

    let missing: Vec<_> =
        tensors.iter().filter(|(k, _)| k != "transformer_blocks.0.attn.to_k.bias").cloned().collect();
    let err = load(&write("missing", &config, &missing));
    assert!(
        matches!(err, ModelError::MissingKey { ref key, .. } if key == "transformer_blocks.0.attn.to_k.bias"),
        "{err}"
    );

    let mut extra = tensors.clone();
    extra.push(("transformer_blocks.1.attn.to_k.bias".into(), vec![32]));
    let err = load(&write("extra", &config, &extra));
    assert!(matches!(err, ModelError::UnexpectedKeys { .. }), "{err}");

    let wider = DitConfig { num_attention_heads: 3, ..config.clone() };
    let err = load(&write("shape", &config, &synthetic::dit_checkpoint_tensors(&wider).unwrap()));
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err}");
}

#[test]
fn the_pipeline_edits_with_random_weights_from_configs_alone() {
    // The tiny demo snapshot without its weight files: the configs are enough.
    let root = demo::write_demo_snapshot(&tmp("pipeline")).unwrap();
    for dir in ["transformer", "vae"] {
        std::fs::remove_file(root.join(dir).join("diffusion_pytorch_model.safetensors")).unwrap();
    }
    std::fs::remove_file(root.join("text_encoder/model.safetensors")).unwrap();
    let snapshot = Snapshot::open(&root).unwrap();
    let edit = |seed: u64| {
        let mut pipe = QwenImageEditPipeline::<B>::from_snapshot_random(
            snapshot.clone(),
            &LoadOptions::default(),
            seed,
            &Default::default(),
            &mut NoProgress,
        )
        .unwrap();
        let mut req = EditRequest::new(vec![demo::sample_image().unwrap()], "Make it purple");
        req.areas = demo::demo_areas();
        req.num_steps = 2;
        pipe.edit(&req, &"cat".parse::<qwen_image_pruning::ScheduleSpec>().unwrap(), &mut NoProgress).unwrap()
    };
    let a = edit(5);
    assert_sane("random-weight edit latents", &a.latents);
    assert_sane("random-weight prompt embeddings", &a.prompt_embeds);
    assert_eq!(edit(5).latents, a.latents, "the same seed gives the same weights");
    assert_ne!(edit(6).latents, a.latents);
    // Loading the real files still checks them: the snapshot without weights is not loadable the normal way.
    let err = QwenImageEditPipeline::<B>::from_snapshot(
        snapshot,
        &LoadOptions::default(),
        &Default::default(),
        &mut NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn the_full_demo_snapshot_holds_the_published_configs() {
    let root = demo::write_full_demo_snapshot(&tmp("full")).unwrap();
    let snapshot = Snapshot::open(&root).unwrap();
    let dit = DitConfig::from_file(&root.join("transformer/config.json")).unwrap();
    assert_eq!(
        dit,
        DitConfig { class_name: Some("QwenImageTransformer2DModel".into()), ..DitConfig::default() }
    );
    let te = Qwen25VlConfig::from_file(&root.join("text_encoder/config.json")).unwrap();
    assert_eq!((te.text.hidden_size, te.text.num_hidden_layers, te.vision.depth), (3584, 28, 32));
    let vae = VaeConfig::from_file(&root.join("vae/config.json")).unwrap();
    assert_eq!((vae.base_dim, vae.z_dim, vae.num_res_blocks), (96, 16, 2));
    // The tiny tokenizer's special tokens are the ids the text encoder looks for.
    let tok = qwen_image::processor::QwenTokenizer::from_dir(&snapshot.processor_dir().unwrap()).unwrap();
    let ids = tok.encode("<|vision_start|><|image_pad|><|vision_end|>").unwrap();
    assert_eq!(
        ids,
        vec![te.vision_start_token_id as u32, te.image_token_id as u32, te.vision_end_token_id as u32]
    );
    // A square 1024² edit: 74×74 vision patches.
    let proc =
        qwen_image::processor::ImageProcessor::new(snapshot.image_processor_config().unwrap()).unwrap();
    let img = demo::DemoSize::Full.sample_image().unwrap();
    let (w, h) = qwen_image::processor::calculate_dimensions(1024 * 1024, 1.0).unwrap();
    assert_eq!((img.width(), img.height(), w, h), (256, 256, 1024, 1024));
    let big = qwen_image::processor::resize(&img, w, h, qwen_image::processor::Filter::Lanczos).unwrap();
    let pixels = proc.preprocess_all(&[big]).unwrap();
    assert_eq!(pixels.grid_thw(), vec![GridThw::new(1, 74, 74)]);
}
