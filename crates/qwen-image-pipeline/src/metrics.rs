//! Image-quality metrics for comparing a pruned edit with its baseline: PSNR and SSIM.
//!
//! How to use:
//!
//! ```
//! use qwen_image_pipeline::metrics::{psnr, ssim};
//!
//! let (w, h) = (16, 12);
//! let a: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
//! let mut b = a.clone();
//! b[5] = b[5].wrapping_add(9);
//! let p = psnr(&a, &b).unwrap();
//! let s = ssim(&a, &b, w, h, 3).unwrap();
//! assert!(p > 40.0 && s > 0.99 && s < 1.0);
//! assert_eq!(psnr(&a, &a).unwrap(), f64::INFINITY);
//! ```
//!
//! Both work on interleaved 8-bit pixels (`[height][width][channels]`, the layout of `image::RgbImage`) with data
//! range 255. [`ssim`] is scikit-image's `structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
//! use_sample_covariance=False, data_range=255, channel_axis=-1)`: an 11-tap Gaussian window (σ 1.5, truncated at
//! 3.5σ, scipy's `reflect` borders), K1 = 0.01, K2 = 0.03, the map cropped by the window radius, averaged per
//! channel, then over channels. Parity with scikit-image is tested on fixture images.

use serde::{Deserialize, Serialize};

use crate::{progress::Stage, request::EditOutput, PipelineError, Result};

/// Quality and speed of an edit against a baseline edit of the same request (typically the same seed without
/// pruning): what `qwen-edit --compare` reports, and what an evaluation of schedules collects.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The baseline's schedule.
    pub baseline: String,
    /// [`psnr`] of the image against the baseline's, in dB; `+∞` for identical images (JSON: `"inf"`).
    #[serde(with = "decibels")]
    pub psnr_db: f64,
    /// [`ssim`] of the image against the baseline's.
    pub ssim: f64,
    /// Denoising time of the baseline divided by this edit's.
    pub speedup_denoise: f64,
    /// Total time of the baseline divided by this edit's.
    pub speedup_total: f64,
}

impl Comparison {
    /// `edit` against `baseline` (their images must have the same size).
    pub fn between(baseline: &EditOutput, edit: &EditOutput) -> Result<Self> {
        let (a, b) = (&baseline.image, &edit.image);
        let (w, h) = a.dimensions();
        let (ra, rb) = (&baseline.report, &edit.report);
        let ratio = |x: f64, y: f64| x / y.max(1e-12);
        let denoise = |r: &crate::EditReport| r.stage_seconds(Stage::Denoise);
        Ok(Comparison {
            baseline: ra.schedule.clone(),
            psnr_db: psnr(a.as_raw(), b.as_raw())?,
            ssim: ssim(a.as_raw(), b.as_raw(), w as usize, h as usize, 3)?,
            speedup_denoise: ratio(denoise(ra), denoise(rb)),
            speedup_total: ratio(ra.total_seconds, rb.total_seconds),
        })
    }
}

/// A PSNR in JSON: a number, or `"inf"` for identical images (JSON has no infinity).
mod decibels {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Db {
        Finite(f64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() { Db::Finite(*v) } else { Db::Text(if *v > 0.0 { "inf" } else { "-inf" }.into()) }
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Db::deserialize(d)? {
            Db::Finite(v) => Ok(v),
            Db::Text(t) if t == "inf" => Ok(f64::INFINITY),
            Db::Text(t) if t == "-inf" => Ok(f64::NEG_INFINITY),
            Db::Text(t) => Err(serde::de::Error::custom(format!("`{t}` is not a PSNR"))),
        }
    }
}

/// Peak signal-to-noise ratio in dB for 8-bit data: `10·log10(255² / MSE)`; `+∞` for identical inputs.
pub fn psnr(a: &[u8], b: &[u8]) -> Result<f64> {
    if a.len() != b.len() || a.is_empty() {
        return Err(PipelineError::invalid(format!(
            "PSNR needs two non-empty images of the same size ({} vs {} values)",
            a.len(),
            b.len()
        )));
    }
    let se: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let mse = se / a.len() as f64;
    Ok(if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() })
}

const SIGMA: f64 = 1.5;
const TRUNCATE: f64 = 3.5;

/// The normalized 1-D Gaussian of scipy's `gaussian_filter` (radius `⌊3.5σ + 0.5⌋` = 5 → 11 taps).
fn gaussian_kernel() -> Vec<f64> {
    let radius = (TRUNCATE * SIGMA + 0.5) as i64;
    let w: Vec<f64> = (-radius..=radius).map(|x| (-0.5 / (SIGMA * SIGMA) * (x * x) as f64).exp()).collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|v| v / sum).collect()
}

/// scipy `reflect` (half-sample symmetric) index into `0..n`.
fn reflect(mut i: i64, n: i64) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * n;
    i = i.rem_euclid(period);
    if i >= n {
        i = period - 1 - i;
    }
    i as usize
}

/// Separable Gaussian filter of a `h × w` plane (rows, then columns; scipy filters axis 0 first).
fn gaussian_filter(x: &[f64], w: usize, h: usize, k: &[f64]) -> Vec<f64> {
    let r = (k.len() / 2) as i64;
    let mut tmp = vec![0.0; x.len()];
    for row in 0..h {
        for col in 0..w {
            let mut acc = 0.0;
            for (t, kv) in k.iter().enumerate() {
                let rr = reflect(row as i64 + t as i64 - r, h as i64);
                acc += kv * x[rr * w + col];
            }
            tmp[row * w + col] = acc;
        }
    }
    let mut out = vec![0.0; x.len()];
    for row in 0..h {
        for col in 0..w {
            let mut acc = 0.0;
            for (t, kv) in k.iter().enumerate() {
                let cc = reflect(col as i64 + t as i64 - r, w as i64);
                acc += kv * tmp[row * w + cc];
            }
            out[row * w + col] = acc;
        }
    }
    out
}

/// Mean SSIM of two 8-bit images `[height][width][channels]` (see the module docs for the exact definition).
///
/// Both sides must be at least 11 pixels (the window size), as scikit-image requires.
pub fn ssim(a: &[u8], b: &[u8], width: usize, height: usize, channels: usize) -> Result<f64> {
    let n = width * height * channels;
    if a.len() != n || b.len() != n || channels == 0 {
        return Err(PipelineError::invalid(format!(
            "SSIM needs two {width}x{height}x{channels} images ({n} values), got {} and {}",
            a.len(),
            b.len()
        )));
    }
    let k = gaussian_kernel();
    if width < k.len() || height < k.len() {
        return Err(PipelineError::invalid(format!(
            "SSIM needs images of at least {0}x{0} pixels, got {width}x{height}",
            k.len()
        )));
    }
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let pad = k.len() / 2;
    let mut total = 0.0;
    for ch in 0..channels {
        let plane =
            |img: &[u8]| -> Vec<f64> { img.iter().skip(ch).step_by(channels).map(|&v| v as f64).collect() };
        let (x, y) = (plane(a), plane(b));
        let prod = |p: &[f64], q: &[f64]| -> Vec<f64> { p.iter().zip(q).map(|(u, v)| u * v).collect() };
        let f = |p: &[f64]| gaussian_filter(p, width, height, &k);
        let (ux, uy) = (f(&x), f(&y));
        let (uxx, uyy, uxy) = (f(&prod(&x, &x)), f(&prod(&y, &y)), f(&prod(&x, &y)));
        let mut sum = 0.0;
        for row in pad..height - pad {
            for col in pad..width - pad {
                let i = row * width + col;
                let (mx, my) = (ux[i], uy[i]);
                let vx = uxx[i] - mx * mx;
                let vy = uyy[i] - my * my;
                let vxy = uxy[i] - mx * my;
                let s =
                    ((2.0 * mx * my + c1) * (2.0 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2));
                sum += s;
            }
        }
        total += sum / ((height - 2 * pad) * (width - 2 * pad)) as f64;
    }
    Ok(total / channels as f64)
}

/// A heat map of the per-pixel difference of two RGB images: the maximum absolute channel difference, amplified
/// by `gain` and mapped black → red → yellow → white. Returns interleaved RGB bytes of the same size.
pub fn difference_heatmap(a: &[u8], b: &[u8], gain: f32) -> Result<Vec<u8>> {
    if a.len() != b.len() || a.len() % 3 != 0 {
        return Err(PipelineError::invalid("the heat map needs two RGB images of the same size"));
    }
    Ok(a.chunks_exact(3)
        .zip(b.chunks_exact(3))
        .flat_map(|(p, q)| {
            let d = p.iter().zip(q).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0);
            let v = (d as f32 * gain / 255.0).clamp(0.0, 1.0) * 3.0;
            let ch = |lo: f32| ((v - lo).clamp(0.0, 1.0) * 255.0).round() as u8;
            [ch(0.0), ch(1.0), ch(2.0)]
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_is_scipys() {
        let k = gaussian_kernel();
        assert_eq!(k.len(), 11);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((k[5] - 0.26601172).abs() < 1e-6, "{}", k[5]);
    }

    #[test]
    fn reflect_is_half_sample_symmetric() {
        let idx: Vec<usize> = (-3..7).map(|i| reflect(i, 4)).collect();
        assert_eq!(idx, vec![2, 1, 0, 0, 1, 2, 3, 3, 2, 1]);
    }

    #[test]
    fn identical_images_score_perfectly_and_errors_are_reported() {
        let a: Vec<u8> = (0..20 * 20 * 3).map(|i| (i % 256) as u8).collect();
        assert!((ssim(&a, &a, 20, 20, 3).unwrap() - 1.0).abs() < 1e-12);
        assert!(ssim(&a, &a, 10, 10, 3).is_err());
        assert!(ssim(&a, &a[1..], 20, 20, 3).is_err());
        assert!(psnr(&a, &a[1..]).is_err());
        let b: Vec<u8> = a.iter().map(|v| v ^ 1).collect();
        let p = psnr(&a, &b).unwrap();
        assert!((p - 10.0 * (255f64 * 255.0).log10()).abs() < 1e-9, "{p}");
    }

    #[test]
    fn an_infinite_psnr_is_inf_in_json() {
        let c = Comparison {
            baseline: "none".into(),
            psnr_db: f64::INFINITY,
            ssim: 1.0,
            speedup_denoise: 2.0,
            speedup_total: 1.5,
        };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["psnr_db"], "inf");
        assert_eq!(serde_json::from_value::<Comparison>(json).unwrap(), c);
        let finite = Comparison { psnr_db: 31.5, ..c };
        assert_eq!(serde_json::to_value(&finite).unwrap()["psnr_db"], 31.5);
    }

    #[test]
    fn heatmap_maps_differences() {
        let a = vec![0u8, 0, 0, 10, 10, 10];
        let b = vec![0u8, 0, 0, 10, 10, 255];
        let h = difference_heatmap(&a, &b, 1.0).unwrap();
        assert_eq!(&h[..3], &[0, 0, 0]);
        assert_eq!(h[3], 255);
    }
}
