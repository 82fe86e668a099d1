//! The [`EditRequest`] of one case of an `edits.json` parity fixture, shared by the tests that read one
//! (`pipeline_edit_parity.rs`: tools/fixtures/pipeline.py; `proxy_parity.rs`: tools/proxy/fixtures.py). Both writers
//! store the same fields: per case `images` (files next to `edits.json`), `prompt`, `negative_prompt`,
//! `true_cfg_scale`, `steps`; per fixture `vae_area` and `condition_area`.

use std::path::Path;

use qwen_image::processor::load_image;
use qwen_image_pipeline::{EditRequest, ImageAreas};
use serde_json::Value;

/// The request of `case` of fixture `fx` (whose files are in `dir`), with the fixture's initial `noise`.
pub fn request(dir: &Path, fx: &Value, case: &Value, noise: Vec<f32>) -> EditRequest {
    let images = case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| load_image(&dir.join(n.as_str().unwrap())).unwrap());
    let mut req = EditRequest::new(images.collect(), case["prompt"].as_str().unwrap());
    req.negative_prompt = case["negative_prompt"].as_str().map(String::from);
    req.true_cfg_scale = case["true_cfg_scale"].as_f64().unwrap() as f32;
    req.num_steps = case["steps"].as_u64().unwrap() as usize;
    req.noise = Some(noise);
    req.areas = ImageAreas {
        vae: fx["vae_area"].as_u64().unwrap() as u32,
        condition: fx["condition_area"].as_u64().unwrap() as u32,
    };
    req
}
