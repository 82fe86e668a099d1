//! The memory check before loading: the first edit's [memory plan](qwen_image_pipeline::memory_plan) against the
//! device's free memory (`--device-memory`, else the driver's figure; nothing to check on the CPU). An edit that
//! cannot fit is refused with the memory modes that would, a tight one warned about, and `--dry-run` prints the
//! verdict ([`qwen_image_pipeline::MemoryFit`]). `--no-memory-check` skips it (the device is not even asked).

use std::io::Write;

use qwen_image::processor::RgbImage;
use qwen_image_pipeline::{
    plan_request, EditRequest, ImageAreas, LoadOptions, MemoryFit, MemoryPlan, MemoryProbe, SmallerMode,
    Snapshot,
};
use qwen_image_pruning::ScheduleSpec;

use crate::{args::Args, CliError};

/// The free device memory to plan against: `--device-memory`, else what `probe` reads (none on the CPU); none with
/// `--no-memory-check` outside a dry run.
pub(crate) fn available(args: &Args, probe: &MemoryProbe) -> Option<u64> {
    if args.no_memory_check && !args.dry_run {
        return None;
    }
    args.device_memory.or_else(|| probe.read().device_free_bytes())
}

/// `qwen-edit serve`'s check before it loads: one image at the served `areas` with the default schedule and steps
/// (requests vary; a typical one), against `available` bytes. An error when it cannot fit, a warning (logged) when
/// it is tight.
pub(crate) fn check_served(
    snapshot: &Snapshot,
    options: &LoadOptions,
    areas: ImageAreas,
    steps: usize,
    schedule: &ScheduleSpec,
    available: Option<u64>,
) -> Result<(), CliError> {
    let Some(available) = available else { return Ok(()) };
    // A square image of about the VAE area (it is resized to that area whatever its size).
    let side = f64::from(areas.vae).sqrt().round().max(16.0) as u32;
    let mut request =
        EditRequest::new(vec![RgbImage::new(side, side)], "Make the sky a deep orange at sunset");
    (request.areas, request.num_steps) = (areas, steps);
    let plan = plan_request(snapshot, &request, schedule, options)?;
    let fit = MemoryFit::check(&plan, snapshot, &request, schedule, options, available)?;
    let subject = format!("a typical request (one {side}×{side} image, `{schedule}`, {steps} steps)");
    if let Some(warning) = judge(&subject, &fit, "serves anyway")? {
        tracing::warn!("{warning}");
    }
    Ok(())
}

/// Checks the first edit's `plan` against `available` bytes before loading: an error when it cannot fit, a warning
/// on `out` when it is tight.
pub(crate) fn check(
    plan: &MemoryPlan,
    snapshot: &Snapshot,
    options: &LoadOptions,
    (request, schedule): (&EditRequest, &ScheduleSpec),
    available: Option<u64>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let Some(available) = available else { return Ok(()) };
    let fit = MemoryFit::check(plan, snapshot, request, schedule, options, available)?;
    if let Some(warning) = judge("the first edit", &fit, "runs it anyway")? {
        writeln!(out, "Warning: {warning}")?;
    }
    Ok(())
}

/// An error when `fit` says `subject` cannot fit (with what `--no-memory-check` then does, `anyway`), the warning
/// to give when it is tight, else nothing.
fn judge(subject: &str, fit: &MemoryFit, anyway: &str) -> Result<Option<String>, CliError> {
    if !fit.fits() {
        return Err(format!("{}; --no-memory-check {anyway}", verdict_for(subject, fit)).into());
    }
    Ok((!fit.comfortable()).then(|| verdict_for(subject, fit)))
}

/// One sentence on `fit`: whether the plan fits the free memory, and what the smaller modes would need.
pub(crate) fn verdict(fit: &MemoryFit) -> String {
    verdict_for("the first edit", fit)
}

/// [`verdict`] for the edit `subject` names.
fn verdict_for(subject: &str, fit: &MemoryFit) -> String {
    let (peak, free) = (gib(fit.peak_bytes), gib(fit.available_bytes));
    let head = if fit.comfortable() {
        format!("{subject}'s memory plan peaks at {peak} of {free} of free device memory: it fits")
    } else if fit.fits() {
        format!(
            "{subject}'s memory plan peaks at {peak} of {free} of free device memory, too close to be sure \
             (measured peaks ran up to 3 GiB above the plan in the pooled modes, docs/memory.md)"
        )
    } else {
        format!("{subject} needs about {peak} of device memory by its memory plan, and {free} are free")
    };
    let describe = |fits: bool| -> Vec<String> {
        let modes = fit.smaller.iter().filter(|&&(_, peak)| (peak <= fit.available_bytes) == fits);
        modes.map(|&(mode, peak)| format!("{} (about {})", flag(mode), gib(peak))).collect()
    };
    let (fitting, too_large) = (describe(true), describe(false));
    let mut line = head;
    if !fitting.is_empty() {
        line.push_str(&format!(": use {}", or_list(&fitting)));
    }
    match (fitting.is_empty(), too_large.is_empty()) {
        (_, true) => {}
        (false, false) => line.push_str(&format!("; {} would not fit", or_list(&too_large))),
        (true, false) => {
            line.push_str(&format!("; the smaller modes would not fit either: {}", too_large.join(", ")))
        }
    }
    line
}

/// `a`, `a or b`, `a, b or c`.
fn or_list(items: &[String]) -> String {
    match items.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The command-line flag of a memory mode.
fn flag(mode: SmallerMode) -> &'static str {
    match mode {
        SmallerMode::Fp8 => "--quantize fp8",
        SmallerMode::Fp8Cache => "--quantize fp8 --fp8-cache",
        SmallerMode::LowMemory => "--low-memory",
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_names_the_modes_that_fit() {
        const G: u64 = 1 << 30;
        let fit = MemoryFit {
            peak_bytes: 48 * G,
            available_bytes: 22 * G,
            smaller: vec![(SmallerMode::Fp8, 30 * G), (SmallerMode::LowMemory, 19 * G)],
        };
        assert_eq!(
            verdict(&fit),
            "the first edit needs about 48.00 GiB of device memory by its memory plan, and 22.00 GiB are free: use \
             --low-memory (about 19.00 GiB); --quantize fp8 (about 30.00 GiB) would not fit"
        );
        let none = MemoryFit { available_bytes: 10 * G, ..fit };
        assert!(verdict(&none).ends_with(
            "the smaller modes would not fit either: --quantize fp8 (about 30.00 GiB), --low-memory (about 19.00 GiB)"
        ));
        let three = MemoryFit {
            peak_bytes: 48 * G,
            available_bytes: 44 * G,
            smaller: vec![
                (SmallerMode::Fp8, 30 * G),
                (SmallerMode::Fp8Cache, 28 * G),
                (SmallerMode::LowMemory, 19 * G),
            ],
        };
        assert!(verdict(&three).ends_with(
            "use --quantize fp8 (about 30.00 GiB), --quantize fp8 --fp8-cache (about 28.00 GiB) or --low-memory \
             (about 19.00 GiB)"
        ));
        let fits = MemoryFit { peak_bytes: 19 * G, available_bytes: 78 * G, smaller: vec![] };
        assert!(verdict(&fits).ends_with("it fits"), "{}", verdict(&fits));
    }
}
