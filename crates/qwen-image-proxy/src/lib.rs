//! The trained Qwen-Image-Edit **proxy** models, embedded: small models of exactly the Qwen-Image-Edit architecture
//! (Qwen2.5-VL text encoder with its vision tower, the Wan-style VAE, the MMDiT with condition-image tokens, the
//! Lightning scheduler) trained on generated scenes of coloured shapes whose edits have one right answer
//! (`tools/proxy/`, docs/quality.md). They are `qwen-edit --demo`'s model and the yardstick of `qwen-edit eval`.
//!
//! How to use:
//!
//! ```no_run
//! use qwen_image::CpuBackend;
//! use qwen_image_pipeline::{NoProgress, QwenImageEditPipeline, Snapshot, Variant};
//! use qwen_image_pruning::ScheduleSpec;
//!
//! # fn main() -> qwen_image_pipeline::Result<()> {
//! let dir = std::env::temp_dir().join("qwen-proxy");
//! let root = qwen_image_proxy::write_snapshot(Variant::Edit, &dir)?;
//! let options = qwen_image_proxy::load_options(burn::tensor::DType::F32);
//! let mut pipe =
//!     QwenImageEditPipeline::<CpuBackend>::from_snapshot(Snapshot::open(&root)?, &options, &Default::default(), &mut NoProgress)?;
//! let scene = qwen_image_proxy::default_scene();
//! let request = qwen_image_proxy::request(vec![scene.source()?], scene.instruction);
//! let out = pipe.edit(&request, &ScheduleSpec::None, &mut NoProgress)?;
//! # let _ = out; Ok(()) }
//! ```
//!
//! What the snapshots need from the pipeline (tools/proxy/README.md, "Design"): 128×128 images in and out (VAE and
//! condition areas 128², [`areas`]), 4 steps with the snapshot's Lightning scheduler config, true CFG off by default,
//! and the text encoder's **sequential** positions (what diffusers computes with transformers 5): [`load_options`]
//! and [`request`] set all of it.
//!
//! [`DemoModel`] is the demo model and its settings in one place: the proxy of a variant when this build bundles
//! it, else the tiny random-weight model; `qwen-edit --demo` and `qwen-edit serve --demo` both run it.
//!
//! The snapshot folders live under this crate's `snapshots/` and are embedded with `include_bytes!` (a build script
//! lists their files), so the demo needs no checkout and no download at run time. A folder missing at build time
//! leaves that snapshot out: [`write_snapshot`] then says so.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use qwen_image::{processor::RgbImage, text_encoder::PositionMode};
use qwen_image_pipeline::{
    EditRequest, ImageAreas, LoadOptions, PipelineError, Result, SchedulerChoice, Variant,
};

pub mod demo;
mod scenes;

pub use demo::DemoModel;
pub use scenes::{default_scene, Scene, SCENES};

include!(concat!(env!("OUT_DIR"), "/snapshot_files.rs"));

/// Output side of the proxy models in pixels (square scenes).
pub const SIDE: u32 = 128;

/// Denoising steps the proxies were trained for (the Lightning σ schedule 1, 0.9, 0.75, 0.5).
pub const STEPS: usize = 4;

/// The folder name of a variant's snapshot (under this crate's `snapshots/`, and under [`write_snapshot`]'s `dir`).
pub fn folder_name(variant: Variant) -> &'static str {
    match variant {
        Variant::Edit => "qwen-image-edit-proxy",
        Variant::EditPlus => "qwen-image-edit-plus-proxy",
    }
}

/// The embedded files of a variant's snapshot (relative path, bytes); empty when it was not bundled at build time.
pub fn snapshot_files(variant: Variant) -> &'static [(&'static str, &'static [u8])] {
    match variant {
        Variant::Edit => EDIT_FILES,
        Variant::EditPlus => PLUS_FILES,
    }
}

/// Whether the variant's snapshot is bundled in this build.
pub fn is_bundled(variant: Variant) -> bool {
    snapshot_files(variant).iter().any(|(rel, _)| *rel == "model_index.json")
}

/// Writes the variant's snapshot under `dir` (created if needed) and returns its folder
/// (`dir/`[`folder_name`]), ready for [`Snapshot::open`](qwen_image_pipeline::Snapshot::open).
pub fn write_snapshot(variant: Variant, dir: &Path) -> Result<PathBuf> {
    let root = dir.join(folder_name(variant));
    if !is_bundled(variant) {
        return Err(PipelineError::Snapshot {
            path: root,
            reason: format!(
                "the {} proxy snapshot is not bundled in this build (crates/qwen-image-proxy/snapshots/{} was \
                 missing when it was compiled; see tools/proxy/README.md)",
                variant_label(variant),
                folder_name(variant)
            ),
        });
    }
    for (rel, bytes) in snapshot_files(variant) {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| PipelineError::Snapshot {
                path: parent.to_path_buf(),
                reason: format!("cannot write the proxy snapshot: {e}"),
            })?;
        }
        qwen_image::tensor_io::write_atomic(&path, bytes)?;
    }
    Ok(root)
}

/// `Edit` or `Edit-Plus`, for messages.
pub fn variant_label(variant: Variant) -> &'static str {
    match variant {
        Variant::Edit => "Edit",
        Variant::EditPlus => "Edit-Plus",
    }
}

/// The image areas the proxies were trained at: 128² for the VAE (and the output) and for Edit-Plus's
/// vision-language condition images, so that both resizes of a 128×128 scene are no-ops.
pub fn areas() -> ImageAreas {
    ImageAreas { vae: SIDE * SIDE, condition: SIDE * SIDE }
}

/// The load options the proxies need, in `dtype`: the snapshot's (Lightning) scheduler config and sequential
/// text-encoder positions.
pub fn load_options(dtype: DType) -> LoadOptions {
    LoadOptions {
        dtype,
        scheduler: SchedulerChoice::Snapshot,
        text_positions: PositionMode::Sequential,
        ..LoadOptions::default()
    }
}

/// An edit of `images` with `prompt` as the proxies were trained: [`STEPS`] steps, [`areas`], CFG off, seed 0
/// (the same for both variants).
pub fn request(images: Vec<RgbImage>, prompt: impl Into<String>) -> EditRequest {
    DemoModel::Proxy(Variant::Edit).request(images, prompt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_snapshots_are_complete_folders() {
        for variant in [Variant::Edit, Variant::EditPlus] {
            let files = snapshot_files(variant);
            if !is_bundled(variant) {
                assert!(files.is_empty(), "{variant:?}: files without model_index.json");
                continue;
            }
            for part in ["transformer/config.json", "vae/config.json", "text_encoder/config.json"] {
                assert!(files.iter().any(|(rel, _)| *rel == part), "{variant:?}: {part} missing");
            }
        }
    }

    #[test]
    fn written_snapshots_open_with_their_variant() {
        let dir = std::env::temp_dir().join(format!("qwen-proxy-unit-{}", std::process::id()));
        for variant in [Variant::Edit, Variant::EditPlus] {
            match write_snapshot(variant, &dir) {
                Ok(root) => assert_eq!(qwen_image_pipeline::Snapshot::open(&root).unwrap().variant, variant),
                Err(e) => assert!(!is_bundled(variant) && e.to_string().contains("not bundled"), "{e}"),
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn requests_use_the_trained_settings() {
        let r = request(vec![RgbImage::new(SIDE, SIDE)], "Make the red circle blue.");
        assert_eq!((r.num_steps, r.areas, r.true_cfg()), (4, areas(), false));
        r.validate(Variant::Edit).unwrap();
        assert_eq!(load_options(DType::F32).text_positions, PositionMode::Sequential);
    }
}
