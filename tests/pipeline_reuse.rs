//! Per-image reuse across edits ([`ReuseCache`]) and cancellation ([`Progress::cancelled`]), on the built-in demo
//! snapshot and the Edit-Plus fixture: a reused encoding gives bit-identical final latents, the second edit of an
//! image skips the VAE encode and the vision tower, and a cancelled edit stops between stages or steps.

use std::path::PathBuf;
use std::sync::OnceLock;

use qwen_image::{processor::RgbImage, CpuBackend};
use qwen_image_pipeline::{
    demo, EditRequest, ImageReuse, LoadOptions, NoProgress, PipelineError, Progress, QwenImageEditPipeline,
    ReuseCache, ReuseCounts, Stage, StepReport,
};
use qwen_image_pruning::ScheduleSpec;

type B = CpuBackend;

fn snapshot() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("qwen-pipeline-reuse-{}", std::process::id()));
        demo::write_demo_snapshot(&dir).unwrap()
    })
    .clone()
}

fn load(root: &str) -> QwenImageEditPipeline<B> {
    QwenImageEditPipeline::load(root, &LoadOptions::default(), &Default::default(), &mut NoProgress).unwrap()
}

fn request(images: Vec<RgbImage>, prompt: &str) -> EditRequest {
    let mut r = EditRequest::new(images, prompt);
    r.areas = demo::demo_areas();
    r.num_steps = 3;
    r
}

fn spec(s: &str) -> ScheduleSpec {
    s.parse().unwrap()
}

fn counts(hits: usize, misses: usize) -> ReuseCounts {
    ReuseCounts { hits, misses }
}

#[test]
fn reused_encodings_give_bit_identical_edits() {
    let mut p = load(snapshot().to_str().unwrap());
    let img = demo::sample_image().unwrap();
    let mut cache = ReuseCache::<B>::new(64 << 20);
    for prompt in ["Make it purple", "Add a hat"] {
        let req = request(vec![img.clone()], prompt);
        let fresh = p.edit(&req, &spec("cat"), &mut NoProgress).unwrap();
        let first = p.edit_with(&req, &spec("cat"), &mut NoProgress, &mut cache).unwrap();
        let again = p.edit_with(&req, &spec("cat"), &mut NoProgress, &mut cache).unwrap();
        // Bit-identical final latents and prompt embeddings, cached or not.
        assert_eq!(first.latents, fresh.latents);
        assert_eq!(again.latents, fresh.latents);
        assert_eq!(again.prompt_embeds, fresh.prompt_embeds);
        assert_eq!(fresh.report.image_reuse, counts(0, 0));
        assert_eq!(again.report.image_reuse, counts(2, 0), "VAE latents and vision embeddings reused");
        if prompt == "Make it purple" {
            assert_eq!(first.report.image_reuse, counts(0, 2));
        } else {
            assert_eq!(first.report.image_reuse, counts(2, 0), "a new prompt on the same image hits");
        }
    }
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.entries), (6, 2, 2));
    assert!(stats.bytes > 0 && stats.bytes <= stats.budget_bytes);

    // Another image misses; a tiny budget keeps nothing, and the edit is still exact.
    let (w, h) = (img.width(), img.height());
    let mut raw = img.clone().into_raw();
    raw[0] = raw[0].wrapping_add(1);
    let other = RgbImage::from_raw(w, h, raw).unwrap();
    let req = request(vec![other], "Make it purple");
    let out = p.edit_with(&req, &spec("none"), &mut NoProgress, &mut cache).unwrap();
    assert_eq!(out.report.image_reuse, counts(0, 2));
    let mut tiny = ReuseCache::<B>::new(16);
    for _ in 0..2 {
        let out2 = p.edit_with(&req, &spec("none"), &mut NoProgress, &mut tiny).unwrap();
        assert_eq!(out2.report.image_reuse, counts(0, 2));
        assert_eq!(out2.latents, out.latents);
    }
    assert_eq!(tiny.stats().entries, 0);
}

#[test]
fn edit_plus_reuses_each_image_and_the_image_set() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/snapshot_plus");
    let mut p = load(root.to_str().unwrap());
    let a = demo::sample_image().unwrap();
    let pixels: Vec<u8> = (0..40 * 90 * 3).map(|i| (i * 7 % 256) as u8).collect();
    let b = RgbImage::from_raw(40, 90, pixels).unwrap();
    let mut cache = ReuseCache::<B>::new(64 << 20);
    let ab = request(vec![a.clone(), b.clone()], "Combine them");
    p.edit_with(&ab, &spec("cat"), &mut NoProgress, &mut cache).unwrap();
    // [b, a]: each image's VAE latents hit; the vision embeddings of the new image set miss.
    let ba = request(vec![b, a], "Combine them");
    let fresh = p.edit(&ba, &spec("cat"), &mut NoProgress).unwrap();
    let reused = p.edit_with(&ba, &spec("cat"), &mut NoProgress, &mut cache).unwrap();
    assert_eq!(reused.report.image_reuse, counts(2, 1));
    assert_eq!(reused.latents, fresh.latents);
}

/// Cancels after `after_steps` denoising steps, counting the stages it saw.
struct CancelAfter {
    after_steps: usize,
    steps: usize,
    stages: Vec<Stage>,
}

impl Progress for CancelAfter {
    fn stage_started(&mut self, stage: Stage) {
        self.stages.push(stage);
    }
    fn step_finished(&mut self, _report: &StepReport) {
        self.steps += 1;
    }
    fn cancelled(&self) -> bool {
        self.steps >= self.after_steps
    }
}

#[test]
fn a_cancelled_edit_stops_between_steps_and_the_next_one_runs() {
    let mut p = load(snapshot().to_str().unwrap());
    let req = request(vec![demo::sample_image().unwrap()], "Make it purple");
    let base = p.edit(&req, &spec("cat"), &mut NoProgress).unwrap();
    for after_steps in [0, 1, 2] {
        let mut c = CancelAfter { after_steps, steps: 0, stages: Vec::new() };
        let e = p.edit(&req, &spec("cat"), &mut c).unwrap_err();
        assert!(matches!(e, PipelineError::Cancelled), "{e}");
        if after_steps == 0 {
            assert!(c.stages.is_empty(), "nothing ran: {:?}", c.stages);
        } else {
            assert_eq!(c.steps, after_steps, "stopped right after step {after_steps}");
            assert_eq!(c.stages.last(), Some(&Stage::Denoise));
        }
    }
    // The pipeline is still usable and gives the same result.
    let again = p.edit(&req, &spec("cat"), &mut NoProgress).unwrap();
    assert_eq!(again.latents, base.latents);
    let mut none = qwen_image_pipeline::NoReuse;
    assert!(!ImageReuse::<B>::enabled(&none) && ImageReuse::<B>::get(&mut none, &key()).is_none());
}

fn key() -> qwen_image_pipeline::ReuseKey {
    qwen_image_pipeline::ReuseKey::new(qwen_image_pipeline::EncodingKind::VaeLatents, &[])
}
