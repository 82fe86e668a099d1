//! Processor parity (fixtures from `tools/fixtures/processor.py`): resizing against Pillow 13 and torch 2.15 /
//! torchvision 0.29, the Qwen2-VL image processor against transformers 5.24 (torchvision and PIL backends), the
//! tokenizer against transformers' `Qwen2Tokenizer` with the real Qwen vocabulary, the edit prompts against
//! `Qwen2VLProcessor`, and the size rules against diffusers 0.42.
//!
//! Measured tolerances (all asserted): resize max abs difference **0** (0–255 units) for both resamplers and both
//! filters on real photos; `pixel_values` **bit-identical**; token ids identical.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use qwen_image::processor::{
    calculate_dimensions, encode_prompt, load_image, resize_with, smart_resize, tokenizer::IMAGE_PAD, Filter,
    GridThw, ImageProcessor, ImageProcessorConfig, PromptTemplate, QwenTokenizer, Resampler, RgbImage,
    DROP_IDX,
};
use qwen_image::tensor_io::TensorFile;
use qwen_image::ModelError;
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/processor")
}

/// A scratch folder under the target dir (reused between runs, so decompressed fixtures do not pile up).
fn temp_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("processor-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gunzip(src: &Path, dst: &Path) {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(src).unwrap()).read_to_end(&mut bytes).unwrap();
    qwen_image::tensor_io::write_atomic(dst, &bytes).unwrap();
}

fn expected() -> &'static TensorFile {
    static FILE: OnceLock<TensorFile> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = temp_dir("expected").join("expected.safetensors");
        gunzip(&dir().join("expected.safetensors.gz"), &path);
        TensorFile::open(&path).unwrap()
    })
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join(name)).unwrap()).unwrap()
}

/// A `[H, W, 3]` u8 tensor of the fixture as an image.
fn rgb(key: &str) -> RgbImage {
    let (values, shape) = expected().f32(key).unwrap();
    assert_eq!(shape.len(), 3, "{key}");
    RgbImage::from_raw(shape[1] as u32, shape[0] as u32, values.iter().map(|&v| v as u8).collect()).unwrap()
}

/// (max, mean) absolute difference in 0–255 units.
fn abs_diff(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut max, mut sum) = (0u8, 0u64);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += d as u64;
    }
    (max, sum as f64 / a.as_raw().len() as f64)
}

fn filter(name: &str) -> Filter {
    match name {
        "bicubic" => Filter::Bicubic,
        "lanczos" => Filter::Lanczos,
        other => panic!("unknown filter {other}"),
    }
}

fn resampler(name: &str) -> Resampler {
    match name {
        "pil" => Resampler::Pillow,
        "torch" => Resampler::Torch,
        other => panic!("unknown resampler {other}"),
    }
}

#[test]
fn resize_is_exact_against_pillow_and_torch_on_photos() {
    let cases = json("cases.json");
    let mut count = 0;
    for case in cases["resize"].as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        let src = load_image(&dir().join(format!("images/{}.png", case["image"].as_str().unwrap()))).unwrap();
        let (w, h) = (case["size"][0].as_u64().unwrap() as u32, case["size"][1].as_u64().unwrap() as u32);
        let out = resize_with(
            &src,
            w,
            h,
            filter(case["filter"].as_str().unwrap()),
            resampler(case["resampler"].as_str().unwrap()),
        )
        .unwrap();
        let (max, mean) = abs_diff(&out, &rgb(key));
        println!("{key:40} max {max} mean {mean:.4}");
        assert_eq!(max, 0, "{key}: max abs difference {max} (mean {mean:.4}) against the reference");
        count += 1;
    }
    assert!(count >= 40, "only {count} resize cases");
}

#[test]
fn the_resize_fixtures_tell_the_variants_apart() {
    // The other resampler or the other filter must not pass the exactness test above by accident.
    let src = load_image(&dir().join("images/coffee.png")).unwrap();
    for (w, h) in [(77, 58), (147, 110), (70, 120)] {
        let pil = rgb(&format!("resize/pil/coffee/bicubic/{w}x{h}"));
        let torch = resize_with(&src, w, h, Filter::Bicubic, Resampler::Torch).unwrap();
        let lanczos = resize_with(&src, w, h, Filter::Lanczos, Resampler::Pillow).unwrap();
        let (max_t, mean_t) = abs_diff(&torch, &pil);
        let (max_l, _) = abs_diff(&lanczos, &pil);
        println!(
            "{w}x{h}: torch vs Pillow bicubic max {max_t} mean {mean_t:.4}; Lanczos vs bicubic max {max_l}"
        );
        assert!(max_t > 0 && max_l > 5, "{w}x{h}: the variants are indistinguishable");
    }
}

fn case_config(case: &Value, resampler: Resampler) -> ImageProcessorConfig {
    ImageProcessorConfig {
        min_pixels: case["min_pixels"].as_u64().unwrap() as usize,
        max_pixels: case["max_pixels"].as_u64().unwrap() as usize,
        ..ImageProcessorConfig::default()
    }
    .with_resampler(resampler)
}

fn grid(key: &str) -> GridThw {
    let (g, shape) = expected().i64(key).unwrap();
    assert_eq!(shape, vec![1, 3]);
    GridThw { t: g[0] as usize, h: g[1] as usize, w: g[2] as usize }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn image_processor_matches_transformers_bit_for_bit() {
    let cases = json("cases.json");
    let mut pil_checked = 0;
    for case in cases["processor"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let input = rgb(&format!("proc/{name}/input"));
        for (backend, r) in [("torch", Resampler::Torch), ("pil", Resampler::Pillow)] {
            let proc = ImageProcessor::new(case_config(case, r)).unwrap();
            let resized = proc.resize(&input).unwrap();
            let key = format!("proc/{name}/resized_{backend}");
            if expected().contains(&key) {
                let (max, _) = abs_diff(&resized, &rgb(&key));
                assert_eq!(max, 0, "{name} {backend}: resized image differs by {max}");
            }
            let out = proc.preprocess(&input).unwrap();
            assert_eq!(out.grids, vec![grid(&format!("proc/{name}/grid_{backend}"))], "{name} {backend}");
            let key = format!("proc/{name}/pixel_values_{backend}");
            if !expected().contains(&key) {
                continue;
            }
            let (want, shape) = expected().f32(&key).unwrap();
            assert_eq!(out.shape().to_vec(), shape, "{name} {backend}");
            let err = max_abs(&out.values, &want);
            println!("{name:15} {backend:5} grid {:?}: pixel_values max abs diff {err:e}", out.grid_thw()[0]);
            assert_eq!(err, 0.0, "{name} {backend}: pixel_values differ by up to {err:e}");
            pil_checked += (backend == "pil") as usize;
        }
    }
    assert_eq!(pil_checked, 2);
}

#[test]
fn the_processor_fixtures_tell_the_backends_apart() {
    // Where the two backends' bicubic resizes differ, processing with the wrong one misses the fixture by far more
    // than rounding: the exact comparisons above would catch a backend mix-up.
    let case = &json("cases.json")["processor"][2];
    assert_eq!(case["name"], "mixed");
    let input = rgb("proc/mixed/input");
    let pil = ImageProcessor::new(case_config(case, Resampler::Pillow)).unwrap().preprocess(&input).unwrap();
    let want = expected().f32("proc/mixed/pixel_values_torch").unwrap().0;
    let err = max_abs(&pil.values, &want);
    println!("PIL-backend pixel_values vs the torchvision reference: max abs diff {err}");
    assert!(err > 0.01, "the backends agree to {err}");
}

#[test]
fn preprocessor_config_file_and_size_rules_match_the_references() {
    let config = ImageProcessorConfig::from_file(&dir().join("preprocessor_config.json")).unwrap();
    assert_eq!((config.min_pixels, config.max_pixels), (3136, 12845056));
    assert_eq!((config.patch_dim(), config.factor(), config.resampler), (1176, 28, Resampler::Torch));
    let cases = json("cases.json");
    for c in cases["smart_resize"].as_array().unwrap() {
        let (h, w) = (c["hw"][0].as_u64().unwrap() as usize, c["hw"][1].as_u64().unwrap() as usize);
        let (lo, hi) =
            (c["min_pixels"].as_u64().unwrap() as usize, c["max_pixels"].as_u64().unwrap() as usize);
        let want = (c["out"][0].as_u64().unwrap() as usize, c["out"][1].as_u64().unwrap() as usize);
        assert_eq!(smart_resize(h, w, 28, lo, hi).unwrap(), want, "{h}×{w} in [{lo}, {hi}]");
    }
    let mut errors = 0;
    for c in cases["calculate_dimensions"].as_array().unwrap() {
        let area = c["area"].as_u64().unwrap() as u32;
        let (w, h) = (c["wh"][0].as_f64().unwrap(), c["wh"][1].as_f64().unwrap());
        let want = (c["out"][0].as_u64().unwrap() as u32, c["out"][1].as_u64().unwrap() as u32);
        match calculate_dimensions(area, w / h) {
            Ok(got) => assert_eq!(got, want, "{w}×{h} at {area}"),
            // diffusers returns a zero side here (and fails later); we refuse it up front.
            Err(_) => {
                assert!(want.0 == 0 || want.1 == 0, "{w}×{h} at {area}: error but diffusers gives {want:?}");
                errors += 1;
            }
        }
    }
    assert_eq!(errors, 1, "only the 1×1000 image at 384² should be degenerate");
}

fn tokenizers() -> &'static (QwenTokenizer, QwenTokenizer) {
    static TOKENIZERS: OnceLock<(QwenTokenizer, QwenTokenizer)> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let src = dir().join("tokenizer");
        let json_dir = temp_dir("tokenizer-json");
        gunzip(&src.join("tokenizer.json.gz"), &json_dir.join("tokenizer.json"));
        let vm_dir = temp_dir("tokenizer-vm");
        gunzip(&src.join("vocab.json.gz"), &vm_dir.join("vocab.json"));
        gunzip(&src.join("merges.txt.gz"), &vm_dir.join("merges.txt"));
        for f in ["tokenizer_config.json", "added_tokens.json"] {
            std::fs::copy(src.join(f), vm_dir.join(f)).unwrap();
        }
        let from_json = QwenTokenizer::from_dir(&json_dir).unwrap();
        let assembled = QwenTokenizer::from_dir(&vm_dir).unwrap();
        (from_json, assembled)
    })
}

#[test]
fn tokenizer_matches_transformers_through_both_loading_paths() {
    let (from_json, assembled) = tokenizers();
    assert_eq!(from_json.vocab_size(), 151_657);
    assert_eq!(assembled.vocab_size(), 151_657);
    assert_eq!(from_json.image_pad_id(), 151_655);
    assert_eq!(assembled.token_to_id("<|vision_start|>"), Some(151_652));
    let tokens = json("tokens.json");
    let prompts = tokens["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 50);
    for p in prompts {
        let text = p["text"].as_str().unwrap();
        let want: Vec<u32> =
            p["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(from_json.encode(text).unwrap(), want, "tokenizer.json: {text:?}");
        assert_eq!(assembled.encode(text).unwrap(), want, "vocab.json + merges.txt: {text:?}");
    }
}

#[test]
fn tokenizer_loading_errors_are_clear() {
    let empty = temp_dir("tokenizer-empty");
    let err = QwenTokenizer::from_dir(&empty).unwrap_err().to_string();
    assert!(err.contains("no tokenizer found"), "{err}");
    let bad = temp_dir("tokenizer-bad");
    std::fs::write(bad.join("tokenizer.json"), "{\"not\": \"a tokenizer\"}").unwrap();
    assert!(matches!(QwenTokenizer::from_dir(&bad), Err(ModelError::Config { .. })));
    // A GPT-2 style vocabulary without the Qwen2-VL special tokens is refused.
    let plain = temp_dir("tokenizer-plain");
    std::fs::write(plain.join("vocab.json"), r#"{"a": 0, "b": 1, "ab": 2}"#).unwrap();
    std::fs::write(plain.join("merges.txt"), "#version: 0.2\na b\n").unwrap();
    let err = QwenTokenizer::from_dir(&plain).unwrap_err().to_string();
    assert!(err.contains("<|im_start|>"), "{err}");
    std::fs::write(plain.join("merges.txt"), "a b c\n").unwrap();
    assert!(QwenTokenizer::from_dir(&plain).unwrap_err().to_string().contains("line 1"));
}

fn template(name: &str) -> PromptTemplate {
    match name {
        "edit" => PromptTemplate::Edit,
        "edit_plus" => PromptTemplate::EditPlus,
        other => panic!("unknown template {other}"),
    }
}

#[test]
fn full_prompts_match_qwen2vl_processor() {
    let (tokenizer, _) = tokenizers();
    let config = ImageProcessorConfig::from_file(&dir().join("preprocessor_config.json")).unwrap();
    let proc = ImageProcessor::new(config).unwrap();
    for fp in json("tokens.json")["full_prompts"].as_array().unwrap() {
        let name = fp["name"].as_str().unwrap();
        let images: Vec<RgbImage> = fp["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| rgb(&format!("proc/{}/input", i.as_str().unwrap())))
            .collect();
        let pixels = proc.preprocess_all(&images).unwrap();
        let want_grids: Vec<GridThw> = serde_json::from_value::<Vec<[usize; 3]>>(fp["grids"].clone())
            .unwrap()
            .into_iter()
            .map(GridThw::from)
            .collect();
        assert_eq!(pixels.grid_thw(), want_grids, "{name}");
        // Several images: their pixel_values one after the other (the reference checked the same of its own).
        let want_pixels: Vec<f32> = fp["images"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|i| {
                expected().f32(&format!("proc/{}/pixel_values_torch", i.as_str().unwrap())).unwrap().0
            })
            .collect();
        assert_eq!(max_abs(&pixels.values, &want_pixels), 0.0, "{name}");
        let tpl = template(fp["template"].as_str().unwrap());
        let text = encode_prompt(
            tokenizer,
            tpl,
            fp["prompt"].as_str().unwrap(),
            &pixels.grids,
            proc.config().merge_size,
        )
        .unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(fp["input_ids"].clone()).unwrap();
        let want_mask: Vec<u32> = serde_json::from_value(fp["attention_mask"].clone()).unwrap();
        assert_eq!(text.input_ids, want_ids, "{name}");
        assert_eq!(text.attention_mask, want_mask, "{name}");
        let pads = text.input_ids.iter().filter(|&&i| i == tokenizer.image_pad_id()).count();
        assert_eq!(pads, pixels.grids.iter().map(|g| g.num_tokens(2)).sum::<usize>());
        println!("{name:14}: {} tokens, {pads} image tokens, grids {want_grids:?}", text.input_ids.len());
    }
}

#[test]
fn the_first_64_template_tokens_are_exactly_the_system_turn() {
    let (tokenizer, _) = tokenizers();
    let prefix = format!(
        "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n",
        qwen_image::processor::prompt::EDIT_SYSTEM_PROMPT
    );
    let grids = [GridThw { t: 1, h: 4, w: 4 }, GridThw { t: 1, h: 2, w: 6 }];
    for (tpl, n, first_kept) in
        [(PromptTemplate::Edit, 1, "<|vision_start|>"), (PromptTemplate::EditPlus, 2, "Picture")]
    {
        let ids = encode_prompt(tokenizer, tpl, "turn it blue", &grids[..n], 2).unwrap().input_ids;
        assert_eq!(tpl.drop_idx(), DROP_IDX);
        assert_eq!(tokenizer.decode(&ids[..DROP_IDX]).unwrap(), prefix, "{tpl:?}");
        assert_eq!(tokenizer.id_to_token(ids[DROP_IDX]).as_deref(), Some(first_kept), "{tpl:?}");
        // The prefix tokenizes on its own to the same 64 ids: nothing kept merges across the boundary.
        assert_eq!(tokenizer.encode(&prefix).unwrap(), ids[..DROP_IDX].to_vec());
        // The kept tokens end with `<|im_end|>\n<|im_start|>assistant\n`.
        let tail = tokenizer.decode(&ids[ids.len() - 5..]).unwrap();
        assert_eq!(tail, "<|im_end|>\n<|im_start|>assistant\n");
    }
}

#[test]
fn mismatched_prompts_and_images_are_errors() {
    let (tokenizer, _) = tokenizers();
    let g = GridThw { t: 1, h: 4, w: 4 };
    let err = |r: qwen_image::Result<_>| r.unwrap_err().to_string();
    assert!(err(encode_prompt(tokenizer, PromptTemplate::Edit, "", &[g], 2)).contains("empty"));
    assert!(err(encode_prompt(tokenizer, PromptTemplate::Edit, "x", &[g, g], 2)).contains("one image slot"));
    assert!(err(encode_prompt(tokenizer, PromptTemplate::EditPlus, "x", &[], 2)).contains("at least one"));
    let injected = format!("add a {IMAGE_PAD} here");
    assert!(err(encode_prompt(tokenizer, PromptTemplate::Edit, &injected, &[g], 2)).contains("reserved"));
    assert!(encode_prompt(tokenizer, PromptTemplate::Edit, " ", &[g], 2).is_ok());
}

#[test]
fn load_image_decodes_png_and_jpeg_and_refuses_bad_files() {
    let png = load_image(&dir().join("images/chelsea.png")).unwrap();
    assert_eq!(png.dimensions(), (128, 96));
    let jpeg = load_image(&dir().join("images/chelsea.jpg")).unwrap();
    let (max, mean) = abs_diff(&jpeg, &rgb("jpeg/chelsea"));
    println!("JPEG decode vs Pillow (libjpeg-turbo): max {max}, mean {mean:.3}");
    assert!(mean < 1.0 && max <= 8, "JPEG decode differs from Pillow: max {max}, mean {mean}");
    // EXIF orientation 6: stored landscape, shown rotated 90° clockwise.
    let rotated = load_image(&dir().join("images/chelsea_rot.jpg")).unwrap();
    assert_eq!(rotated.dimensions(), (96, 128));
    let (w, h) = jpeg.dimensions();
    let turned = RgbImage::from_fn(h, w, |x, y| *jpeg.get_pixel(y, h - 1 - x));
    assert_eq!(abs_diff(&rotated, &turned).0, 0);

    let missing = dir().join("images/missing.png");
    assert!(matches!(load_image(&missing), Err(ModelError::Io { .. })));
    let garbage = dir().join("cases.json");
    let err = load_image(&garbage).unwrap_err().to_string();
    assert!(err.contains("cases.json") && err.contains("not a PNG or JPEG"), "{err}");
}

#[test]
fn the_bundled_sample_runs_through_the_edit_preprocessing() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/qwen-image-pipeline/assets/sample.png");
    assert!(std::fs::metadata(&path).unwrap().len() <= 200 * 1024);
    let image = load_image(&path).unwrap();
    assert_eq!(image.dimensions(), (384, 256));
    let (w, h) = qwen_image::processor::edit_image_size(image.width(), image.height()).unwrap();
    assert_eq!((w, h), (1248, 832));
    let condition = qwen_image::processor::resize(&image, w, h, Filter::Lanczos).unwrap();
    let config = ImageProcessorConfig::from_file(&dir().join("preprocessor_config.json")).unwrap();
    let pixels = ImageProcessor::new(config).unwrap().preprocess(&condition).unwrap();
    // 832 → 840 and 1248 → 1260 (multiples of 28): 60 × 90 patches, 1350 image tokens.
    assert_eq!(pixels.grids, vec![GridThw { t: 1, h: 60, w: 90 }]);
    assert_eq!(pixels.values.len(), 5400 * 1176);
    let (tokenizer, _) = tokenizers();
    let text =
        encode_prompt(tokenizer, PromptTemplate::Edit, "give the cat a red scarf", &pixels.grids, 2).unwrap();
    let pads = text.input_ids.iter().filter(|&&i| i == tokenizer.image_pad_id()).count();
    assert_eq!(pads, 1350);
}
