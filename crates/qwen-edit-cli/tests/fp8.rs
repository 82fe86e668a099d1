//! `--quantize fp8` end to end on the built-in tiny random-weight demo model: the dry run, an edit with its report,
//! and the errors of the keep list.

mod support;

use serde_json::Value;
use support::{tiny_demo, workdir};

#[test]
fn the_dry_run_says_what_fp8_quantizes_and_loads_nothing() {
    let dir = workdir("fp8", "dry-run");
    let (ok, out, err) = tiny_demo(&dir, &["--quantize", "fp8", "--dry-run"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("Dry run: 1 edit(s) checked"), "{out}");
    assert!(out.contains("DiT weights: FP8 (e4m3, per-channel scales):") && out.contains("saved"), "{out}");
    assert!(out.contains("kept in F32: img_in, txt_in"), "{out}");
    assert!(out.contains("Text encoder weights: linear layers in FP8"), "{out}");
    // fp8-dit: the same DiT, the text encoder unquantized.
    let (ok, dit_only, err) = tiny_demo(&dir, &["--quantize", "fp8-dit", "--dry-run"]);
    assert!(ok, "{dit_only}\n{err}");
    assert!(
        dit_only.contains("DiT weights: FP8") && dit_only.contains("Text encoder weights: in F32"),
        "{dit_only}"
    );
    assert!(!out.contains("Loaded") && !dir.join("outputs_pruning").exists(), "{out}");
    // --low-memory quantizes img_mlp.net.2 too, unless the keep list is given.
    assert!(out.contains("img_mod, txt_mod, img_mlp.net.2"), "{out}");
    let (ok, low, err) = tiny_demo(&dir, &["--low-memory", "--dry-run"]);
    assert!(ok && low.contains("kept in F32: img_in") && !low.contains("img_mlp.net.2"), "{low}\n{err}");
    let (ok, low, err) = tiny_demo(&dir, &["--low-memory", "--quantize-keep", "default", "--dry-run"]);
    assert!(ok && low.contains("img_mod, txt_mod, img_mlp.net.2"), "{low}\n{err}");
    // Without --quantize the dry run says so too.
    let (ok, out, _) = tiny_demo(&dir, &["--dry-run", "--dtype", "bf16"]);
    assert!(ok && out.contains("DiT weights: no FP8 layers") && out.contains("in BF16"), "{out}");
    assert!(out.contains("Text encoder weights: in BF16"), "{out}");
}

#[test]
fn an_fp8_edit_reports_its_weights() {
    let dir = workdir("fp8", "edit");
    // With the joint attention in FP8 too (its host emulation on the CPU), and the pruning cache (`cat`) in 8 bits.
    let args = [
        "--quantize",
        "fp8",
        "--quantize-keep",
        "default,transformer_blocks.0",
        "--fp8-attention",
        "--fp8-cache",
    ];
    let (ok, out, err) = tiny_demo(&dir, &args);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("DiT weights: FP8"), "{out}");
    let reports = dir.join("outputs_pruning");
    let name = std::fs::read_dir(&reports)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .find(|f| f.starts_with("report_"))
        .expect("a report");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(reports.join(name)).unwrap()).unwrap();
    let weights = &report["dit_weights"];
    assert!(weights["fp8_layers"].as_u64().unwrap() > 0, "{weights}");
    assert!(weights["fp8_bytes"].as_u64() < weights["fp8_unquantized_bytes"].as_u64(), "{weights}");
    assert_eq!(weights["keep"].as_array().unwrap().last().unwrap(), "transformer_blocks.0");
    assert_eq!(weights["fp8_attention"], true, "{weights}");
    assert!(out.contains("joint attention in 8 bits"), "{out}");
    assert_eq!(weights["fp8_cache"], true, "{weights}");
    assert!(out.contains("pruning cache's keys and values in 8 bits"), "{out}");
}

#[test]
fn bad_quantize_options_are_clear_errors() {
    let dir = workdir("fp8", "errors");
    for (args, expect) in [
        (&["--quantize-keep", "img_in"][..], "--quantize-keep applies to --quantize fp8"),
        (&["--fp8-attention"][..], "--fp8-attention applies to --quantize fp8"),
        (&["--fp8-cache"][..], "--fp8-cache applies to --quantize fp8"),
        (
            &["--quantize", "fp8", "--quantize-keep", "img_in,img_out,to_z"],
            "names no layer of the model: img_out, to_z",
        ),
        (&["--quantize", "fp8", "--quantize-keep", "img_in,,proj_out"], "empty entry"),
        (&["--quantize", "int4"], "invalid value 'int4'"),
    ] {
        let (ok, out, err) = tiny_demo(&dir, args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!dir.join("outputs_pruning").exists());
}
