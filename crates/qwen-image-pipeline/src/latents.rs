//! Conversions between images, VAE latents and the DiT's packed tokens.
//!
//! How to use: [`image_to_tensor`] turns an RGB image into the VAE's `[1, 3, H, W]` input in `[-1, 1]`;
//! [`pack`] turns `[1, C, h, w]` latents into `[1, (h/2)(w/2), 4C]` tokens (2×2 patches, feature = `c·4 + dy·2 + dx`)
//! and [`unpack`] reverses it; [`tensor_to_image`] turns the decoder's `[1, 3, H, W]` output back into 8-bit RGB as
//! diffusers' `postprocess` does (`(x·0.5 + 0.5).clamp(0, 1)·255`, rounded half to even).

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use image::RgbImage;
use qwen_image::ops::QwenBackend;

use crate::{PipelineError, Result};

/// `[1, 3, H, W]` f32 in `[-1, 1]` (`x / 255 · 2 − 1`), as diffusers' `VaeImageProcessor.preprocess`.
pub fn image_to_tensor<B: Backend>(image: &RgbImage, device: &B::Device) -> Tensor<B, 4> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    Tensor::from_data(TensorData::new(image_values(image), [1, 3, h, w]), (device, DType::F32))
}

/// The values of [`image_to_tensor`] on the host: `[3, H, W]` row-major, `x / 255 · 2 − 1` per 8-bit level
/// ([`qwen_image::pixels::plane_values`]).
pub fn image_values(image: &RgbImage) -> Vec<f32> {
    qwen_image::pixels::plane_values(image.as_raw(), image.height() as usize, image.width() as usize)
}

/// `image` as the VAE's `[1, 3, H, W]` input in `[-1, 1]` in `dtype` on `device` ([`QwenBackend::upload_rgb8`]:
/// on the CUDA fast path the 8-bit values cross the bus and the GPU converts them).
pub fn upload_image<B: QwenBackend>(
    image: &RgbImage,
    dtype: DType,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    Ok(B::upload_rgb8(image.as_raw(), h, w, dtype, device)?)
}

/// The first image of a `[batch, 3, H, W]` tensor in `[-1, 1]` as 8-bit RGB ([`QwenBackend::read_rgb8`]: on the CUDA
/// fast path the GPU converts and only the 8-bit values are read back).
pub fn tensor_to_image<B: QwenBackend>(x: Tensor<B, 4>) -> Result<RgbImage> {
    let [_, c, h, w] = x.dims();
    if c != 3 {
        return Err(PipelineError::invalid(format!("expected 3 channels, the decoder gave {c}")));
    }
    let raw =
        B::read_rgb8(x).map_err(|e| PipelineError::Device(format!("cannot read the image back: {e}")))?;
    RgbImage::from_raw(w as u32, h as u32, raw)
        .ok_or_else(|| PipelineError::invalid(format!("a {w}×{h} image does not fit in 32-bit sides")))
}

/// `[1, C, h, w]` → `[1, (h/2)(w/2), 4C]` (diffusers' `_pack_latents`); `h` and `w` must be even.
pub fn pack<B: Backend>(z: Tensor<B, 4>) -> Result<Tensor<B, 3>> {
    let [b, c, h, w] = z.dims();
    if h % 2 != 0 || w % 2 != 0 {
        return Err(PipelineError::invalid(format!("latents of {h}×{w} cannot be packed into 2×2 patches")));
    }
    Ok(z.reshape([b, c, h / 2, 2, w / 2, 2]).permute([0, 2, 4, 1, 3, 5]).reshape([
        b,
        (h / 2) * (w / 2),
        c * 4,
    ]))
}

/// `[1, (h/2)(w/2), 4C]` → `[1, C, h, w]` (diffusers' `_unpack_latents`).
pub fn unpack<B: Backend>(tokens: Tensor<B, 3>, h: usize, w: usize) -> Result<Tensor<B, 4>> {
    let [b, n, f] = tokens.dims();
    if n != (h / 2) * (w / 2) || f % 4 != 0 || h % 2 != 0 || w % 2 != 0 {
        return Err(PipelineError::invalid(format!(
            "cannot unpack {n} tokens of {f} features into {h}×{w} latents"
        )));
    }
    let c = f / 4;
    Ok(tokens.reshape([b, h / 2, w / 2, c, 2, 2]).permute([0, 3, 1, 4, 2, 5]).reshape([b, c, h, w]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn pack_orders_features_channel_then_dy_dx_and_unpack_inverts() {
        let dev = Default::default();
        let (c, h, w) = (2, 4, 6);
        let v: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
        let z = Tensor::<Flex, 4>::from_data(TensorData::new(v.clone(), [1, c, h, w]), &dev);
        let p = pack(z).unwrap();
        assert_eq!(p.dims(), [1, 6, 8]);
        let pv: Vec<f32> = p.clone().into_data().to_vec().unwrap();
        // Token 1 = patch row 0, col 1; feature ch·4 + dy·2 + dx.
        let at = |ch: usize, y: usize, x: usize| v[ch * h * w + y * w + x];
        assert_eq!(
            pv[8..16],
            [
                at(0, 0, 2),
                at(0, 0, 3),
                at(0, 1, 2),
                at(0, 1, 3),
                at(1, 0, 2),
                at(1, 0, 3),
                at(1, 1, 2),
                at(1, 1, 3)
            ]
        );
        let back: Vec<f32> = unpack(p, h, w).unwrap().into_data().to_vec().unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn image_values_are_the_direct_formula() {
        let img =
            RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 16 + y) as u8, 255 - (x * 16 + y) as u8, 7]));
        let v = image_values(&img);
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                assert_eq!(v[c * 256 + i].to_bits(), (2.0 * (p[c] as f32 / 255.0) - 1.0).to_bits());
            }
        }
        // The values round to bf16/f16 the same on the host (to nearest even, as CUDA) and in burn's CPU cast
        // (through f64), so uploading them converted on the host changes nothing on either backend.
        use burn::tensor::{bf16, f16};
        for v in (0..=255u8).map(|l| 2.0 * (l as f32 / 255.0) - 1.0) {
            assert_eq!(bf16::from_f32(v).to_bits(), bf16::from_f64(v as f64).to_bits(), "{v:e}");
            assert_eq!(f16::from_f32(v).to_bits(), f16::from_f64(v as f64).to_bits(), "{v:e}");
        }
    }

    #[test]
    fn images_round_trip() {
        let dev = Default::default();
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 50, y as u8 * 100, 255]));
        let t = image_to_tensor::<Flex>(&img, &dev);
        assert_eq!(t.dims(), [1, 3, 3, 5]);
        assert_eq!(tensor_to_image(t).unwrap(), img);
    }
}
