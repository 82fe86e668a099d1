//! `qwen-edit --demo` with the trained proxy model, and `qwen-edit eval`, end to end: outputs, grids, reports and
//! the error cases (clear message, non-zero exit, no panic).
//!
//! The demo tests run the proxy when this build bundles it (`crates/qwen-image-proxy/snapshots/README.md`), and
//! otherwise check the fallback to the tiny random model and the error for an explicit `--size proxy`. The eval
//! tests run the random-weight tiny Edit and Edit-Plus snapshots of the parity tests (`--edit-model`,
//! `--plus-model`): they check the mechanics, not the quality (that is `tests/proxy_quality.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen-edit-proxy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn qwen_edit(dir: &Path, args: &[&str]) -> (Output, String, String) {
    let o =
        Command::new(env!("CARGO_BIN_EXE_qwen-edit")).current_dir(dir).args(args).arg("-q").output().unwrap();
    let (out, err) =
        (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    (o, out, err)
}

fn repo(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel).display().to_string()
}

/// The eval arguments that pick the random-weight tiny snapshots.
fn tiny_models() -> [String; 4] {
    [
        "--edit-model".into(),
        repo("crates/qwen-image-pipeline/assets/demo_snapshot"),
        "--plus-model".into(),
        repo("tests/fixtures/pipeline/snapshot_plus"),
    ]
}

/// Whether this build bundles the trained Edit proxy (the one-image demo's model).
fn edit_bundled() -> bool {
    qwen_image_proxy::is_bundled(qwen_image_pipeline::Variant::Edit)
}

/// Whether this build bundles the trained Edit-Plus proxy (the demo's model for two or more images).
fn plus_bundled() -> bool {
    qwen_image_proxy::is_bundled(qwen_image_pipeline::Variant::EditPlus)
}

fn heldout() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/proxy/heldout").display().to_string()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn without_the_proxy_the_demo_falls_back_to_the_tiny_model() {
    if edit_bundled() {
        return; // the proxy tests below run instead
    }
    let dir = workdir("demo-fallback");
    let (o, out, err) = qwen_edit(&dir, &["--demo", "-s", "2"]);
    assert!(
        o.status.success() && out.contains("not bundled") && out.contains("RANDOM WEIGHTS"),
        "{out}\n{err}"
    );
    let (o, _, err) = qwen_edit(&dir, &["--demo", "--size", "proxy"]);
    assert!(!o.status.success() && err.contains("not bundled"), "{err}");
    let h = heldout();
    let (o, _, err) = qwen_edit(&dir, &["eval", "--heldout", &h, "--limit", "1"]);
    assert!(!o.status.success() && err.contains("--edit-model"), "{err}");
}

#[test]
fn the_demo_edits_a_held_out_scene_and_writes_a_grid() {
    if !edit_bundled() {
        return; // without_the_proxy_the_demo_falls_back_to_the_tiny_model runs instead
    }
    let dir = workdir("demo");
    let (o, out, err) = qwen_edit(&dir, &["--demo", "--no-pruning"]);
    assert!(o.status.success(), "{out}\n{err}");
    let scene = qwen_image_proxy::default_scene();
    assert!(out.contains("trained Qwen-Image-Edit proxy") && out.contains(scene.instruction), "{out}");
    assert!(
        out.contains("Against the ground truth:") && out.contains("before | after | ground truth"),
        "{out}"
    );
    let outs = files(&dir.join("outputs_pruning"));
    assert!(
        outs.iter().any(|f| f.starts_with("demo_")) && outs.contains(&"latest_demo.png".into()),
        "{outs:?}"
    );
    let grid = image::open(dir.join("outputs_pruning/latest_demo.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (3 * 128 + 2 * 4, 128));
}

#[test]
fn the_demo_takes_the_users_scene_and_instruction() {
    if !edit_bundled() {
        return; // without_the_proxy_the_demo_falls_back_to_the_tiny_model runs instead
    }
    let dir = workdir("demo-user");
    let scene = &qwen_image_proxy::SCENES[1];
    scene.source().unwrap().save(dir.join("scene.png")).unwrap();
    let (o, out, err) =
        qwen_edit(&dir, &["--demo", "-i", "scene.png", "-p", "Make the red circle blue", "--compare"]);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("Make the red circle blue") && out.contains("before | unpruned | after"), "{out}");
    assert!(!out.contains("Against the ground truth"), "no ground truth for the user's scene: {out}");
    let two = [
        "--demo",
        "-i",
        "scene.png",
        "-i",
        "scene.png",
        "-p",
        "Put the red disc of picture 1 in picture 2.",
        "-s",
        "2",
    ];
    let (o, out, err) = qwen_edit(&dir, &two);
    if plus_bundled() {
        assert!(
            o.status.success()
                && out.contains("proxy (Edit-Plus")
                && out.contains("picture 1 | picture 2 | after"),
            "two images run the Edit-Plus proxy, and the grid shows both:\n{out}\n{err}"
        );
        let grid = image::open(dir.join("outputs_pruning/latest_demo.png")).unwrap();
        assert_eq!((grid.width(), grid.height()), (3 * 128 + 2 * 4, 128));
    } else {
        assert!(
            !o.status.success() && err.contains("Edit-Plus proxy, which is not bundled"),
            "two images without the Edit-Plus proxy: a clear error\n{out}\n{err}"
        );
    }
    let (o, _, err) = qwen_edit(&dir, &["--demo", "-i", "scene.png"]);
    assert!(!o.status.success() && err.contains("needs the instruction"), "{err}");
    let (o, _, err) = qwen_edit(&dir, &["--demo", "--batch", "x.jsonl"]);
    assert!(!o.status.success() && err.contains("--batch is not available"), "{err}");
}

#[test]
fn eval_runs_schedules_and_writes_table_json_and_grids() {
    let dir = workdir("eval");
    let h = heldout();
    let args = [
        "eval",
        "--heldout",
        &h,
        "--limit",
        "2",
        "--schedules",
        "cat,reuse:2,3,4,region",
        "-o",
        "ev",
        "--worst",
        "2",
    ];
    let models = tiny_models();
    let args: Vec<&str> = args.into_iter().chain(models.iter().map(String::as_str)).collect();
    let (o, out, err) = qwen_edit(&dir, &args);
    assert!(o.status.success(), "{out}\n{err}");
    for want in ["edit/recolor", "plus/recolor", "DiT GFLOP/step (ran)", "reuse:2,3,4"] {
        assert!(out.contains(want), "`{want}` not in\n{out}");
    }
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ev/eval_report.json")).unwrap()).unwrap();
    let schedules: Vec<&str> =
        report["schedules"].as_array().unwrap().iter().map(|s| s["schedule"].as_str().unwrap()).collect();
    assert_eq!(schedules, ["none", "cat", "reuse:2,3,4", "region:0.2,1"]);
    assert_eq!(report["edits"], 2);
    let records = report["records"].as_array().unwrap();
    assert_eq!(records.len(), 8);
    let cat = &report["schedules"][1];
    assert!(cat["flops_ratio"].as_f64().unwrap() < 1.0, "{cat}");
    // The FLOPs of the plans that ran, per edit: a region's depend on the region each edit chose.
    let region = &report["schedules"][3];
    assert!(region["flops_ratio"].as_f64().unwrap() < 1.0, "{region}");
    let region_flops: Vec<f64> = records
        .iter()
        .filter(|r| r["schedule"] == "region:0.2,1")
        .map(|r| r["dit_flops_per_step"].as_f64().unwrap())
        .collect();
    let mean = region_flops.iter().sum::<f64>() / region_flops.len() as f64;
    assert!((region["dit_flops_per_step"].as_f64().unwrap() - mean).abs() <= 1e-9 * mean, "{region}");
    assert!(cat["all"]["drift"]["ssimulacra2"].as_f64().unwrap() > 0.0, "{cat}");
    assert!(report["schedules"][0]["all"]["drift"].is_null());
    let grids = files(&dir.join("ev"));
    assert!(grids.contains(&"worst_reuse_2_3_4.png".into()), "{grids:?}");
    let grid = image::open(dir.join("ev/worst_cat.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (4 * 128 + 3 * 4, 2 * 128 + 4));
}

#[test]
fn eval_guardrail_reaches_the_edits() {
    // A 0 drift threshold rejects every reuse step (any change exceeds it): each runs again with everything
    // computed, and both passes count, so `cat` costs more FLOPs than `none` instead of fewer.
    let dir = workdir("eval-guardrail");
    let h = heldout();
    let args =
        ["eval", "--heldout", &h, "--variant", "edit", "--limit", "1", "--schedules", "cat", "-o", "ev"];
    let models = tiny_models();
    let ratio = |extra: &[&str]| {
        let args: Vec<&str> = args
            .iter()
            .copied()
            .chain(models.iter().map(String::as_str))
            .chain(extra.iter().copied())
            .collect();
        let (o, out, err) = qwen_edit(&dir, &args);
        assert!(o.status.success(), "{out}\n{err}");
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("ev/eval_report.json")).unwrap()).unwrap();
        report["schedules"][1]["flops_ratio"].as_f64().unwrap()
    };
    let (plain, guarded) = (ratio(&[]), ratio(&["--guardrail", "0"]));
    assert!(
        plain < 1.0 && guarded > 1.0,
        "cat's FLOPs ratio: {plain} without the guardrail, {guarded} with it"
    );
}

#[test]
fn eval_refuses_bad_input_clearly() {
    let dir = workdir("eval-errors");
    let h = heldout();
    let (o, _, err) = qwen_edit(&dir, &["--demo", "eval"]);
    assert!(!o.status.success() && err.contains("eval"), "{err}");
    let cases: [(&[&str], &str); 6] = [
        (&["eval", "--heldout", "/no/such/heldout"], "scenes.py heldout"),
        (&["eval", "--heldout", &h, "--schedules", "none,purple"], "purple"),
        (&["eval", "--heldout", &h, "--schedules", "reuse:1,2"], "step 1 cannot reuse"),
        (&["eval", "--heldout", &h, "--tasks", "recolour"], "unknown task `recolour`"),
        (&["eval", "--heldout", &h, "--limit", "0"], "--limit"),
        (&["eval", "--heldout", &h, "--variant", "edit", "--tasks", "paste"], "no held-out edits"),
    ];
    let models = tiny_models();
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().copied().chain(models.iter().map(String::as_str)).collect();
        let (o, out, err) = qwen_edit(&dir, &args);
        assert!(!o.status.success(), "{args:?} succeeded\n{out}");
        assert!(err.contains(want) && !err.contains("panicked"), "{args:?}: `{want}` not in\n{err}");
    }
}
