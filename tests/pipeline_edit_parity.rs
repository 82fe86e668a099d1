//! End-to-end parity with diffusers' `QwenImageEditPipeline` and `QwenImageEditPlusPipeline` (fixture from
//! `tools/fixtures/pipeline.py`): tiny random snapshots, the real diffusers pipelines with and without true CFG, the
//! noise injected through `latents=`. The Rust pipeline must give the same prompt embeddings, final latents
//! (relative L2 ≤ 1e-3) and image (PSNR ≥ 40 dB).

mod edit_fixture;

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use qwen_image::{
    tensor_io::{rel_l2, TensorFile},
    text_encoder::PositionMode,
    CpuBackend,
};
use qwen_image_pipeline::{metrics::psnr, EditOutput, LoadOptions, NoProgress, QwenImageEditPipeline};
use qwen_image_pruning::ScheduleSpec;
use serde_json::Value;

type B = CpuBackend;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn dir() -> PathBuf {
    root().join("tests/fixtures/pipeline")
}

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("edits.json")).unwrap()).unwrap()
}

fn options(positions: PositionMode, dtype: DType) -> LoadOptions {
    // diffusers 0.42 with transformers 5 calls the text encoder without the image-grid positions.
    LoadOptions { text_positions: positions, dtype, ..LoadOptions::default() }
}

fn run(name: &str, positions: PositionMode, spec: &str) -> (EditOutput, TensorFile) {
    run_in(name, positions, spec, DType::F32)
}

fn run_in(name: &str, positions: PositionMode, spec: &str, dtype: DType) -> (EditOutput, TensorFile) {
    let fx = fixture();
    let case = &fx["cases"][name];
    // A path from the repository root (the Edit v1 snapshot is the library's embedded demo model).
    let snapshot = root().join(case["snapshot"].as_str().unwrap());
    let mut pipe = QwenImageEditPipeline::<B>::load(
        snapshot.to_str().unwrap(),
        &options(positions, dtype),
        &Default::default(),
        &mut NoProgress,
    )
    .unwrap();
    let want = TensorFile::open(&dir().join(format!("{name}.safetensors"))).unwrap();
    let noise = want.f32("noise").unwrap().0;
    let out = pipe
        .edit(
            &edit_fixture::request(&dir(), &fx, case, noise),
            &spec.parse::<ScheduleSpec>().unwrap(),
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(
        (out.report.width, out.report.height),
        (case["width"].as_u64().unwrap() as u32, case["height"].as_u64().unwrap() as u32)
    );
    (out, want)
}

/// Relative L2 tolerance of the final latents against diffusers in f32 (measured: ≤ 4.8e-7).
const LATENT_TOL: f64 = 1e-4;

fn check(name: &str) {
    let (out, want) = run(name, PositionMode::Sequential, "none");
    let embeds = rel_l2(&out.prompt_embeds, &want.f32("prompt_embeds").unwrap().0);
    let latents = rel_l2(&out.latents, &want.f32("latents").unwrap().0);
    let (img, shape) = want.f32("image").unwrap();
    let img: Vec<u8> = img.into_iter().map(|v| v as u8).collect();
    assert_eq!(shape, vec![out.image.height() as usize, out.image.width() as usize, 3]);
    let p = psnr(out.image.as_raw(), &img).unwrap();
    println!("{name}: prompt embeds rel L2 {embeds:.2e}, latents rel L2 {latents:.2e}, image PSNR {p:.1} dB, CFG {}", out.report.true_cfg);
    assert!(embeds <= 1e-4, "{name}: prompt embeddings differ by {embeds:.3e}");
    assert!(latents <= LATENT_TOL, "{name}: final latents differ by {latents:.3e}");
    assert!(p >= 40.0, "{name}: PSNR {p:.1} dB < 40");
}

#[test]
fn edit_without_cfg_matches_diffusers() {
    check("edit_nocfg");
}

#[test]
fn edit_with_true_cfg_matches_diffusers() {
    check("edit_cfg");
}

#[test]
fn edit_plus_two_images_matches_diffusers() {
    check("plus_nocfg");
}

#[test]
fn edit_plus_with_true_cfg_matches_diffusers() {
    check("plus_cfg");
}

#[test]
fn the_fixture_is_sensitive_to_text_positions_and_to_pruning() {
    // M-RoPE positions (what transformers 4 computed) change the prompt embeddings beyond the tolerance, and a
    // pruned schedule moves the latents: the comparisons above are not vacuous.
    let (out, want) = run("edit_nocfg", PositionMode::Multimodal, "none");
    let embeds = rel_l2(&out.prompt_embeds, &want.f32("prompt_embeds").unwrap().0);
    assert!(embeds > 1e-3, "multimodal positions changed the embeddings by only {embeds:.2e}");
    let (pruned, want) = run("edit_nocfg", PositionMode::Sequential, "reuse:2,3");
    let d = rel_l2(&pruned.latents, &want.f32("latents").unwrap().0);
    println!("reuse:2,3 moves the latents by {d:.2e}");
    // Ten times the parity tolerance: a pruned run could never pass for an unpruned one.
    assert!(d > 10.0 * LATENT_TOL, "pruning moved the latents by only {d:.2e}");
    assert!(pruned.report.reused_tokens() > 0);
}

fn check_bf16(name: &str) {
    // Everything in bf16 against diffusers run in bf16 (the timestep rounding `bf16(bf16(t)/1000)` included).
    let (out, want) = run_in(name, PositionMode::Sequential, "none", DType::BF16);
    let latents = rel_l2(&out.latents, &want.f32("latents_bf16").unwrap().0);
    let vs_f32 = rel_l2(&want.f32("latents_bf16").unwrap().0, &want.f32("latents").unwrap().0);
    let img: Vec<u8> = want.f32("image_bf16").unwrap().0.into_iter().map(|v| v as u8).collect();
    let p = psnr(out.image.as_raw(), &img).unwrap();
    println!("{name} bf16: latents rel L2 {latents:.2e} (diffusers bf16 vs f32: {vs_f32:.2e}), image PSNR {p:.1} dB");
    assert!(latents <= 2e-2, "{name}: bf16 final latents differ by {latents:.3e}");
}

#[test]
fn edit_in_bf16_matches_diffusers_bf16() {
    check_bf16("edit_nocfg");
}

#[test]
fn edit_plus_with_cfg_in_bf16_matches_diffusers_bf16() {
    check_bf16("plus_cfg");
}
