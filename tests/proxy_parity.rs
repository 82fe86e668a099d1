//! End-to-end parity on the **trained** proxy snapshots (crate `qwen-image-proxy`): our pipeline against diffusers'
//! `QwenImageEditPipeline` / `QwenImageEditPlusPipeline` on held-out edits, with and without true CFG (fixtures from
//! `tools/proxy/fixtures.py`: `tests/fixtures/proxy/{edits.json, <case>.safetensors}`, the noise injected). Final
//! latents within relative L2 1e-4 in f32 on the CPU, decoded images at PSNR ≥ 60 dB; bf16 within 2e-2.
//!
//! The snapshots are the ones embedded in `qwen-image-proxy` (the fixtures must come from the same ones:
//! `python3 tools/proxy/fixtures.py`, both variants). The bf16 cases are edits on which diffusers' own bf16 result
//! stays close to its f32 one (the fixture script refuses others): on an ill-conditioned edit two correct bf16
//! implementations differ by as much as bf16 differs from f32.
//!
//! Unlike the random tiny snapshot's parity test, these weights make real edits: an error in the conditioning
//! (template, vision tower, text positions, condition tokens, `zero_cond_t`) changes the picture, not only noise.

mod edit_fixture;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::DType;
use qwen_image::{
    tensor_io::{rel_l2, TensorFile},
    CpuBackend,
};
use qwen_image_pipeline::{metrics::psnr, EditOutput, NoProgress, QwenImageEditPipeline, Snapshot, Variant};
use qwen_image_pruning::ScheduleSpec;
use serde_json::Value;

type B = CpuBackend;

/// Relative L2 tolerance of the final latents against diffusers in f32.
const LATENT_TOL: f64 = 1e-4;
/// The lowest PSNR of the decoded image against diffusers' in f32, dB.
const IMAGE_MIN_PSNR_DB: f64 = 60.0;
/// Relative L2 tolerance of the final latents in bf16 (against diffusers in bf16).
const LATENT_TOL_BF16: f64 = 2e-2;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The fixture folder: `tests/fixtures/proxy`, or `$QWEN_IMAGE_PROXY_FIXTURES` (a scratch folder of
/// `tools/proxy/fixtures.py --out`, with `heldout/` beside the fixtures, as `tools/proxy/finish.py --scratch` writes).
fn dir() -> PathBuf {
    match std::env::var_os("QWEN_IMAGE_PROXY_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => root().join("tests/fixtures/proxy"),
    }
}

fn fixture() -> Value {
    let path = dir().join("edits.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (written by `python3 tools/proxy/fixtures.py` on the trained snapshots)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn run(name: &str, spec: &str, dtype: DType) -> (EditOutput, TensorFile) {
    let fx = fixture();
    let case = &fx["cases"][name];
    assert_eq!(fx["text_positions"], "sequential");
    let variant = if name.starts_with("plus") { Variant::EditPlus } else { Variant::Edit };
    // One folder per call: tests run concurrently, and two of them run the same case (one deleting its folder while
    // the other still loads from it failed a run).
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let tmp = std::env::temp_dir()
        .join(format!("qwen-proxy-parity-{}-{call}-{name}-{dtype:?}", std::process::id()));
    let snapshot = qwen_image_proxy::write_snapshot(variant, &tmp).unwrap();
    let options = qwen_image_proxy::load_options(dtype);
    let mut pipe = QwenImageEditPipeline::<B>::from_snapshot(
        Snapshot::open(&snapshot).unwrap(),
        &options,
        &Default::default(),
        &mut NoProgress,
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&tmp);
    let want = TensorFile::open(&dir().join(format!("{name}.safetensors"))).unwrap();
    let req = edit_fixture::request(&dir(), &fx, case, want.f32("noise").unwrap().0);
    assert_eq!(req.areas, qwen_image_proxy::areas(), "the fixture's areas are the proxy's");
    let out = pipe.edit(&req, &spec.parse::<ScheduleSpec>().unwrap(), &mut NoProgress).unwrap();
    let size = (case["width"].as_u64().unwrap() as u32, case["height"].as_u64().unwrap() as u32);
    assert_eq!((out.report.width, out.report.height), size);
    (out, want)
}

fn image_of(want: &TensorFile, key: &str) -> Vec<u8> {
    want.f32(key).unwrap().0.into_iter().map(|v| v as u8).collect()
}

fn check(name: &str) {
    let (out, want) = run(name, "none", DType::F32);
    let embeds = rel_l2(&out.prompt_embeds, &want.f32("prompt_embeds").unwrap().0);
    let latents = rel_l2(&out.latents, &want.f32("latents").unwrap().0);
    let p = psnr(out.image.as_raw(), &image_of(&want, "image")).unwrap();
    println!("{name}: prompt embeds rel L2 {embeds:.2e}, latents rel L2 {latents:.2e}, image PSNR {p:.1} dB, CFG {}", out.report.true_cfg);
    assert_eq!(out.report.true_cfg, fixture()["cases"][name]["true_cfg_scale"].as_f64().unwrap() > 1.0);
    assert!(embeds <= LATENT_TOL, "{name}: prompt embeddings differ by {embeds:.3e}");
    assert!(latents <= LATENT_TOL, "{name}: final latents differ by {latents:.3e}");
    assert!(p >= IMAGE_MIN_PSNR_DB, "{name}: image PSNR {p:.1} dB < {IMAGE_MIN_PSNR_DB}");
}

#[test]
fn proxy_edit_without_cfg_matches_diffusers() {
    check("edit_nocfg");
}

#[test]
fn proxy_edit_with_true_cfg_matches_diffusers() {
    check("edit_cfg");
}

#[test]
fn proxy_edit_plus_two_images_matches_diffusers() {
    check("plus_nocfg");
}

#[test]
fn proxy_edit_plus_with_true_cfg_matches_diffusers() {
    check("plus_cfg");
}

#[test]
fn proxy_edit_plus_one_image_matches_diffusers() {
    check("plus_single_nocfg");
}

/// `name` in bf16 against diffusers in bf16.
fn check_bf16(name: &str) {
    let (out, want) = run(name, "none", DType::BF16);
    let latents = rel_l2(&out.latents, &want.f32("latents_bf16").unwrap().0);
    let p = psnr(out.image.as_raw(), &image_of(&want, "image_bf16")).unwrap();
    let own = fixture()["cases"][name]["diffusers_bf16_vs_f32"].as_f64().unwrap_or(f64::NAN);
    println!("{name} bf16: latents rel L2 {latents:.2e} (diffusers' bf16 vs its f32: {own:.2e}), image PSNR {p:.1} dB");
    assert!(latents <= LATENT_TOL_BF16, "{name}: bf16 final latents differ by {latents:.3e}");
}

#[test]
fn proxy_edit_bf16_matches_diffusers_bf16() {
    check_bf16("edit_nocfg");
}

#[test]
fn proxy_edit_plus_bf16_matches_diffusers_bf16() {
    check_bf16("plus_cfg");
}

#[test]
fn the_proxy_fixture_is_sensitive_to_pruning() {
    // A pruned schedule moves the latents far beyond the tolerance: the comparisons above are not vacuous.
    let (pruned, want) = run("edit_nocfg", "reuse:2,3,4", DType::F32);
    let d = rel_l2(&pruned.latents, &want.f32("latents").unwrap().0);
    println!("reuse:2,3,4 moves the latents by {d:.2e}");
    assert!(d > 10.0 * LATENT_TOL, "pruning moved the latents by only {d:.2e}");
}
