//! The `qwen-edit` binary end to end on the built-in tiny random-weight demo model (`--demo --size tiny`; the
//! trained proxy demo and `qwen-edit eval` are in `proxy.rs`): the seed's flags, `--compare`, `--report`, batch
//! mode, LoRA, and every error case of issue 4 (clear message, non-zero exit, no panic, no output file).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qwen_image::tensor_io::write_f32;
use serde_json::Value;

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen-edit-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn qwen_edit(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qwen-edit")).current_dir(dir).args(args).arg("-q").output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn sample(dir: &Path) -> PathBuf {
    let p = dir.join("input.png");
    std::fs::write(&p, qwen_image_pipeline::demo::SAMPLE_PNG).unwrap();
    p
}

fn report(dir: &Path) -> Value {
    let name = files(dir).into_iter().find(|f| f.starts_with("report_")).expect("a report");
    serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
}

#[test]
fn demo_runs_and_says_the_weights_are_random() {
    let dir = workdir("demo");
    let o = qwen_edit(&dir, &["--demo", "--size", "tiny"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("RANDOM WEIGHTS"), "{out}");
    assert!(out.contains("Inference time:"), "{out}");
    let outs = files(&dir.join("outputs_pruning"));
    assert!(outs.iter().any(|f| f.starts_with("output_pruning_") && f.ends_with(".png")), "{outs:?}");
    assert!(outs.contains(&"latest_pruning.png".to_string()), "{outs:?}");
    let r = report(&dir.join("outputs_pruning"));
    assert_eq!(r["random_weights"], true);
    assert_eq!(r["edits"][0]["runs"]["pruning"]["schedule"], "cat");
    assert_eq!(r["edits"][0]["runs"]["pruning"]["num_steps"], 4, "the seed's default is 4 steps");
}

#[test]
fn the_random_demo_with_two_images_runs_edit_plus() {
    let dir = workdir("demo-plus");
    let input = sample(&dir);
    let input = input.to_str().unwrap();
    let o = qwen_edit(&dir, &["--demo", "--size", "tiny", "-i", input, "-i", input, "-p", "Swap them"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let r = report(&dir.join("outputs_pruning"));
    assert_eq!(r["variant"], "EditPlus", "{r}");
    assert_eq!(r["random_weights"], true);
}

#[test]
fn variant_chooses_the_demo_pipeline() {
    // Edit-Plus on one image (issue 13's third benchmark case), on the bundled sample.
    let dir = workdir("demo-variant");
    let o = qwen_edit(&dir, &["--demo", "--size", "tiny", "--variant", "edit-plus"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let r = report(&dir.join("outputs_pruning"));
    assert_eq!(r["variant"], "EditPlus", "{r}");
    // Edit takes one image; --variant belongs to the demos.
    let input = sample(&dir);
    let input = input.to_str().unwrap();
    let two = ["--demo", "--size", "tiny", "--variant", "edit", "-i", input, "-i", input, "-p", "Swap them"];
    assert_fails("variant-edit-two-images", &two, &["1 input image"]);
    assert_fails("variant-without-demo", &["--variant", "edit-plus", "-i", input], &["--variant", "--demo"]);
}

#[test]
fn seed_flags_work() {
    let dir = workdir("seed-flags");
    let input = sample(&dir);
    let o = qwen_edit(
        &dir,
        &[
            "--demo",
            "--size",
            "tiny",
            "-i",
            input.to_str().unwrap(),
            "-p",
            "Add a rainbow",
            "-o",
            "outs",
            "-s",
            "3",
            "-c",
            "2.5",
            "--no-pruning",
            "--seed",
            "7",
            "--negative-prompt",
            "blurry",
            "--width",
            "96",
            "--height",
            "64",
            "--dtype",
            "f32",
            "--device",
            "cpu",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let outs = files(&dir.join("outs"));
    assert!(outs.iter().any(|f| f.starts_with("output_baseline_")), "{outs:?}");
    assert!(outs.contains(&"latest_baseline.png".to_string()));
    let r = report(&dir.join("outs"));
    let run = &r["edits"][0]["runs"]["baseline"];
    assert_eq!(run["num_steps"], 3);
    assert_eq!(run["true_cfg"], true);
    assert_eq!(run["seed"], 7);
    assert_eq!(run["schedule"], "none");
    assert_eq!((run["width"].as_u64(), run["height"].as_u64()), (Some(96), Some(64)));
    let img = image::open(dir.join("outs/latest_baseline.png")).unwrap();
    assert_eq!((img.width(), img.height()), (96, 64));
    assert_eq!(r["edits"][0]["prompt"], "Add a rainbow");
}

#[test]
fn compare_writes_both_images_heat_map_grid_and_metrics() {
    let dir = workdir("compare");
    let o = qwen_edit(
        &dir,
        &["--demo", "--size", "tiny", "--compare", "--schedule", "reuse:2,3,4", "--report", "my_report.json"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("PSNR") && out.contains("SSIM") && out.contains("speedup"), "{out}");
    let outs = files(&dir.join("outputs_pruning"));
    for prefix in ["output_baseline_", "output_pruning_", "diff_", "compare_", "report_"] {
        assert!(outs.iter().any(|f| f.starts_with(prefix)), "no {prefix}* in {outs:?}");
    }
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("my_report.json")).unwrap()).unwrap();
    let pruned = &r["edits"][0]["runs"]["pruning"];
    assert_eq!(pruned["schedule"], "reuse:2,3,4");
    assert!(pruned["cache_peak_bytes"].as_u64().unwrap() > 0);
    let c = &pruned["comparison"];
    assert_eq!(c["baseline"], "none");
    assert!(c["ssim"].as_f64().unwrap() > 0.0 && c["ssim"].as_f64().unwrap() <= 1.0);
    assert!(c["psnr_db"].is_number() || c["psnr_db"] == "inf");
    assert!(c["speedup_denoise"].as_f64().unwrap() > 0.0);
    assert!(r["edits"][0]["runs"]["baseline"]["comparison"].is_null());
    let outputs = &r["edits"][0]["outputs"];
    for key in ["baseline", "pruning", "difference", "grid"] {
        assert!(outputs[key].is_string(), "no {key} in {outputs}");
    }
    assert!(pruned["steps"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .all(|s| s["reused_tokens"].as_u64().unwrap() > 0));
    assert_eq!(r["edits"][0]["runs"]["baseline"]["steps"][1]["reused_tokens"], 0);
    let grid = image::open(
        dir.join("outputs_pruning").join(outs.iter().find(|f| f.starts_with("compare_")).unwrap()),
    )
    .unwrap();
    let single = image::open(dir.join("outputs_pruning/latest_baseline.png")).unwrap();
    assert_eq!(grid.width(), 4 * single.width() + 12, "input | baseline | pruned | heat map");
}

#[test]
fn batch_runs_three_edits_with_one_load() {
    let dir = workdir("batch");
    let input = sample(&dir);
    let p = input.to_str().unwrap();
    let jsonl = format!(
        "{{\"input\": \"{p}\", \"prompt\": \"Make it purple\"}}\n\
         # a comment\n\
         {{\"input\": [\"{p}\"], \"prompt\": \"Add a hat\", \"seed\": 3, \"steps\": 2}}\n\
         {{\"input\": \"{p}\", \"prompt\": \"Sunset\", \"schedule\": \"none\", \"cfg\": 2.0}}\n"
    );
    std::fs::write(dir.join("edits.jsonl"), jsonl).unwrap();
    let o = qwen_edit(&dir, &["--demo", "--size", "tiny", "--batch", "edits.jsonl"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(out.matches("Loaded ").count(), 1, "weights must be loaded once: {out}");
    assert!(out.contains("[3/3]"), "{out}");
    let r = report(&dir.join("outputs_pruning"));
    assert_eq!(r["weights_loaded"], 1);
    let edits = r["edits"].as_array().unwrap();
    assert_eq!(edits.len(), 3);
    assert_eq!(edits[1]["runs"]["pruning"]["num_steps"], 2);
    assert_eq!(edits[2]["runs"]["baseline"]["true_cfg"], true);
    let outs = files(&dir.join("outputs_pruning"));
    assert_eq!(outs.iter().filter(|f| f.starts_with("output_")).count(), 3, "{outs:?}");
}

/// A batch of two good lines (one with the schedule in its JSON form), three lines that are refused before loading
/// (a missing image, malformed JSON, a layer range beyond the model) and one that fails only at run time (one step:
/// the base scheduler's terminal stretch needs two).
fn mixed_batch(dir: &Path) -> PathBuf {
    let input = sample(dir);
    let p = input.to_str().unwrap();
    let jsonl = format!(
        "{{\"input\": \"{p}\", \"prompt\": \"Make it purple\", \"steps\": 2}}\n\
         {{\"input\": \"missing.png\", \"prompt\": \"Add a hat\"}}\n\
         {{\"input\": \"{p}\", \"prompt\": \"Sunset\"\n\
         {{\"input\": \"{p}\", \"prompt\": \"Snow\", \"schedule\": \"cat@0-9\"}}\n\
         {{\"input\": \"{p}\", \"prompt\": \"Fog\", \"steps\": 1, \"schedule\": \"none\"}}\n\
         {{\"input\": \"{p}\", \"prompt\": \"Rain\", \"steps\": 3, \"schedule\": {{\"type\": \"reuse\", \"steps\": [2, 3]}}}}\n"
    );
    let path = dir.join("edits.jsonl");
    std::fs::write(&path, jsonl).unwrap();
    path
}

#[test]
fn a_batch_with_bad_lines_reports_them_all_and_runs_nothing() {
    let dir = workdir("batch-bad");
    mixed_batch(&dir);
    let o = qwen_edit(&dir, &["--demo", "--size", "tiny", "--batch", "edits.jsonl"]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("3 of 6 edits") && err.contains("--keep-going"), "{err}");
    for want in
        ["line 2: input image", "missing.png", "line 3: not a valid edit", "line 4: schedule `cat@0-9`"]
    {
        assert!(err.contains(want), "`{want}` not in\n{err}");
    }
    assert!(!out.contains("Loaded"), "nothing is loaded while a line is bad: {out}");
    assert!(files(&dir.join("outputs_pruning")).is_empty());
}

#[test]
fn keep_going_runs_the_good_lines_and_the_exit_status_says_some_failed() {
    let dir = workdir("batch-keep-going");
    mixed_batch(&dir);
    let o = qwen_edit(&dir, &["--demo", "--size", "tiny", "--batch", "edits.jsonl", "--keep-going"]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "some lines failed: the exit status says so\n{out}");
    assert!(err.contains("4 of 6 edits did not run"), "{err}");
    assert!(out.contains("Skipping 3 of 6") && out.contains("[3/3]") && out.contains("Failed: "), "{out}");
    let r = report(&dir.join("outputs_pruning"));
    let edits = r["edits"].as_array().unwrap();
    assert_eq!(edits.iter().map(|e| e["line"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 6]);
    assert_eq!(edits[1]["runs"]["pruning"]["schedule"], "reuse:2,3");
    let failed = r["failed"].as_array().unwrap();
    let lines: Vec<u64> = failed.iter().map(|f| f["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, [2, 3, 4, 5]);
    let before: Vec<bool> = failed.iter().map(|f| f["before_loading"].as_bool().unwrap()).collect();
    assert_eq!(before, [true, true, true, false]);
    assert!(failed[3]["error"].as_str().unwrap().contains("at least 2 steps"), "{}", failed[3]);
    let outs = files(&dir.join("outputs_pruning"));
    assert_eq!(outs.iter().filter(|f| f.starts_with("output_")).count(), 2, "{outs:?}");
    assert_fails(
        "keep-going-alone",
        &["--demo", "--size", "tiny", "--keep-going"],
        &["--keep-going", "--batch"],
    );
}

#[test]
fn a_rounded_size_is_reported() {
    let dir = workdir("rounded-size");
    let o = qwen_edit(&dir, &["--demo", "--size", "tiny", "--width", "97", "--height", "64", "-s", "2"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("warning: width 97 rounded down to 96 (a multiple of 16)"), "{out}");
    let r = report(&dir.join("outputs_pruning"));
    let run = &r["edits"][0]["runs"]["pruning"];
    assert_eq!(run["width"], 96);
    assert_eq!(run["size_adjustments"][0]["side"], "width");
    assert_eq!(
        (run["size_adjustments"][0]["requested"].as_u64(), run["size_adjustments"][0]["used"].as_u64()),
        (Some(97), Some(96))
    );
    assert_eq!(run["size_adjustments"].as_array().unwrap().len(), 1);
}

#[test]
fn lora_is_applied_and_a_mismatched_lora_is_refused() {
    let dir = workdir("lora");
    // The demo DiT is 32 wide with 2 blocks.
    let good = dir.join("good.safetensors");
    write_f32(
        &good,
        &[
            ("lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight", vec![0.05; 4 * 32], vec![4, 32]),
            ("lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight", vec![0.05; 32 * 4], vec![32, 4]),
            ("lora_unet_transformer_blocks_0_attn_to_q.alpha", vec![4.0], vec![]),
        ],
    )
    .unwrap();
    let o = qwen_edit(&dir, &["--demo", "--size", "tiny", "--lora", good.to_str().unwrap(), "--steps", "2"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let r = report(&dir.join("outputs_pruning"));
    let stages: Vec<&str> =
        r["load_stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert!(stages.contains(&"load_lora"), "{stages:?}");
    // Lightning scheduler with a LoRA: σ = 1, 0.75 for 2 steps (3σ/(1+2σ) of 1, 0.5).
    let sigmas = r["edits"][0]["runs"]["pruning"]["sigmas"].as_array().unwrap();
    assert!((sigmas[1].as_f64().unwrap() - 0.75).abs() < 1e-6, "{sigmas:?}");

    let bad = dir.join("bad.safetensors");
    write_f32(&bad, &[("double_blocks.0.img_attn.qkv.lora_down.weight", vec![0.1; 4 * 32], vec![4, 32])])
        .unwrap();
    let out_dir = dir.join("bad_out");
    let o = qwen_edit(
        &dir,
        &["--demo", "--size", "tiny", "--lora", bad.to_str().unwrap(), "-o", out_dir.to_str().unwrap()],
    );
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("LoRA") && err.contains("double_blocks.0.img_attn.qkv"), "{err}");
    assert!(files(&out_dir).is_empty(), "no output on error");
}

fn assert_fails(name: &str, args: &[&str], expect: &[&str]) {
    let dir = workdir(name);
    sample(&dir);
    let o = qwen_edit(&dir, args);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{name}: succeeded\n{out}");
    assert!(!err.contains("panicked"), "{name}: panic\n{err}");
    for e in expect {
        assert!(err.contains(e), "{name}: `{e}` not in\n{err}");
    }
    assert!(files(&dir.join("outputs_pruning")).is_empty(), "{name}: wrote output files");
}

#[test]
fn errors_are_clear_and_leave_no_output() {
    assert_fails("missing-model", &["--model", "/no/such/folder", "-i", "input.png"], &["does not exist"]);
    assert_fails(
        "uncached-repo",
        &["--model", "Nobody/Nothing-At-All", "-i", "input.png"],
        &["Nobody/Nothing-At-All"],
    );
    assert_fails("empty-prompt", &["--demo", "--size", "tiny", "-p", "   "], &["prompt is empty"]);
    assert_fails("zero-steps", &["--demo", "--size", "tiny", "-s", "0"], &["at least 1"]);
    assert_fails(
        "reuse-first",
        &["--demo", "--size", "tiny", "--schedule", "reuse:1,2"],
        &["step 1 cannot reuse"],
    );
    assert_fails("bad-range", &["--demo", "--size", "tiny", "--schedule", "cat@0-9"], &["layer range"]);
    assert_fails("missing-image", &["--demo", "--size", "tiny", "-i", "nope.png"], &["nope.png"]);
    // Two or more images make the demo Edit-Plus (`the_random_demo_with_two_images_runs_edit_plus`), which takes 3.
    let four = ["-i", "input.png", "-i", "input.png", "-i", "input.png", "-i", "input.png"];
    assert_fails(
        "four-images-plus",
        &[&["--demo", "--size", "tiny"][..], &four].concat(),
        &["1 to 3 input images"],
    );
    assert_fails("negative-cfg", &["--demo", "--size", "tiny", "--cfg=-1"], &["CFG scale -1"]);
    assert_fails("no-cuda", &["--demo", "--size", "tiny", "--device", "cuda"], &["--features cuda"]);
    assert_fails(
        "missing-mask",
        &["--demo", "--size", "tiny", "--mask", "nope.png"],
        &["cannot read the mask"],
    );
    assert_fails("bad-region", &["--demo", "--size", "tiny", "--schedule", "region:0.1,1,9"], &["step 9"]);
    assert_fails(
        "bad-budget",
        &["--demo", "--size", "tiny", "--cache-budget", "lots"],
        &["not a byte count"],
    );
}

#[test]
fn mask_budget_and_guardrail_flags_reach_the_report() {
    let dir = workdir("mask");
    let input = image::open(sample(&dir)).unwrap();
    let (w, h) = (input.width(), input.height());
    image::GrayImage::from_fn(w, h, |x, _| image::Luma([if x < w / 2 { 255 } else { 0 }]))
        .save(dir.join("edit.png"))
        .unwrap();
    let args = [
        "--demo",
        "--size",
        "tiny",
        "-i",
        "input.png",
        "--mask",
        "edit.png",
        "--cache-budget",
        "1GiB",
        "--guardrail",
        "100",
    ];
    let o = qwen_edit(&dir, &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let r = report(&dir.join("outputs_pruning"));
    let run = &r["edits"][0]["runs"]["pruning"];
    let name = run["schedule"].as_str().unwrap();
    assert!(name.starts_with("mask(margin 1)+budget:1.00GiB") && name.ends_with("+guardrail:100"), "{name}");
    assert!(run["steps"][1]["plan"].as_str().unwrap().contains("target"), "{run}");
}

#[test]
fn unreadable_and_huge_images_are_refused() {
    let dir = workdir("images");
    std::fs::write(dir.join("text.png"), b"this is not an image").unwrap();
    // 16385 × 1 pixels: over the 16384-pixel side limit (refused before decoding).
    image::RgbImage::new(16385, 1).save(dir.join("huge.png")).unwrap();
    for (file, msg) in [("text.png", "not a PNG or JPEG"), ("huge.png", "16385")] {
        let o = qwen_edit(&dir, &["--demo", "--size", "tiny", "-i", file]);
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{file}");
        assert!(err.contains(msg) && !err.contains("panicked"), "{file}: {err}");
    }
    assert!(files(&dir.join("outputs_pruning")).is_empty());
}

#[test]
fn wrong_model_type_is_refused() {
    let dir = workdir("wrong-type");
    let root = qwen_image_pipeline::demo::write_demo_snapshot(&dir).unwrap();
    let index = root.join("model_index.json");
    let text_ =
        std::fs::read_to_string(&index).unwrap().replace("QwenImageEditPipeline", "QwenImagePipeline");
    std::fs::write(&index, text_).unwrap();
    sample(&dir);
    let o = qwen_edit(&dir, &["--model", root.to_str().unwrap(), "-i", "input.png"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("wrong model type") && err.contains("QwenImagePipeline"), "{err}");
    std::fs::remove_file(&index).unwrap();
    let o = qwen_edit(&dir, &["--model", root.to_str().unwrap(), "-i", "input.png"]);
    assert!(text(&o).1.contains("model_index.json"));
    assert!(files(&dir.join("outputs_pruning")).is_empty());
}

#[test]
fn help_lists_the_seed_flags() {
    let o = Command::new(env!("CARGO_BIN_EXE_qwen-edit")).arg("--help").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--input",
        "--prompt",
        "--output_dir",
        "--steps",
        "--cfg",
        "--no-pruning",
        "--model",
        "--lora",
        "--schedule",
        "--seed",
        "--negative-prompt",
        "--device",
        "--dtype",
        "--width",
        "--height",
        "--compare",
        "--report",
        "--batch",
        "--demo",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}");
    }
    assert!(out.contains("outputs_pruning") && out.contains("[default: 4]"));
}

#[test]
fn a_repo_id_is_found_in_the_hugging_face_cache() {
    let dir = workdir("hf-cache");
    let cache = dir.join("hub");
    let repo = cache.join("models--Qwen--Qwen-Image-Edit");
    let staging = dir.join("staging");
    let snap = qwen_image_pipeline::demo::write_demo_snapshot(&staging).unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::rename(&snap, repo.join("snapshots/0123abcd")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    sample(&dir);
    let o = Command::new(env!("CARGO_BIN_EXE_qwen-edit"))
        .current_dir(&dir)
        .env("HF_HUB_CACHE", &cache)
        .args(["-i", "input.png", "-s", "2", "-q", "--vae-area", "16384"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("Loaded Qwen/Qwen-Image-Edit"), "{out}");
}

#[test]
fn the_full_size_demo_is_refused_on_the_cpu_and_size_needs_demo() {
    assert_fails(
        "full-on-cpu",
        &["--demo", "--size", "full"],
        &["20 B-parameter", "--device cuda", "--allow-full-on-cpu"],
    );
    assert_fails("size-without-demo", &["--size", "full", "-i", "input.png"], &["--size", "--demo"]);
    assert_fails("bad-size", &["--demo", "--size", "huge"], &["huge"]);
    assert_fails("zero-repeat", &["--demo", "--size", "tiny", "--repeat", "0"], &["--repeat"]);
    // Without the cuda feature, the GPU path says how to build it (the CPU check comes first only for the CPU).
    if !cfg!(feature = "cuda") {
        assert_fails("full-no-cuda", &["--demo", "--size", "full", "--device", "cuda"], &["--features cuda"]);
    }
}

#[test]
fn release_memory_and_exact_allocation_change_no_pixel() {
    // Giving unused device memory back after every stage only frees what no tensor holds, and exact allocations only
    // place tensors differently: the same image.
    let image = |name: &str, extra: &[&str]| {
        let dir = workdir(name);
        let o = qwen_edit(&dir, &[&["--demo", "--size", "tiny", "-s", "2"], extra].concat());
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}\n{err}");
        let outs = dir.join("outputs_pruning");
        let png = files(&outs).into_iter().find(|f| f.ends_with(".png")).expect("an output image");
        std::fs::read(outs.join(png)).unwrap()
    };
    let pooled = image("release-off", &[]);
    assert_eq!(pooled, image("release-on", &["--release-memory"]));
    assert_eq!(pooled, image("exact-vae", &["--exact-allocation", "vae"]));
    assert_eq!(pooled, image("exact-all", &["--exact-allocation", "all", "--release-memory"]));
}

#[test]
fn repeat_runs_the_edit_n_times_and_reports_memory_after_each() {
    let dir = workdir("repeat");
    let o = qwen_edit(&dir, &["--demo", "--size", "tiny", "--repeat", "3", "-s", "2", "--compare"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(out.matches("Memory after the edit:").count(), 3, "{out}");
    assert!(out.contains("growth from run 1 to run 3"), "{out}");
    let r = report(&dir.join("outputs_pruning"));
    assert_eq!(r["size"], "tiny");
    assert_eq!(r["repeat"], 3);
    let edits = r["edits"].as_array().unwrap();
    assert_eq!(edits.len(), 3);
    for (i, e) in edits.iter().enumerate() {
        assert_eq!(e["run"], i + 1);
        assert!(e["runs"]["baseline"]["total_seconds"].as_f64().unwrap() > 0.0);
        let memory = &e["runs"]["pruning"]["memory"];
        if cfg!(target_os = "linux") {
            assert!(memory["host_rss_bytes"].as_u64().unwrap() > 1 << 20, "{memory}");
        }
        assert!(memory["device_used_bytes"].is_null(), "no GPU on the CPU backend");
        assert!(e["runs"]["pruning"]["fast_path"].is_null(), "no fast path on the CPU backend");
    }
    // The three runs of the same edit give the same image.
    let psnr = |e: &Value| e["runs"]["pruning"]["comparison"]["psnr_db"].clone();
    assert_eq!(psnr(&edits[0]), psnr(&edits[2]));
    if cfg!(target_os = "linux") {
        assert!(r["memory_growth"]["host_rss_bytes"].is_i64(), "{}", r["memory_growth"]);
    }
    // Every run wrote its own numbered images.
    let outs = files(&dir.join("outputs_pruning"));
    assert_eq!(outs.iter().filter(|f| f.starts_with("output_baseline_")).count(), 3, "{outs:?}");
}
