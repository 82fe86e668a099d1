//! 8-bit RGB images to and from the VAE's `[1, 3, H, W]` tensors in `[-1, 1]`, as diffusers' `VaeImageProcessor`
//! does: `preprocess` maps a level `v` to `2·(v / 255) − 1`, `postprocess` maps `x` back to
//! `round((x·0.5 + 0.5).clamp(0, 1) · 255)` (half to even), all in f32.
//!
//! How to use: [`QwenBackend::upload_rgb8`] and
//! [`QwenBackend::read_rgb8`] move an image between host and device (on the CUDA
//! fast path as 8-bit values, converted on the GPU with the same f32 arithmetic); the functions here are their
//! portable defaults and the host-side formulas ([`plane_values`], [`rgb8_of_planes`]).
//!
//! Upstream: [`VaeImageProcessor`](https://github.com/huggingface/diffusers/blob/v0.35.1/src/diffusers/image_processor.py)
//! (`normalize`, `denormalize`, `pt_to_numpy`, `numpy_to_pil`).

use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use crate::{ops::QwenBackend, transfer, ModelError, Result};

/// The VAE input value of the 8-bit level `v`: `2·(v / 255) − 1` in f32 (each operation rounded once).
pub fn level_value(v: u8) -> f32 {
    2.0 * (v as f32 / 255.0) - 1.0
}

/// The 8-bit level of the VAE output value `x`: `(x·0.5 + 0.5)` clamped to `[0, 1]`, times 255, rounded half to
/// even (NaN gives 0).
pub fn value_level(x: f32) -> u8 {
    let x = (x * 0.5 + 0.5).clamp(0.0, 1.0);
    (x * 255.0).round_ties_even() as u8
}

/// Checks that `rgb` holds `height·width` interleaved RGB pixels.
pub fn check_rgb8(rgb: &[u8], height: usize, width: usize) -> Result<()> {
    match height.checked_mul(width).and_then(|p| p.checked_mul(3)) {
        Some(n) if n == rgb.len() => Ok(()),
        _ => Err(ModelError::invalid(format!("{} bytes for a {width}×{height} RGB image", rgb.len()))),
    }
}

/// The `[3, H, W]` row-major VAE input values of an interleaved 8-bit RGB image (`rgb`: `H·W·3` bytes), each of
/// the 256 levels computed once, rows on rayon's threads.
pub fn plane_values(rgb: &[u8], height: usize, width: usize) -> Vec<f32> {
    let level: Vec<f32> = (0..=255u8).map(level_value).collect();
    let plane = height * width;
    let mut v = vec![0f32; 3 * plane];
    if plane == 0 {
        return v;
    }
    let (r, rest) = v.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let rows = r.par_chunks_mut(width).zip(g.par_chunks_mut(width)).zip(b.par_chunks_mut(width));
    rows.zip(rgb.par_chunks(3 * width)).for_each(|(((r, g), b), row)| {
        for (i, p) in row.chunks_exact(3).enumerate() {
            (r[i], g[i], b[i]) = (level[p[0] as usize], level[p[1] as usize], level[p[2] as usize]);
        }
    });
    v
}

/// Interleaved 8-bit RGB (`H·W·3` bytes) of `[3, H, W]` row-major VAE output values ([`value_level`]), rows on
/// rayon's threads.
pub fn rgb8_of_planes(v: &[f32], height: usize, width: usize) -> Vec<u8> {
    let plane = height * width;
    assert_eq!(v.len(), 3 * plane, "{} values for 3×{height}×{width}", v.len());
    let mut raw = vec![0u8; 3 * plane];
    if width > 0 {
        raw.par_chunks_mut(3 * width).enumerate().for_each(|(y, row)| {
            for (x, p) in row.chunks_exact_mut(3).enumerate() {
                for (ch, out) in p.iter_mut().enumerate() {
                    *out = value_level(v[ch * plane + y * width + x]);
                }
            }
        });
    }
    raw
}

/// The portable [`QwenBackend::upload_rgb8`]: [`plane_values`] converted to `dtype` on the host and uploaded.
pub fn upload_rgb8<B: QwenBackend>(
    rgb: &[u8],
    height: usize,
    width: usize,
    dtype: DType,
    device: &B::Device,
) -> Result<Tensor<B, 4>> {
    check_rgb8(rgb, height, width)?;
    let values = plane_values(rgb, height, width);
    Ok(transfer::upload_as::<B, 4>(&values, [1, 3, height, width], dtype, device))
}

/// The portable [`QwenBackend::read_rgb8`]: the first image read back as f32 and converted on the host.
pub fn read_rgb8<B: QwenBackend>(x: Tensor<B, 4>) -> Result<Vec<u8>> {
    let [batch, c, h, w] = x.dims();
    if c != 3 || batch == 0 {
        return Err(ModelError::invalid(format!("expected [batch ≥ 1, 3, H, W], got {:?}", x.dims())));
    }
    let v = transfer::read_f32(x.narrow(0, 0, 1))?;
    Ok(rgb8_of_planes(&v, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend as B;

    #[test]
    fn every_level_survives_the_round_trip() {
        for v in 0..=255u8 {
            assert_eq!(value_level(level_value(v)), v, "level {v}");
        }
        assert_eq!(value_level(f32::NAN), 0);
        assert_eq!((value_level(-3.0), value_level(3.0)), (0, 255));
    }

    #[test]
    fn images_round_trip_through_the_device() {
        let (h, w) = (5, 7);
        let rgb: Vec<u8> = (0..h * w * 3).map(|i| (i * 37 % 256) as u8).collect();
        let device = Default::default();
        for dtype in [DType::F32, DType::BF16] {
            let x = upload_rgb8::<B>(&rgb, h, w, dtype, &device).unwrap();
            assert_eq!(x.dims(), [1, 3, h, w]);
            let planes = transfer::read_f32(x.clone()).unwrap();
            // Channel planes: pixel (y, x)'s green value sits at plane 1.
            let (y, xx) = (3, 4);
            let want = level_value(rgb[(y * w + xx) * 3 + 1]);
            let got = planes[h * w + y * w + xx];
            assert!((got - want).abs() <= want.abs() / 128.0, "{got} vs {want}");
            assert_eq!(read_rgb8(x).unwrap(), rgb, "{dtype:?}");
        }
    }

    #[test]
    fn bad_buffers_are_errors() {
        let device = Default::default();
        assert!(upload_rgb8::<B>(&[0; 10], 2, 2, DType::F32, &device).is_err());
        let x = Tensor::<B, 4>::zeros([1, 4, 2, 2], &device);
        assert!(read_rgb8(x).is_err());
    }
}
