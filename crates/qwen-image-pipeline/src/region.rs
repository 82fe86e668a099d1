//! What the edit-region schedules need from the pipeline: the per-token signals of a step ([`target_signals`]),
//! and the unmasked output pixels kept exactly the source's ([`keep_unmasked`]).
//!
//! **Blending happens in pixel space, after decoding.** Every output pixel outside the user's mask (nearest-neighbour
//! scaled to the output size) is copied from the source image — the last input image, resized to the output size with
//! the pipeline's Lanczos when its size differs — so the unmasked pixels are bit-identical to that source. Blending
//! latents instead would leave the VAE round-trip error outside the mask.

use burn::tensor::{backend::Backend, DType, Tensor};
use qwen_image::{
    dit::ImageShape,
    processor::{resize, Filter, RgbImage},
};
use qwen_image_pruning::{PixelMask, TargetSignals};

use crate::{PipelineError, Result};

/// The signals of a step for [`PruningSchedule::observe`](qwen_image_pruning::PruningSchedule::observe): x̂₀ =
/// x_t − σ·v of the target (`x` the latents the step started from, `v` the velocity, `[1, target_tokens, channels]`),
/// and the packed latent of the last condition image with the target's grid (`image_latents` holds all condition
/// images, `img_shapes` the target first).
pub fn target_signals<B: Backend>(
    x: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    sigma: f32,
    image_latents: &Tensor<B, 3>,
    img_shapes: &[ImageShape],
) -> Result<TargetSignals> {
    let [_, tokens, channels] = x.dims();
    let host = |t: Tensor<B, 3>| -> Result<Vec<f32>> {
        t.cast(DType::F32).into_data().to_vec().map_err(|e| PipelineError::Device(format!("{e:?}")))
    };
    let first = |t: &Tensor<B, 3>| t.clone().narrow(0, 0, 1).cast(DType::F32);
    let x0 = host(first(x) - first(v) * sigma)?;
    let target =
        img_shapes.first().copied().ok_or_else(|| PipelineError::invalid("no target image shape"))?;
    let mut offset = 0;
    let mut reference = None;
    for shape in img_shapes.iter().skip(1) {
        if shape.height == target.height && shape.width == target.width && shape.tokens() == tokens {
            reference = Some(offset);
        }
        offset += shape.tokens();
    }
    let reference = reference.map(|start| host(first(image_latents).narrow(1, start, tokens))).transpose()?;
    Ok(TargetSignals { grid: (target.height, target.width), channels, x0, reference })
}

/// `image` with every pixel outside `mask` taken from `source` (resized to the image's size first when it differs).
pub fn keep_unmasked(image: RgbImage, source: &RgbImage, mask: &PixelMask) -> Result<RgbImage> {
    let (w, h) = image.dimensions();
    let source = match source.dimensions() == (w, h) {
        true => source.clone(),
        false => resize(source, w, h, Filter::Lanczos)?,
    };
    let mut out = image;
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        if !mask.edits_pixel(x as usize, y as usize, w as usize, h as usize) {
            *pixel = *source.get_pixel(x, y);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmasked_pixels_are_the_source() {
        let image = RgbImage::from_pixel(4, 2, image::Rgb([200, 10, 10]));
        let source = RgbImage::from_pixel(4, 2, image::Rgb([1, 2, 3]));
        let mask = PixelMask::new(2, 1, vec![false, true]).unwrap();
        let out = keep_unmasked(image, &source, &mask).unwrap();
        assert_eq!(out.get_pixel(0, 0).0, [1, 2, 3]);
        assert_eq!(out.get_pixel(1, 1).0, [1, 2, 3]);
        assert_eq!(out.get_pixel(2, 0).0, [200, 10, 10]);
        assert_eq!(out.get_pixel(3, 1).0, [200, 10, 10]);
    }

    #[test]
    fn signals_compare_with_the_condition_of_the_target_grid() {
        type B = burn::backend::Flex;
        let dev = Default::default();
        let x = Tensor::<B, 3>::ones([1, 4, 2], &dev);
        let v = Tensor::<B, 3>::ones([1, 4, 2], &dev);
        let shapes = [ImageShape::new(2, 2), ImageShape::new(1, 3), ImageShape::new(2, 2)];
        let latents = Tensor::<B, 3>::from_data(
            [[[9.0; 2], [9.0; 2], [9.0; 2], [0.5; 2], [0.5; 2], [0.5; 2], [0.5; 2]]],
            &dev,
        );
        let s = target_signals(&x, &v, 0.25, &latents, &shapes).unwrap();
        assert_eq!(s.grid, (2, 2));
        assert_eq!(s.x0, vec![0.75; 8]);
        assert_eq!(s.reference, Some(vec![0.5; 8]));
    }
}
