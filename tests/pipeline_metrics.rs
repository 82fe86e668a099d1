//! PSNR and SSIM parity against scikit-image (fixture from `tools/fixtures/pipeline.py`).

use std::path::Path;

use qwen_image::tensor_io::TensorFile;
use qwen_image_pipeline::metrics::{psnr, ssim};
use serde_json::Value;

fn dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline")
}

fn image(file: &TensorFile, name: &str) -> (Vec<u8>, Vec<usize>) {
    let (v, shape) = file.f32(name).unwrap();
    (v.into_iter().map(|x| x as u8).collect(), shape)
}

#[test]
fn psnr_and_ssim_match_scikit_image() {
    let file = TensorFile::open(&dir().join("metrics.safetensors")).unwrap();
    let values: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("metrics.json")).unwrap()).unwrap();
    let obj = values.as_object().unwrap();
    assert!(obj.len() >= 9);
    for (key, want) in obj {
        let (x, shape) = image(&file, &format!("{key}.x"));
        let (y, _) = image(&file, &format!("{key}.y"));
        let (h, w, c) = (shape[0], shape[1], shape[2]);
        let p = psnr(&x, &y).unwrap();
        let s = ssim(&x, &y, w, h, c).unwrap();
        let (wp, ws) = (want["psnr"].as_f64().unwrap(), want["ssim"].as_f64().unwrap());
        println!("{key}: psnr {p:.6} (skimage {wp:.6}), ssim {s:.8} (skimage {ws:.8})");
        assert!((p - wp).abs() < 1e-9, "{key}: psnr {p} vs {wp}");
        assert!((s - ws).abs() < 1e-9, "{key}: ssim {s} vs {ws}");
        // The fixture discriminates the Gaussian window from scikit-image's default uniform window.
        let wu = want["ssim_uniform"].as_f64().unwrap();
        assert!((s - wu).abs() > 1e-4, "{key}: gaussian and uniform SSIM agree ({s} vs {wu})");
    }
}
