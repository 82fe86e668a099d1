//! Scheduler parity against diffusers' `FlowMatchEulerDiscreteScheduler` (fixture from `tools/fixtures/pipeline.py`):
//! σ, timesteps and the timestep the DiT receives in f32 and bf16 runs, for the base and the Lightning configs.

use std::path::Path;

use burn::tensor::DType;
use qwen_image_pipeline::scheduler::{FlowMatchEulerScheduler, SchedulerConfig};
use serde_json::Value;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/scheduler.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().map_or(f32::NAN, |x| x as f32)).collect()
}

#[test]
fn sigmas_and_timesteps_equal_diffusers() {
    let fx = fixture();
    let mut compared = 0;
    for case in fx["cases"].as_array().unwrap() {
        let name = case["config"].as_str().unwrap();
        let cfg_json = serde_json::to_string(&fx["configs"][name]).unwrap();
        let sched = FlowMatchEulerScheduler::new(SchedulerConfig::from_json(&cfg_json).unwrap()).unwrap();
        let (steps, seq) =
            (case["steps"].as_u64().unwrap() as usize, case["seq_len"].as_u64().unwrap() as usize);
        let mu = sched.mu(seq);
        assert!((mu - case["mu"].as_f64().unwrap()).abs() < 1e-12, "{name} {seq}: mu {mu}");
        let want = floats(&case["sigmas"]);
        let got = sched.set_timesteps(steps, Some(mu));
        if want.iter().any(|v| v.is_nan()) {
            // diffusers divides 0 by 0 when the terminal stretch meets a single step; we refuse instead.
            assert!(got.is_err(), "{name} {steps} steps: expected an error, diffusers gives NaN");
            continue;
        }
        let got = got.unwrap();
        assert_eq!(got.sigmas, want, "{name} steps {steps} seq {seq}: sigmas");
        assert_eq!(got.timesteps, floats(&case["timesteps"]), "{name} steps {steps} seq {seq}: timesteps");
        assert_eq!(got.dit_timesteps(DType::BF16, 1000), floats(&case["dit_timesteps_bf16"]));
        assert_eq!(got.dit_timesteps(DType::F32, 1000), floats(&case["dit_timesteps_f32"]));
        compared += 1;
    }
    assert!(compared >= 78, "only {compared} cases compared");
}

#[test]
fn the_fixture_tells_base_from_lightning_and_resolutions_apart() {
    // Sensitivity: using the function defaults of `calculate_shift` (4096, 1.15) instead of the config's values, or
    // the wrong config, must change the result.
    let fx = fixture();
    let case = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["config"] == "base" && c["steps"] == 4 && c["seq_len"] == 1000)
        .unwrap()
        .clone();
    let mut wrong = SchedulerConfig::qwen_image();
    wrong.max_image_seq_len = 4096;
    wrong.max_shift = 1.15;
    let sched = FlowMatchEulerScheduler::new(wrong).unwrap();
    let got = sched.set_timesteps(4, Some(sched.mu(1000))).unwrap();
    let want = floats(&case["sigmas"]);
    assert!(got.sigmas.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-3));
    let light = FlowMatchEulerScheduler::new(SchedulerConfig::lightning()).unwrap();
    let got = light.set_timesteps(4, None).unwrap();
    assert!(got.sigmas.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-2));
}
