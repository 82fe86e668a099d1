//! Output files (names, timestamps, atomic writes, the comparison grid) and the text tables.

use std::io::Write;
use std::path::{Path, PathBuf};

use qwen_image::processor::RgbImage;
use qwen_image_pipeline::{save_image, Comparison, EditReport, MemoryReading};

use crate::CliError;

/// `YYYYmmdd_HHMMSS` (UTC) of now.
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}_{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Names of the files of one invocation in the output folder.
#[derive(Clone, Debug)]
pub struct OutputNames {
    dir: PathBuf,
    stamp: String,
}

impl OutputNames {
    /// Files in `dir` stamped with `stamp`.
    pub fn new(dir: &Path, stamp: String) -> Self {
        OutputNames { dir: dir.to_path_buf(), stamp }
    }

    /// The output folder, where every file is written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn name(&self, kind: &str, index: Option<usize>, ext: &str) -> PathBuf {
        match index {
            Some(i) => self.dir.join(format!("{kind}_{}_{:03}.{ext}", self.stamp, i + 1)),
            None => self.dir.join(format!("{kind}_{}.{ext}", self.stamp)),
        }
    }

    /// `latest_{label}.png`.
    pub fn latest(&self, label: &str) -> PathBuf {
        self.dir.join(format!("latest_{label}.png"))
    }

    /// The JSON report of the invocation (`report_TIMESTAMP.json`).
    pub fn report(&self, index: Option<usize>) -> PathBuf {
        self.name("report", index, "json")
    }

    /// Writes `output_{label}_TIMESTAMP.png` and `latest_{label}.png`; returns the first.
    pub fn save(&self, image: &RgbImage, label: &str, index: Option<usize>) -> Result<PathBuf, CliError> {
        let path = self.name(&format!("output_{label}"), index, "png");
        save_image(image, &path)?;
        save_image(image, &self.latest(label))?;
        Ok(path)
    }

    /// Writes `{kind}_TIMESTAMP.png`; returns its path.
    pub fn save_plain(
        &self,
        image: &RgbImage,
        kind: &str,
        index: Option<usize>,
    ) -> Result<PathBuf, CliError> {
        let path = self.name(kind, index, "png");
        save_image(image, &path)?;
        Ok(path)
    }
}

/// Images side by side (same height), separated by 4 white pixels.
pub fn grid(images: &[&RgbImage]) -> RgbImage {
    let gap = 4;
    let h = images.iter().map(|i| i.height()).max().unwrap_or(0);
    let w = images.iter().map(|i| i.width()).sum::<u32>() + gap * images.len().saturating_sub(1) as u32;
    let mut out = RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let mut x0 = 0;
    for img in images {
        image::imageops::overlay(&mut out, *img, x0 as i64, 0);
        x0 += img.width() + gap;
    }
    out
}

/// Stage and step tables of one run.
pub fn print_report(out: &mut dyn Write, r: &EditReport) -> Result<(), CliError> {
    writeln!(out, "  {:<16} {:>10}", "stage", "seconds")?;
    for s in &r.stages {
        let queued =
            if s.queued { "  (queued, not awaited: on a GPU it finishes during the next stage)" } else { "" };
        writeln!(out, "  {:<16} {:>10.4}{queued}", s.stage.label(), s.seconds)?;
    }
    writeln!(
        out,
        "  {:>4} {:>7} {:>10} {:>9} {:>9} {:>12}  plan",
        "step", "sigma", "seconds", "computed", "reused", "cache bytes"
    )?;
    for s in &r.steps {
        writeln!(
            out,
            "  {:>4} {:>7.4} {:>10.4} {:>9} {:>9} {:>12}  {}",
            s.step + 1,
            s.sigma,
            s.seconds(),
            s.stats.computed_tokens,
            s.stats.reused_tokens,
            s.cache_bytes,
            s.plan_summary
        )?;
    }
    Ok(())
}

/// The `--compare` table.
pub fn print_comparison(
    out: &mut dyn Write,
    base: &EditReport,
    pruned: &EditReport,
    comparison: &Comparison,
) -> Result<(), CliError> {
    use qwen_image_pipeline::Stage;
    writeln!(out, "  {:<16} {:>12} {:>12} {:>9}", "", "baseline", pruned.schedule, "speedup")?;
    let row = |out: &mut dyn Write, name: &str, a: f64, b: f64| -> Result<(), CliError> {
        writeln!(out, "  {:<16} {:>11.4}s {:>11.4}s {:>8.2}x", name, a, b, a / b.max(1e-12))?;
        Ok(())
    };
    for stage in Stage::EDIT {
        row(out, stage.label(), base.stage_seconds(stage), pruned.stage_seconds(stage))?;
    }
    for (a, b) in base.steps.iter().zip(&pruned.steps) {
        row(out, &format!("  step {}", a.step + 1), a.seconds(), b.seconds())?;
    }
    row(out, "total", base.total_seconds, pruned.total_seconds)?;
    let psnr = comparison.psnr_db;
    let psnr = if psnr.is_finite() { format!("{psnr:.2} dB") } else { "inf (identical)".into() };
    writeln!(
        out,
        "  PSNR {psnr}, SSIM {:.4} (pruned vs baseline); cache peak {} bytes",
        comparison.ssim, pruned.cache_peak_bytes
    )?;
    Ok(())
}

/// The `--repeat` table: edit seconds and memory after each run, and the change from the first run to the last.
pub fn print_memory_table(out: &mut dyn Write, runs: &[(f64, MemoryReading)]) -> Result<(), CliError> {
    let gib =
        |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{:.3}", b as f64 / (1u64 << 30) as f64));
    writeln!(
        out,
        "  {:>4} {:>10} {:>13} {:>13} {:>13} {:>13}",
        "run", "seconds", "host RSS GiB", "GPU used GiB", "pool in use", "pool reserved"
    )?;
    for (i, (seconds, m)) in runs.iter().enumerate() {
        writeln!(
            out,
            "  {:>4} {:>10.3} {:>13} {:>13} {:>13} {:>13}",
            i + 1,
            seconds,
            gib(m.host_rss_bytes),
            gib(m.device_used_bytes),
            gib(m.pool_in_use_bytes),
            gib(m.pool_reserved_bytes)
        )?;
    }
    if let (Some((_, first)), Some((_, last))) = (runs.first(), runs.last()) {
        let d = |a: Option<u64>, b: Option<u64>| {
            a.zip(b).map_or("-".to_string(), |(a, b)| {
                format!("{:+.1} MiB", (b as f64 - a as f64) / (1u64 << 20) as f64)
            })
        };
        writeln!(
            out,
            "  growth from run 1 to run {}: host RSS {}, GPU used {}, pool in use {}, pool reserved {}",
            runs.len(),
            d(first.host_rss_bytes, last.host_rss_bytes),
            d(first.device_used_bytes, last.device_used_bytes),
            d(first.pool_in_use_bytes, last.pool_in_use_bytes),
            d(first.pool_reserved_bytes, last.pool_reserved_bytes)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_has_the_seed_format() {
        let t = timestamp();
        assert_eq!(t.len(), 15, "{t}");
        assert_eq!(&t[8..9], "_");
        assert!(t[..4].parse::<u32>().unwrap() >= 2024);
    }

    #[test]
    fn grid_places_images_side_by_side() {
        let a = RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3]));
        let b = RgbImage::from_pixel(2, 2, image::Rgb([9, 9, 9]));
        let g = grid(&[&a, &b]);
        assert_eq!(g.dimensions(), (9, 2));
        assert_eq!(g.get_pixel(7, 1).0, [9, 9, 9]);
        assert_eq!(g.get_pixel(4, 0).0, [255, 255, 255]);
    }
}
