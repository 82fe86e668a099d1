//! The memory plan (issue 13, item 4): its weight part against real loads and the published parameter counts, and
//! `MemoryMode::Low` on the tiny demo model.

use std::path::PathBuf;

use burn::tensor::DType;
use qwen_image::{dit::ModulationMode, quant::Fp8Options, CpuBackend};
use qwen_image_pipeline::{
    demo, memory_plan::GIB, plan_request, ComponentWeights, EditRequest, LoadOptions, MemoryMode, NoProgress,
    QwenImageEditPipeline, Snapshot,
};
use qwen_image_pruning::ScheduleSpec;

type B = CpuBackend;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qwen-memory-plan-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn request() -> EditRequest {
    let mut req = EditRequest::new(vec![demo::sample_image().unwrap()], "Make it purple");
    req.areas = demo::demo_areas();
    req.num_steps = 3;
    req
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn the_planned_weights_are_the_loaded_weights_and_low_memory_edits_like_resident() {
    let root = demo::write_demo_snapshot(&tmp("tiny")).unwrap();
    let snapshot = Snapshot::open(&root).unwrap();
    let spec: ScheduleSpec = "cat".parse().unwrap();
    let (mut latents, mut cache_bytes) = (Vec::new(), Vec::new());
    for (memory, dtype, fp8_cache) in [
        (MemoryMode::Resident, DType::F32, false),
        (MemoryMode::Low, DType::F32, false),
        (MemoryMode::Low, DType::BF16, false),
        (MemoryMode::Low, DType::BF16, true),
    ] {
        // The last: the cache's K and V in 8 bits.
        let fp8 = fp8_cache.then(|| Fp8Options { cache: true, ..Fp8Options::low_memory() });
        let options = LoadOptions { memory, dtype, fp8, ..LoadOptions::default() };
        let planned = ComponentWeights::plan(&snapshot, &options.resolved().unwrap()).unwrap();
        let mut pipe = QwenImageEditPipeline::<B>::from_snapshot(
            snapshot.clone(),
            &options,
            &Default::default(),
            &mut NoProgress,
        )
        .unwrap();
        assert_eq!(planned, pipe.weight_bytes(), "{memory:?} {dtype:?}");
        assert!(planned.transformer.host > 0 && planned.vae.device > 0);
        let plan = plan_request(&snapshot, &request(), &spec, &options).unwrap();
        assert_eq!(plan.weights, planned);
        assert!(plan.cache_bytes > 0, "cat caches the condition image");
        let out = pipe.edit(&request(), &spec, &mut NoProgress).unwrap();
        // cat keeps K and V only (it never reads block inputs): the plan's bytes are the cache's.
        assert_eq!(plan.cache_bytes, out.report.cache_peak_bytes as u64, "{memory:?} {dtype:?} {fp8_cache}");
        cache_bytes.push(plan.cache_bytes);
        if dtype == DType::F32 {
            latents.push(out.latents);
        }
    }
    let low = ComponentWeights::plan(
        &snapshot,
        &LoadOptions { memory: MemoryMode::Low, ..LoadOptions::default() }.resolved().unwrap(),
    )
    .unwrap();
    let resident = ComponentWeights::plan(&snapshot, &LoadOptions::default()).unwrap();
    assert!(low.transformer.device < resident.transformer.device);
    assert!(low.text_encoder.device < resident.text_encoder.device);
    // bf16 K/V at 2 bytes per value against 1 byte and a 4-byte scale per token.
    let inner = snapshot.dit_config().unwrap().inner_dim() as u64;
    assert_eq!(cache_bytes[3] * 2 * inner, cache_bytes[2] * (inner + 4));
    let err = rel_l2(&latents[1], &latents[0]);
    println!("low-memory vs resident, tiny demo, f32, 3 steps `cat`: final latents rel. L2 {err:.3e}");
    assert!(err > 0.0 && err < 0.1, "{err}");
}

#[test]
fn the_full_size_weights_match_the_published_parameter_counts() {
    let root = demo::DemoSize::Full.write_snapshot(&tmp("full")).unwrap();
    let snapshot = Snapshot::open(&root).unwrap();
    let bf16 = |memory, modulation| {
        let options = LoadOptions { dtype: DType::BF16, memory, modulation, ..LoadOptions::default() };
        ComponentWeights::plan(&snapshot, &options.resolved().unwrap()).unwrap()
    };
    let resident = bf16(MemoryMode::Resident, ModulationMode::Resident);
    // /work/shared/reference/checkpoint_facts.md: DiT 20,430,401,088 parameters; text encoder 7,747,169,280
    // without lm_head.
    assert_eq!(resident.transformer.device, 40_860_802_176);
    assert_eq!(resident.text_encoder.device, 2 * 7_747_169_280);
    let table = bf16(MemoryMode::Resident, ModulationMode::Table);
    assert_eq!(table.transformer.device + table.transformer.host, 40_860_802_176);
    let low = bf16(MemoryMode::Low, ModulationMode::Table);
    // `--quantize fp8` (resident): the DiT and the text encoder in FP8 as under Low, but the published keep list
    // (Low also quantizes img_mlp.net.2) and the text encoder's layers on the device; `--quantize fp8-dit`: the DiT
    // only.
    let fp8 = |keep: Fp8Options, fp8_text_encoder| {
        let options =
            LoadOptions { dtype: DType::BF16, fp8: Some(keep), fp8_text_encoder, ..LoadOptions::default() };
        ComponentWeights::plan(&snapshot, &options.resolved().unwrap()).unwrap()
    };
    let (fp8_all, fp8_dit) = (fp8(Fp8Options::default(), true), fp8(Fp8Options::default(), false));
    assert_eq!(fp8(Fp8Options::low_memory(), true).transformer, low.transformer);
    assert_eq!(fp8_dit.text_encoder, table.text_encoder);
    assert_eq!(fp8_dit.transformer, fp8_all.transformer);
    // img_mlp.net.2 of 60 blocks: 3072 × 12288 weights at one byte instead of two, plus 3072 f32 scales.
    let net2 = 60 * (3072 * 12288 - 4 * 3072);
    assert_eq!(fp8_all.transformer.device - low.transformer.device, net2);
    assert!(fp8_all.text_encoder.device < table.text_encoder.device * 6 / 10);
    // Low streams the 28 decoder layers: the same bytes, all but the vision tower, norms and final norm on the host.
    let te = |w: &ComponentWeights| w.text_encoder.device + w.text_encoder.host;
    assert_eq!(te(&low), te(&fp8_all));
    assert!(low.text_encoder.device < 2 * GIB, "{}", low.text_encoder.device);
    assert!(low.text_encoder_streamed_layer > 0 && low.text_encoder_streamed_layer < GIB / 4);
    assert_eq!(fp8_all.text_encoder_streamed_layer, 0);
    println!(
        "full size, bf16: resident {:.2} GiB, table {:.2} GiB, low {:.2} GiB (VAE {} bytes)",
        resident.device() as f64 / GIB as f64,
        table.device() as f64 / GIB as f64,
        low.device() as f64 / GIB as f64,
        resident.vae.device
    );
    let options = LoadOptions {
        memory: MemoryMode::Low,
        modulation: ModulationMode::Resident,
        ..LoadOptions::default()
    };
    let err = options.resolved().unwrap_err().to_string();
    assert!(err.contains("modulation"), "{err}");
}
