//! [`EditSizes`]: the sizes of one edit, from the request alone (no weights needed), and the rounding of requested
//! output sides to the model's multiple ([`SizeAdjustment`]).
//!
//! They follow diffusers' pipelines: the output is the requested size or [`calculate_dimensions`] of the last
//! input image, each side floored to a multiple of 16 ([`pipeline_qwenimage_edit.py#L623-L630`][edit-size]); every
//! input is resized (Lanczos) for the VAE to about the VAE area, and for the vision-language encoder to the same
//! image (Edit v1, [`#L662`][edit-resize]) or to about 384² (Edit-Plus, [`pipeline_qwenimage_edit_plus.py#L693-L706`][plus]).
//!
//! [edit-size]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L623-L630
//! [edit-resize]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L662
//! [plus]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py#L693-L706

use std::fmt;

use qwen_image::{
    dit::ImageShape,
    processor::{calculate_dimensions, resize, sizes::OUTPUT_MULTIPLE, Filter, RgbImage},
};
use serde::{Deserialize, Serialize};

use crate::{request::EditRequest, snapshot::Variant, Result};

/// One side of the output image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The width.
    Width,
    /// The height.
    Height,
}

/// A requested output side that was not a multiple of [`OUTPUT_MULTIPLE`] (16) and was rounded down to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SizeAdjustment {
    /// Which side.
    pub side: Side,
    /// The size asked for.
    pub requested: u32,
    /// The size used (the largest multiple of 16 not above `requested`).
    pub used: u32,
}

impl fmt::Display for SizeAdjustment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = match self.side {
            Side::Width => "width",
            Side::Height => "height",
        };
        write!(f, "{side} {} rounded down to {} (a multiple of {OUTPUT_MULTIPLE})", self.requested, self.used)
    }
}

/// A side floored to the model's multiple.
fn floor_to_multiple(v: u32) -> u32 {
    v / OUTPUT_MULTIPLE * OUTPUT_MULTIPLE
}

impl EditRequest {
    /// The requested output sides that are not multiples of 16, and what they are rounded down to. Needs nothing
    /// but the request; the [`EditReport`](crate::EditReport) of the edit lists the same.
    pub fn size_adjustments(&self) -> Vec<SizeAdjustment> {
        [(Side::Width, self.width), (Side::Height, self.height)]
            .into_iter()
            .filter_map(|(side, v)| {
                v.map(|v| SizeAdjustment { side, requested: v, used: floor_to_multiple(v) })
            })
            .filter(|a| a.used != a.requested)
            .collect()
    }
}

/// The sizes of one edit, `(width, height)` in pixels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EditSizes {
    /// The output, multiples of 16.
    pub output: (u32, u32),
    /// Each input image resized for the VAE (about the VAE area, multiples of 32).
    pub vae: Vec<(u32, u32)>,
    /// Each input image resized for the vision-language encoder (Edit v1: the VAE size; Edit-Plus: about the
    /// condition area).
    pub vision: Vec<(u32, u32)>,
    /// Requested sides that were rounded down (see [`EditRequest::size_adjustments`]).
    pub adjustments: Vec<SizeAdjustment>,
}

/// The input images resized to [`EditSizes`].
#[derive(Clone, Debug)]
pub struct ResizedImages {
    /// For the VAE.
    pub vae: Vec<RgbImage>,
    /// For the vision-language encoder.
    pub vision: Vec<RgbImage>,
}

impl EditSizes {
    /// The sizes of `req` on a model of `variant` (diffusers' preprocessing). Errors for an image whose aspect ratio
    /// is too extreme for the areas; expects a request whose [`validate`](EditRequest::validate) field checks passed
    /// (at least one non-empty image).
    pub fn new(req: &EditRequest, variant: Variant) -> Result<Self> {
        let ratio = |img: &RgbImage| img.width() as f64 / img.height() as f64;
        let mut sizes = EditSizes {
            output: (0, 0),
            vae: Vec::new(),
            vision: Vec::new(),
            adjustments: req.size_adjustments(),
        };
        for img in &req.images {
            let vae = calculate_dimensions(req.areas.vae, ratio(img))?;
            sizes.vae.push(vae);
            sizes.vision.push(match variant {
                Variant::Edit => vae,
                Variant::EditPlus => calculate_dimensions(req.areas.condition, ratio(img))?,
            });
        }
        let (dw, dh) = *sizes.vae.last().ok_or_else(|| crate::PipelineError::invalid("no input image"))?;
        sizes.output =
            (floor_to_multiple(req.width.unwrap_or(dw)), floor_to_multiple(req.height.unwrap_or(dh)));
        Ok(sizes)
    }

    /// Resizes `images` (the request's, in order) with Pillow's Lanczos filter. Edit v1's vision image is its VAE
    /// image.
    pub fn resize(&self, images: &[RgbImage]) -> Result<ResizedImages> {
        let mut out = ResizedImages { vae: Vec::new(), vision: Vec::new() };
        for ((img, &(vw, vh)), &vision) in images.iter().zip(&self.vae).zip(&self.vision) {
            let vae_img = resize(img, vw, vh, Filter::Lanczos)?;
            out.vision.push(if vision == (vw, vh) {
                vae_img.clone()
            } else {
                resize(img, vision.0, vision.1, Filter::Lanczos)?
            });
            out.vae.push(vae_img);
        }
        Ok(out)
    }

    /// The target's token grid (`height / 16 × width / 16`: VAE scale 8, 2×2 packing).
    pub fn target(&self) -> ImageShape {
        let (w, h) = self.output;
        ImageShape::new(h as usize / 16, w as usize / 16)
    }

    /// Each condition image's token grid.
    pub fn conditions(&self) -> Vec<ImageShape> {
        self.vae.iter().map(|&(w, h)| ImageShape::new(h as usize / 16, w as usize / 16)).collect()
    }

    /// The unpacked latent grid of the output, `(height / 8, width / 8)`.
    pub fn latent_grid(&self) -> (usize, usize) {
        let target = self.target();
        (2 * target.height, 2 * target.width)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(width: Option<u32>, height: Option<u32>) -> EditRequest {
        let mut r = EditRequest::new(vec![RgbImage::new(300, 200)], "x");
        (r.width, r.height) = (width, height);
        r
    }

    #[test]
    fn requested_sides_are_floored_to_16_and_the_rounding_is_reported() {
        let r = request(Some(17), Some(64));
        assert_eq!(r.size_adjustments(), vec![SizeAdjustment { side: Side::Width, requested: 17, used: 16 }]);
        let sizes = EditSizes::new(&r, Variant::Edit).unwrap();
        assert_eq!(sizes.output, (16, 64));
        assert_eq!(sizes.adjustments, r.size_adjustments());
        assert_eq!(r.size_adjustments()[0].to_string(), "width 17 rounded down to 16 (a multiple of 16)");
        assert!(request(Some(32), None).size_adjustments().is_empty());
    }

    #[test]
    fn default_output_follows_the_last_image_and_plus_has_its_own_vision_size() {
        let r = request(None, None);
        let edit = EditSizes::new(&r, Variant::Edit).unwrap();
        assert_eq!(edit.output, edit.vae[0]);
        assert_eq!(edit.vision, edit.vae);
        assert!(edit.adjustments.is_empty());
        let plus = EditSizes::new(&r, Variant::EditPlus).unwrap();
        assert_eq!(plus.vae, edit.vae);
        assert!(plus.vision[0].0 < plus.vae[0].0);
        assert_eq!(plus.target().tokens(), (plus.output.0 as usize / 16) * (plus.output.1 as usize / 16));
    }
}
