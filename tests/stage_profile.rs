//! [`QwenImageEditPipeline::profile_stages`] on the built-in demo snapshot: the stages around the networks, each as
//! the edit runs it and part by part, with the networks marked; under true CFG the negative prompt's language-model
//! pass is a part of its own; profiling leaves the pipeline as it was (the next edit is bit-identical).

use std::path::PathBuf;
use std::sync::OnceLock;

use qwen_image::{processor::DROP_IDX, CpuBackend};
use qwen_image_pipeline::{
    demo, EditProfile, EditRequest, LoadOptions, NoProgress, QwenImageEditPipeline, Stage,
};
use qwen_image_pruning::ScheduleSpec;

type B = CpuBackend;

fn pipeline() -> QwenImageEditPipeline<B> {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("qwen-stage-profile-{}", std::process::id()));
        demo::write_demo_snapshot(&dir).unwrap()
    });
    QwenImageEditPipeline::load(
        root.to_str().unwrap(),
        &LoadOptions::default(),
        &Default::default(),
        &mut NoProgress,
    )
    .unwrap()
}

fn request() -> EditRequest {
    let mut r = EditRequest::new(vec![demo::sample_image().unwrap()], "Make it purple");
    r.areas = demo::demo_areas();
    r.num_steps = 2;
    r
}

fn parts(profile: &EditProfile, stage: Stage) -> Vec<(String, bool)> {
    let s = profile.stages.iter().find(|s| s.stage == stage).unwrap();
    s.parts.iter().map(|p| (p.part.clone(), p.network)).collect()
}

fn named(names: &[(&str, bool)]) -> Vec<(String, bool)> {
    names.iter().map(|&(n, net)| (n.to_string(), net)).collect()
}

#[test]
fn stages_are_profiled_part_by_part_with_the_networks_marked() {
    let mut pipe = pipeline();
    let req = request();
    let before = pipe.edit(&req, &ScheduleSpec::None, &mut NoProgress).unwrap();
    let profile = pipe.profile_stages(&req, 2).unwrap();
    assert_eq!(profile.reps, 2);
    assert_eq!(profile.prompt_tokens, before.report.text_tokens + DROP_IDX);
    let order: Vec<Stage> = profile.stages.iter().map(|s| s.stage).collect();
    assert_eq!(order, [Stage::Preprocess, Stage::EncodeImage, Stage::EncodePrompt, Stage::Decode]);
    assert_eq!(
        parts(&profile, Stage::EncodePrompt),
        named(&[
            ("image processor", false),
            ("upload pixels", false),
            ("vision tower", true),
            ("language model", true),
            ("prompt embeddings", false)
        ])
    );
    assert_eq!(
        parts(&profile, Stage::EncodeImage),
        named(&[("upload image", false), ("VAE encode", true), ("normalize and pack", false)])
    );
    assert_eq!(
        parts(&profile, Stage::Decode),
        named(&[("unpack and de-normalize", false), ("VAE decode", true), ("read back to RGB", false)])
    );
    assert!(parts(&profile, Stage::Preprocess).iter().all(|(_, net)| !net));
    // Both encodings as the edit runs them, judged against both stages' networks.
    let nets: f64 = [Stage::EncodeImage, Stage::EncodePrompt]
        .map(|st| profile.stages.iter().find(|s| s.stage == st).unwrap().network_seconds())
        .iter()
        .sum();
    assert!(profile.encodings_seconds > 0.0 && profile.encodings_network_seconds() == nets && nets > 0.0);
    let fraction = profile.encodings_overhead_fraction().unwrap();
    assert_eq!(fraction, (profile.encodings_seconds - nets) / nets);
    for s in &profile.stages {
        assert!(s.seconds > 0.0 && s.seconds.is_finite(), "{s:?}");
        assert!(s.parts.iter().all(|p| p.seconds >= 0.0 && p.seconds.is_finite()), "{s:?}");
        let networks = s.network_seconds();
        assert_eq!(s.overhead_seconds(), s.seconds - networks);
        assert_eq!(s.overhead_fraction().is_some(), s.stage != Stage::Preprocess, "{s:?}");
        assert!(s.stage == Stage::Preprocess || networks > 0.0, "{s:?}");
    }
    // As data: the JSON round trip keeps everything.
    let json = serde_json::to_string(&profile).unwrap();
    assert_eq!(serde_json::from_str::<EditProfile>(&json).unwrap(), profile);
    // Profiling changed nothing the next edit depends on.
    let after = pipe.edit(&req, &ScheduleSpec::None, &mut NoProgress).unwrap();
    assert_eq!(after.latents, before.latents);
    assert_eq!(after.image, before.image);
}

#[test]
fn true_cfg_profiles_the_negative_prompt_separately() {
    let pipe = pipeline();
    let mut req = request();
    req.negative_prompt = Some("blurry".into());
    req.true_cfg_scale = 4.0;
    let profile = pipe.profile_stages(&req, 1).unwrap();
    let names: Vec<String> = parts(&profile, Stage::EncodePrompt).into_iter().map(|p| p.0).collect();
    assert_eq!(
        names,
        [
            "image processor",
            "upload pixels",
            "vision tower",
            "language model",
            "prompt embeddings",
            "language model (negative prompt)",
            "prompt embeddings (negative prompt)"
        ]
    );
    let prompt = profile.stages.iter().find(|s| s.stage == Stage::EncodePrompt).unwrap();
    assert_eq!(prompt.parts.iter().filter(|p| p.network).count(), 3);
}
