//! Per-edit metrics: against the ground truth (with the held-out set's success rule), and against the unpruned
//! run of the same edit (how far a schedule drifts).
//!
//! **The success rule** is `scenes.score` of `tools/proxy/scenes.py` (docs/quality.md), re-implemented exactly:
//! with the mask (255 = core of the edited object, 128 = its anti-aliased edge, 0 = must not change),
//!
//! 1. ΔE76 between the CIELAB (sRGB, D65) of the output's mean RGB over the core and of the ground truth's mean RGB
//!    over the core (the manifest's `core_rgb`);
//! 2. PSNR of the output against the ground truth over the mask-0 pixels (all three channels, peak 255);
//! 3. success ⇔ ΔE76 ≤ [`DELTA_E_MAX`] and PSNR outside ≥ [`PSNR_OUTSIDE_MIN_DB`].
//!
//! "Inside" PSNR is over the pixels with mask > 0 (core and edge), as in `scenes.score`. Whole-image PSNR and SSIM
//! are the project's scikit-image-parity metrics ([`qwen_image_pipeline::metrics`]); SSIMULACRA2 comes from the
//! `ssimulacra2` crate (rust-av; 100 = identical, ~90 = visually lossless, 30 = low quality).

use qwen_image::processor::RgbImage;
use qwen_image_pipeline::metrics::{psnr, ssim};
use serde::{Deserialize, Serialize};

use crate::{json_f64, EvalError, Result};

/// The largest ΔE76 of the core's mean colour that counts as the right colour (named colours are ≥ 32 apart).
pub const DELTA_E_MAX: f64 = 10.0;

/// The lowest PSNR over the must-not-change pixels (mask 0) that counts as "left the rest alone", in dB.
pub const PSNR_OUTSIDE_MIN_DB: f64 = 25.0;

/// An output against the ground truth.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TruthScore {
    /// PSNR over the whole image, dB.
    #[serde(with = "json_f64")]
    pub psnr_db: f64,
    /// SSIM over the whole image.
    pub ssim: f64,
    /// PSNR over the pixels the edit changes (mask > 0), dB; NaN when there are none.
    #[serde(with = "json_f64")]
    pub psnr_inside_db: f64,
    /// PSNR over the pixels that must not change (mask 0), dB; NaN when there are none.
    #[serde(with = "json_f64")]
    pub psnr_outside_db: f64,
    /// ΔE76 of the core's mean colour against the ground truth's.
    #[serde(with = "json_f64")]
    pub delta_e: f64,
    /// The success rule (module docs).
    pub success: bool,
}

/// An output against the unpruned run's output of the same edit and seed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftScore {
    /// PSNR, dB (`inf` for identical images).
    #[serde(with = "json_f64")]
    pub psnr_db: f64,
    /// SSIM.
    pub ssim: f64,
    /// The largest absolute difference of any channel of any pixel (0–255).
    pub max_abs_diff: u8,
    /// SSIMULACRA2 of the output with the unpruned output as the reference (100 = identical).
    pub ssimulacra2: f64,
}

/// CIELAB (D65) of an sRGB colour with channels in 0–255 (`scenes.srgb_to_lab`).
pub fn srgb_to_lab(rgb: [f64; 3]) -> [f64; 3] {
    let lin = rgb.map(|v| {
        let c = v / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    });
    const M: [[f64; 3]; 3] = [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ];
    const WHITE: [f64; 3] = [0.95047, 1.0, 1.08883];
    let f = |i: usize| {
        let t = (M[i][0] * lin[0] + M[i][1] * lin[1] + M[i][2] * lin[2]) / WHITE[i];
        let d = 6.0f64 / 29.0;
        if t > d * d * d {
            t.cbrt()
        } else {
            t / (3.0 * d * d) + 4.0 / 29.0
        }
    };
    let (fx, fy, fz) = (f(0), f(1), f(2));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// ΔE76: the Euclidean distance of two sRGB colours (0–255) in CIELAB.
pub fn delta_e76(a: [f64; 3], b: [f64; 3]) -> f64 {
    let (la, lb) = (srgb_to_lab(a), srgb_to_lab(b));
    la.iter().zip(&lb).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt()
}

/// PSNR (peak 255) of two RGB images over the pixels whose mask value passes `keep`; NaN when none does, `inf`
/// when they are equal there.
pub fn masked_psnr(a: &RgbImage, b: &RgbImage, mask: &[u8], keep: impl Fn(u8) -> bool) -> f64 {
    let (mut se, mut n) = (0.0f64, 0usize);
    for ((p, q), &m) in a.pixels().zip(b.pixels()).zip(mask) {
        if keep(m) {
            se += p.0.iter().zip(&q.0).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>();
            n += 3;
        }
    }
    match (n, se) {
        (0, _) => f64::NAN,
        (_, 0.0) => f64::INFINITY,
        _ => 10.0 * (255.0f64 * 255.0 / (se / n as f64)).log10(),
    }
}

/// Mean RGB of `image` over the pixels with mask 255 (NaN when there are none).
fn core_mean(image: &RgbImage, mask: &[u8]) -> [f64; 3] {
    let mut sum = [0.0f64; 3];
    let mut n = 0usize;
    for (p, _) in image.pixels().zip(mask).filter(|(_, &m)| m == 255) {
        for (acc, &v) in sum.iter_mut().zip(&p.0) {
            *acc += v as f64;
        }
        n += 1;
    }
    sum.map(|s| s / n as f64)
}

fn same_size(a: &RgbImage, b: &RgbImage, what: &str) -> Result<()> {
    if a.dimensions() != b.dimensions() {
        return Err(EvalError::Invalid(format!(
            "{what}: the output is {}×{} but the reference is {}×{}",
            a.width(),
            a.height(),
            b.width(),
            b.height()
        )));
    }
    Ok(())
}

/// Scores `output` against the ground truth `target` with its `mask` and `core_rgb` (the success rule).
pub fn score_against_truth(
    output: &RgbImage,
    target: &RgbImage,
    mask: &[u8],
    core_rgb: [f64; 3],
) -> Result<TruthScore> {
    same_size(output, target, "ground truth")?;
    if mask.len() != (target.width() * target.height()) as usize {
        return Err(EvalError::Invalid("the mask is not the size of the ground truth".into()));
    }
    let (w, h) = output.dimensions();
    let delta_e = delta_e76(core_mean(output, mask), core_rgb);
    let psnr_outside_db = masked_psnr(output, target, mask, |m| m == 0);
    Ok(TruthScore {
        psnr_db: psnr(output.as_raw(), target.as_raw())?,
        ssim: ssim(output.as_raw(), target.as_raw(), w as usize, h as usize, 3)?,
        psnr_inside_db: masked_psnr(output, target, mask, |m| m > 0),
        psnr_outside_db,
        delta_e,
        success: delta_e <= DELTA_E_MAX && psnr_outside_db >= PSNR_OUTSIDE_MIN_DB,
    })
}

/// Scores `output` against `baseline`, the unpruned run's output of the same edit and seed.
pub fn drift_from_baseline(output: &RgbImage, baseline: &RgbImage) -> Result<DriftScore> {
    same_size(output, baseline, "baseline")?;
    let (w, h) = output.dimensions();
    let max_abs_diff =
        output.as_raw().iter().zip(baseline.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
    Ok(DriftScore {
        psnr_db: psnr(output.as_raw(), baseline.as_raw())?,
        ssim: ssim(output.as_raw(), baseline.as_raw(), w as usize, h as usize, 3)?,
        max_abs_diff,
        ssimulacra2: ssimulacra2(baseline, output)?,
    })
}

/// SSIMULACRA2 of `distorted` against `reference` (8-bit sRGB; at least 8×8 pixels).
pub fn ssimulacra2(reference: &RgbImage, distorted: &RgbImage) -> Result<f64> {
    use ssimulacra2::{compute_frame_ssimulacra2, ColorPrimaries, Rgb, TransferCharacteristic};
    let frame = |img: &RgbImage| {
        let data = img.pixels().map(|p| p.0.map(|v| v as f32 / 255.0)).collect();
        Rgb::new(
            data,
            img.width() as usize,
            img.height() as usize,
            TransferCharacteristic::SRGB,
            ColorPrimaries::BT709,
        )
        .map_err(|e| EvalError::Invalid(format!("SSIMULACRA2: {e}")))
    };
    compute_frame_ssimulacra2(frame(reference)?, frame(distorted)?)
        .map_err(|e| EvalError::Invalid(format!("SSIMULACRA2: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_matches_scenes_py() {
        // scenes.srgb_to_lab([40, 90, 235])
        let lab = srgb_to_lab([40.0, 90.0, 235.0]);
        let want = [43.88558612, 36.87578736, -77.37598229];
        for (a, b) in lab.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{lab:?}");
        }
        assert_eq!(delta_e76([10.0, 20.0, 30.0], [10.0, 20.0, 30.0]), 0.0);
    }

    #[test]
    fn the_success_rule_needs_the_colour_and_the_rest() {
        let target =
            RgbImage::from_fn(
                16,
                16,
                |x, _| if x < 8 { image::Rgb([200, 30, 30]) } else { image::Rgb([90; 3]) },
            );
        let mask: Vec<u8> = (0..256).map(|i| if i % 16 < 8 { 255 } else { 0 }).collect();
        let good = score_against_truth(&target, &target, &mask, [200.0, 30.0, 30.0]).unwrap();
        assert!(good.success && good.delta_e == 0.0 && good.psnr_outside_db.is_infinite());
        let wrong_colour = RgbImage::from_fn(16, 16, |x, y| {
            if x < 8 {
                image::Rgb([30, 30, 200])
            } else {
                *target.get_pixel(x, y)
            }
        });
        assert!(!score_against_truth(&wrong_colour, &target, &mask, [200.0, 30.0, 30.0]).unwrap().success);
        let spilled = RgbImage::from_fn(16, 16, |x, y| {
            if x < 12 {
                image::Rgb([200, 30, 30])
            } else {
                *target.get_pixel(x, y)
            }
        });
        let s = score_against_truth(&spilled, &target, &mask, [200.0, 30.0, 30.0]).unwrap();
        assert!(s.delta_e == 0.0 && s.psnr_outside_db < PSNR_OUTSIDE_MIN_DB && !s.success);
        assert!(score_against_truth(&RgbImage::new(8, 8), &target, &mask, [0.0; 3]).is_err());
    }

    #[test]
    fn drift_of_identical_images_is_perfect() {
        let a = RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 77]));
        let d = drift_from_baseline(&a, &a).unwrap();
        assert!(d.psnr_db.is_infinite() && d.max_abs_diff == 0 && (d.ssim - 1.0).abs() < 1e-12);
        assert!((d.ssimulacra2 - 100.0).abs() < 1e-6, "{}", d.ssimulacra2);
        let mut b = a.clone();
        b.get_pixel_mut(3, 4).0[1] = 255;
        let d = drift_from_baseline(&b, &a).unwrap();
        assert!(d.max_abs_diff == 255 - 32 && d.ssimulacra2 < 100.0);
    }
}
