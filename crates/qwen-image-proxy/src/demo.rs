//! The demo model and its settings, in one place: what `qwen-edit --demo` and `qwen-edit serve --demo` run.
//!
//! [`DemoModel::for_variant`] picks the trained proxy of a variant when this build bundles it ([`is_bundled`]), and
//! otherwise the tiny random-weight model of [`qwen_image_pipeline::demo`] (it shows the machinery, not editing).
//! Each comes with what it needs: the snapshot ([`DemoModel::write_snapshot`]), the load options
//! ([`DemoModel::load_options`]: for the proxy its snapshot's Lightning scheduler and sequential text positions) and
//! the request settings ([`DemoModel::request`]: 4 steps; the proxy's 128² VAE and condition areas, the tiny
//! model's [`demo_areas`](qwen_image_pipeline::demo::demo_areas)).
//!
//! How to use:
//!
//! ```no_run
//! use qwen_image::CpuBackend;
//! use qwen_image_pipeline::{NoProgress, QwenImageEditPipeline, Snapshot, Variant};
//! use qwen_image_proxy::DemoModel;
//! use qwen_image_pruning::ScheduleSpec;
//!
//! # fn main() -> qwen_image_pipeline::Result<()> {
//! let demo = DemoModel::for_variant(Variant::Edit);
//! let root = demo.write_snapshot(&std::env::temp_dir().join("qwen-demo"))?;
//! let options = demo.load_options(burn::tensor::DType::F32);
//! let mut pipe =
//!     QwenImageEditPipeline::<CpuBackend>::from_snapshot(Snapshot::open(&root)?, &options, &Default::default(), &mut NoProgress)?;
//! let request = demo.request(vec![qwen_image_pipeline::demo::sample_image()?], "Make it purple");
//! let out = pipe.edit(&request, &ScheduleSpec::None, &mut NoProgress)?;
//! # let _ = out; Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use qwen_image::processor::RgbImage;
use qwen_image_pipeline::{demo, EditRequest, ImageAreas, LoadOptions, Result, Variant};

use crate::{is_bundled, variant_label};

/// A built-in demo model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DemoModel {
    /// The trained proxy of this variant ([`write_snapshot`](crate::write_snapshot) says so when this build does
    /// not bundle it).
    Proxy(Variant),
    /// The tiny Edit model with bundled random weights ([`qwen_image_pipeline::demo`]).
    TinyRandom,
}

impl DemoModel {
    /// The demo model for edits of `variant`: its trained proxy when this build bundles it, else the tiny
    /// random-weight model.
    pub fn for_variant(variant: Variant) -> Self {
        if is_bundled(variant) {
            DemoModel::Proxy(variant)
        } else {
            DemoModel::TinyRandom
        }
    }

    /// Whether the weights are trained (the proxy), not random.
    pub fn is_trained(self) -> bool {
        matches!(self, DemoModel::Proxy(_))
    }

    /// The model's variant.
    pub fn variant(self) -> Variant {
        match self {
            DemoModel::Proxy(variant) => variant,
            DemoModel::TinyRandom => Variant::Edit,
        }
    }

    /// Writes the model's snapshot under `dir` (created if needed) and returns its folder.
    pub fn write_snapshot(self, dir: &Path) -> Result<PathBuf> {
        match self {
            DemoModel::Proxy(variant) => crate::write_snapshot(variant, dir),
            DemoModel::TinyRandom => demo::write_demo_snapshot(dir),
        }
    }

    /// The load options in `dtype`: the proxy's ([`crate::load_options`]: the snapshot's Lightning scheduler,
    /// sequential text positions), or the defaults for the tiny model (the settings of its parity fixture).
    pub fn load_options(self, dtype: DType) -> LoadOptions {
        match self {
            DemoModel::Proxy(_) => crate::load_options(dtype),
            DemoModel::TinyRandom => LoadOptions { dtype, ..LoadOptions::default() },
        }
    }

    /// The image areas: the proxy's 128² VAE and condition areas ([`crate::areas`]), or the tiny model's
    /// ([`demo::demo_areas`]: 128² and 64²).
    pub fn areas(self) -> ImageAreas {
        match self {
            DemoModel::Proxy(_) => crate::areas(),
            DemoModel::TinyRandom => demo::demo_areas(),
        }
    }

    /// Denoising steps: the 4 Lightning steps the proxies were trained for ([`crate::STEPS`]; the tiny model
    /// takes any number, and runs the same by default).
    pub fn steps(self) -> usize {
        crate::STEPS
    }

    /// An edit of `images` with `prompt` with this model's settings: [`steps`](Self::steps),
    /// [`areas`](Self::areas), CFG off, seed 0.
    pub fn request(self, images: Vec<RgbImage>, prompt: impl Into<String>) -> EditRequest {
        let mut request = EditRequest::new(images, prompt);
        request.num_steps = self.steps();
        request.areas = self.areas();
        request
    }

    /// What the model is, for banners and logs.
    pub fn describe(self) -> String {
        match self {
            DemoModel::Proxy(variant) => format!(
                "the trained Qwen-Image-Edit proxy ({}; the Qwen-Image-Edit architecture at 6 blocks, trained on \
                 generated scenes of coloured shapes)",
                variant_label(variant)
            ),
            DemoModel::TinyRandom => "the tiny demo model with RANDOM WEIGHTS (it shows the machinery, not \
                                      editing)"
                .into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_when_bundled_else_the_tiny_model_with_their_settings() {
        for variant in [Variant::Edit, Variant::EditPlus] {
            let demo = DemoModel::for_variant(variant);
            assert_eq!(demo.is_trained(), is_bundled(variant));
            let r = demo.request(vec![RgbImage::new(crate::SIDE, crate::SIDE)], "Make the red circle blue.");
            assert_eq!((r.num_steps, r.areas, r.true_cfg()), (4, demo.areas(), false));
            let options = demo.load_options(DType::F32);
            if demo.is_trained() {
                assert_eq!(demo.variant(), variant);
                assert_eq!((r.areas, options), (crate::areas(), crate::load_options(DType::F32)));
            } else {
                assert_eq!(demo.variant(), Variant::Edit);
                assert_eq!(r.areas, demo::demo_areas());
                assert_eq!(options, LoadOptions::default());
            }
        }
        let proxy = DemoModel::Proxy(Variant::Edit);
        assert_eq!(
            proxy.load_options(DType::F32).text_positions,
            qwen_image::text_encoder::PositionMode::Sequential
        );
        assert_eq!(proxy.areas(), ImageAreas { vae: 128 * 128, condition: 128 * 128 });
    }

    #[test]
    fn each_demo_model_writes_a_snapshot_of_its_variant() {
        let dir = std::env::temp_dir().join(format!("qwen-proxy-demo-unit-{}", std::process::id()));
        for demo in [DemoModel::TinyRandom, DemoModel::for_variant(Variant::Edit)] {
            let root = demo.write_snapshot(&dir).unwrap();
            assert_eq!(qwen_image_pipeline::Snapshot::open(&root).unwrap().variant, demo.variant());
        }
        if !is_bundled(Variant::EditPlus) {
            let err = DemoModel::Proxy(Variant::EditPlus).write_snapshot(&dir).unwrap_err();
            assert!(err.to_string().contains("not bundled"), "{err}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
