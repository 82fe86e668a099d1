//! Image sizes of the edit pipelines: [`calculate_dimensions`] and the per-pipeline condition / VAE / output sizes.

use crate::{ModelError, Result};

/// Area of Edit-Plus condition images for the vision-language encoder (`CONDITION_IMAGE_SIZE = 384²`).
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py#L66-L67
pub const CONDITION_IMAGE_SIZE: u32 = 384 * 384;
/// Area of the images the VAE encodes, and of the default output (`VAE_IMAGE_SIZE = 1024²`).
pub const VAE_IMAGE_SIZE: u32 = 1024 * 1024;
/// Output sides are floored to this multiple (VAE scale 8 × packing 2).
pub const OUTPUT_MULTIPLE: u32 = 16;

/// diffusers' `calculate_dimensions(target_area, ratio)`: the `(width, height)` of about `target_area` pixels with
/// aspect ratio `ratio = width / height`, each side rounded (half to even, like Python's `round`) to a multiple
/// of 32.
///
/// Errors for a non-finite or non-positive ratio and when a side rounds to 0 (an extreme aspect ratio).
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py#L158-L165
pub fn calculate_dimensions(target_area: u32, ratio: f64) -> Result<(u32, u32)> {
    if !ratio.is_finite() || ratio <= 0.0 {
        return Err(ModelError::invalid(format!("aspect ratio {ratio} must be finite and positive")));
    }
    let width = (target_area as f64 * ratio).sqrt();
    let height = width / ratio;
    let width = (width / 32.0).round_ties_even() * 32.0;
    let height = (height / 32.0).round_ties_even() * 32.0;
    if width < 32.0 || height < 32.0 || width > u32::MAX as f64 || height > u32::MAX as f64 {
        return Err(ModelError::invalid(format!(
            "aspect ratio {ratio:.4} is too extreme for a {target_area}-pixel image: it would be {width}×{height}"
        )));
    }
    Ok((width as u32, height as u32))
}

/// The aspect ratio `width / height` of an image, as the pipelines compute it (`image.size[0] / image.size[1]`).
fn ratio(width: u32, height: u32) -> Result<f64> {
    if width == 0 || height == 0 {
        return Err(ModelError::invalid(format!("the image is empty ({width}×{height})")));
    }
    Ok(width as f64 / height as f64)
}

/// `QwenImageEditPipeline`: the size the input image is resized to (Lanczos) for both the vision-language encoder
/// and the VAE: [`calculate_dimensions`]`(1024², w / h)`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L623-L624
pub fn edit_image_size(width: u32, height: u32) -> Result<(u32, u32)> {
    calculate_dimensions(VAE_IMAGE_SIZE, ratio(width, height)?)
}

/// Sizes of one Edit-Plus input image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EditPlusSizes {
    /// `(width, height)` of the vision-language condition image (about 384², multiple of 32).
    pub condition: (u32, u32),
    /// `(width, height)` of the VAE image (about 1024², multiple of 32).
    pub vae: (u32, u32),
}

/// `QwenImageEditPlusPipeline`: each image is resized (Lanczos, from the original) once to about 384² for the
/// vision-language encoder and once to about 1024² for the VAE, both keeping its own aspect ratio.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py#L697-L702
pub fn edit_plus_image_sizes(width: u32, height: u32) -> Result<EditPlusSizes> {
    let r = ratio(width, height)?;
    Ok(EditPlusSizes {
        condition: calculate_dimensions(CONDITION_IMAGE_SIZE, r)?,
        vae: calculate_dimensions(VAE_IMAGE_SIZE, r)?,
    })
}

/// The output `(width, height)` of both pipelines: the requested sides, or those of [`calculate_dimensions`]`(1024²,
/// ratio)` of the reference image (Edit: the image; Edit Plus: the **last** image), floored to multiples of 16.
///
/// Errors if a requested side is under 16.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py#L645-L652
pub fn output_size(
    reference_width: u32,
    reference_height: u32,
    width: Option<u32>,
    height: Option<u32>,
) -> Result<(u32, u32)> {
    let (cw, ch) = calculate_dimensions(VAE_IMAGE_SIZE, ratio(reference_width, reference_height)?)?;
    let (w, h) = (width.unwrap_or(cw), height.unwrap_or(ch));
    let (w, h) = (w / OUTPUT_MULTIPLE * OUTPUT_MULTIPLE, h / OUTPUT_MULTIPLE * OUTPUT_MULTIPLE);
    if w == 0 || h == 0 {
        return Err(ModelError::invalid(format!(
            "output size {}×{} is under the {OUTPUT_MULTIPLE}-pixel minimum",
            width.unwrap_or(cw),
            height.unwrap_or(ch)
        )));
    }
    Ok((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_table() {
        // Worked sizes: input → Edit / Edit Plus VAE size and output size, Edit Plus condition size, as diffusers'
        // pipelines compute them with `calculate_dimensions` (see the links at the functions).
        for ((w, h), edit, cond) in [
            ((1024, 1024), (1024, 1024), (384, 384)),
            ((1920, 1080), (1376, 768), (512, 288)),
            ((800, 600), (1184, 896), (448, 320)),
        ] {
            assert_eq!(edit_image_size(w, h).unwrap(), edit);
            let plus = edit_plus_image_sizes(w, h).unwrap();
            assert_eq!(plus.vae, edit);
            assert_eq!(plus.condition, cond);
            assert_eq!(output_size(w, h, None, None).unwrap(), edit);
        }
    }

    #[test]
    fn rounding_is_half_to_even() {
        // ratio 1.25 at area 1600: w = √2000 = 44.72 → 1.40 → 32; h = 35.78 → 1.12 → 32.
        assert_eq!(calculate_dimensions(1600, 1.25).unwrap(), (32, 32));
        // area 48², ratio 1: 48 / 32 = 1.5 → 2 (even) → 64; area 80², 80/32 = 2.5 → 2 → 64.
        assert_eq!(calculate_dimensions(48 * 48, 1.0).unwrap(), (64, 64));
        assert_eq!(calculate_dimensions(80 * 80, 1.0).unwrap(), (64, 64));
    }

    #[test]
    fn degenerate_inputs_are_errors() {
        assert!(calculate_dimensions(CONDITION_IMAGE_SIZE, 1e-3).is_err());
        assert!(calculate_dimensions(VAE_IMAGE_SIZE, f64::NAN).is_err());
        assert!(edit_image_size(0, 10).is_err());
        assert_eq!(output_size(100, 100, Some(1000), Some(517)).unwrap(), (992, 512));
        assert!(output_size(100, 100, Some(15), None).is_err());
    }
}
