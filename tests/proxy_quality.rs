//! Edit quality on the trained proxy models, in CI: a fixed subset of the held-out set (24 edits spread over every
//! task of both variants, `tests/fixtures/proxy/heldout`) runs on the CPU under `none` and `cat`, and the baseline's
//! edit-success rate and PSNR against the ground truth must stay above floors, and `cat` within a margin of the
//! baseline. This is the test that fails when a change makes edits wrong (docs/quality.md).
//!
//! Also: the Rust success rule gives `scenes.score`'s numbers (tools/proxy/scenes.py) on held-out images.
//!
//! The subset tests need the trained snapshots embedded in `qwen-image-proxy` (both committed); with other trained
//! snapshots: `QWEN_IMAGE_PROXY_SNAPSHOTS=/path/to/trained cargo test --test proxy_quality -- --nocapture`.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use qwen_image::{
    processor::{load_image, RgbImage},
    CpuBackend,
};
use qwen_image_eval::{
    report::GroupStats, score::score_against_truth, EvalOptions, EvalReport, Evaluator, HeldOutSet,
    Selection, SetVariant,
};
use qwen_image_pipeline::{NoProgress, QwenImageEditPipeline, Snapshot, Variant};

/// Held-out edits in the subset (`Selection::limit`: spread evenly over the 9 variant/task groups).
const SUBSET_EDITS: usize = 24;

/// The floors of `none` on a subset.
#[derive(Clone, Copy, Debug)]
struct Floors {
    /// The lowest edit-success rate.
    none_min_success: f64,
    /// The lowest mean PSNR against the ground truth over the whole image, dB.
    none_min_psnr_db: f64,
    /// The lowest mean PSNR against the ground truth outside the object mask, dB.
    none_min_psnr_outside_db: f64,
}

// Floors: a few points under what the committed snapshot measures on the subset (`cargo test --release --test
// proxy_quality -- --nocapture` prints it), so that run-to-run noise does not fail CI but a broken edit does.

/// The Edit proxy's subset (the v4 snapshot measures success 95.8 % = 23 of 24, PSNR 35.08 dB, 34.37 dB outside
/// the mask; `cat` 23 of 24, 34.68 dB): two edits may flip before this fails (rule: tools/proxy/README.md).
const EDIT_FLOORS: Floors =
    Floors { none_min_success: 0.85, none_min_psnr_db: 34.0, none_min_psnr_outside_db: 33.3 };
/// Both variants' subset (v4: success 83.3 % = 20 of 24, PSNR 32.74 dB, 32.52 dB outside the mask; `cat` 20 of 24,
/// 32.56 dB).
const BOTH_FLOORS: Floors =
    Floors { none_min_success: 0.72, none_min_psnr_db: 31.7, none_min_psnr_outside_db: 31.5 };
/// How far `cat`'s success rate may fall below `none`'s (fraction of the edits: 0.125 = 3 of 24).
const CAT_MAX_SUCCESS_DROP: f64 = 0.125;
/// How far `cat`'s mean PSNR against the ground truth may fall below `none`'s, dB.
const CAT_MAX_PSNR_DROP_DB: f64 = 1.0;

fn heldout_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proxy/heldout")
}

fn pipeline(variant: Variant, dir: &Path) -> QwenImageEditPipeline<CpuBackend> {
    let root = qwen_image_proxy::write_snapshot(variant, dir).unwrap();
    let options = qwen_image_proxy::load_options(DType::F32);
    QwenImageEditPipeline::from_snapshot(
        Snapshot::open(&root).unwrap(),
        &options,
        &Default::default(),
        &mut NoProgress,
    )
    .unwrap()
}

fn describe(name: &str, g: &GroupStats) -> String {
    format!(
        "{name:<12} {:<18} {:>3} edits  success {:5.1} %  PSNR {:6.2} dB  inside {:6.2}  outside {:6.2}  ΔE {:5.1}",
        match (&g.variant, &g.task) {
            (Some(v), Some(t)) => format!("{}/{t}", v.name()),
            _ => "all".into(),
        },
        g.edits,
        100.0 * g.success_rate,
        g.psnr_db,
        g.psnr_inside_db,
        g.psnr_outside_db,
        g.delta_e
    )
}

/// `none` and `cat` on the subset of `variants` (`SUBSET_EDITS` edits spread over their tasks).
fn run_subset(variants: &[SetVariant]) -> EvalReport {
    let set = HeldOutSet::open(&heldout_dir()).unwrap();
    let selection =
        Selection { limit: Some(SUBSET_EDITS), variants: variants.to_vec(), ..Selection::default() };
    let edits = set.select(&selection).unwrap();
    assert_eq!(edits.len(), SUBSET_EDITS);
    let dir =
        std::env::temp_dir().join(format!("qwen-proxy-quality-{}-{}", std::process::id(), variants.len()));
    let pipes = variants.iter().map(|v| pipeline(v.pipeline_variant(), &dir)).collect();
    let _ = std::fs::remove_dir_all(&dir);
    let options = EvalOptions::new(vec!["none".parse().unwrap(), "cat".parse().unwrap()]);
    let run = Evaluator::new(pipes).run(&set, &edits, &options, &mut |_| {}).unwrap();
    run.report(&set, &options)
}

#[test]
fn the_edit_baseline_edits_correctly_and_cat_stays_close() {
    check_subset(&[SetVariant::Edit], EDIT_FLOORS);
}

#[test]
fn the_baseline_of_both_variants_edits_correctly_and_cat_stays_close() {
    check_subset(&[SetVariant::Edit, SetVariant::Plus], BOTH_FLOORS);
}

/// Runs the subset of `variants` and checks `floors` (printing every group first, so that a failure shows them).
fn check_subset(variants: &[SetVariant], floors: Floors) {
    let Floors { none_min_success, none_min_psnr_db, none_min_psnr_outside_db } = floors;
    let report = run_subset(variants);
    for s in &report.schedules {
        for g in std::iter::once(&s.all).chain(&s.groups) {
            println!("{}", describe(&s.schedule, g));
        }
        println!(
            "{:<12} {:.3} s per edit, {:.2}× speed-up, FLOPs ratio {:.3}",
            s.schedule, s.seconds, s.speedup, s.flops_ratio
        );
    }
    let (none, cat) = (&report.schedules[0], &report.schedules[1]);
    assert_eq!((none.schedule.as_str(), cat.schedule.as_str()), ("none", "cat"));
    let set = HeldOutSet::open(&heldout_dir()).unwrap();
    let tasks: std::collections::HashSet<_> =
        set.edits.iter().filter(|e| variants.contains(&e.variant)).map(|e| (e.variant, &e.task)).collect();
    assert_eq!(none.groups.len(), tasks.len(), "every task of {variants:?} is in the subset");
    let n = &none.all;
    assert!(n.success_rate >= none_min_success, "none: success {:.3} < {none_min_success}", n.success_rate);
    assert!(n.psnr_db >= none_min_psnr_db, "none: PSNR {:.2} dB < {none_min_psnr_db}", n.psnr_db);
    assert!(
        n.psnr_outside_db >= none_min_psnr_outside_db,
        "none: PSNR outside the mask {:.2} dB < {none_min_psnr_outside_db}",
        n.psnr_outside_db
    );
    let c = &cat.all;
    assert!(
        c.success_rate >= n.success_rate - CAT_MAX_SUCCESS_DROP,
        "cat: success {:.3} more than {CAT_MAX_SUCCESS_DROP} below none's {:.3}",
        c.success_rate,
        n.success_rate
    );
    assert!(
        c.psnr_db >= n.psnr_db - CAT_MAX_PSNR_DROP_DB,
        "cat: PSNR {:.2} dB more than {CAT_MAX_PSNR_DROP_DB} dB below none's {:.2}",
        c.psnr_db,
        n.psnr_db
    );
    assert!(cat.flops_ratio < 0.95, "cat plans fewer DiT FLOPs than none: {}", cat.flops_ratio);
}

#[test]
fn the_success_rule_gives_scenes_py_numbers() {
    // `scenes.score(out, tgt, mask, core_rgb)` with out = clip(tgt + ((131 y + 17 x + 7 c) mod 23) − 11), and with
    // out = the (last) source image, computed with tools/proxy/scenes.py.
    let cases = [
        (
            "edit_0000",
            false,
            [31.696264795092326, 31.700446316943204, 31.696186839261628, 0.1391292572290475],
            true,
        ),
        (
            "edit_0080",
            false,
            [31.696264795092326, 31.68272136342196, 31.696545357208883, 0.07280570825627196],
            true,
        ),
        (
            "plus_0100",
            false,
            [31.696602172025734, 31.725795801164516, 31.696107338058745, 0.15553111598918376],
            true,
        ),
        (
            "edit_0000",
            true,
            [28.497205095792395, 11.124218250031653, f64::INFINITY, 37.56966194547801],
            false,
        ),
        (
            "plus_0100",
            true,
            [23.525539309934615, 5.758845545181125, f64::INFINITY, 116.56659354979885],
            false,
        ),
    ];
    let set = HeldOutSet::open(&heldout_dir()).unwrap();
    for (id, from_source, want, success) in cases {
        let edit = set.edits.iter().find(|e| e.id == id).unwrap();
        let images = set.load(edit).unwrap();
        let output = if from_source {
            load_image(&set.dir.join(edit.sources.last().unwrap())).unwrap()
        } else {
            let (w, h) = images.target.dimensions();
            let raw = images.target.as_raw().iter().enumerate().map(|(i, &v)| {
                let (c, x, y) = ((i % 3) as u32, (i / 3) as u32 % w, (i / 3) as u32 / w);
                let d = ((131 * y + 17 * x + 7 * c) % 23) as i32 - 11;
                (v as i32 + d).clamp(0, 255) as u8
            });
            RgbImage::from_raw(w, h, raw.collect()).unwrap()
        };
        let s = score_against_truth(&output, &images.target, &images.mask, edit.core_rgb).unwrap();
        let got = [s.psnr_db, s.psnr_inside_db, s.psnr_outside_db, s.delta_e];
        for (g, w) in got.iter().zip(want) {
            assert!(g == &w || (g - w).abs() < 1e-9, "{id}: {got:?} vs {want:?}");
        }
        assert_eq!(s.success, success, "{id}");
    }
}
