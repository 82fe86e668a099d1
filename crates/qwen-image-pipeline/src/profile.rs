//! [`EditProfile`]: where the time of the stages around the networks goes — each stage as an edit runs it next to
//! its parts run one at a time (host work, uploads, the network, read-backs), so that a stage's overhead over its
//! network's own time is measured directly (issue 13: "each stage within 10 % of its network's own time").
//!
//! How to use: after a warm-up edit (kernels compiled), [`QwenImageEditPipeline::profile_stages`] runs the
//! preprocessing, prompt-encoding, image-encoding and decoding stages of a request `reps` times (the same code as
//! [`edit`](QwenImageEditPipeline::edit), with a device synchronization at the end of each stage), then each part
//! alone with a synchronization after it, and reports medians. `pipeline_bench --stages` prints and saves it.
//! Each stage is measured on its own, in this order; the edit queues image encoding ahead of prompt encoding
//! without waiting (`StageClock::queue`), so there the two overlap: [`EditProfile::encodings_seconds`] times them
//! as the edit runs them.
//! The denoising loop is left out (the DiT benchmark and the edit's own report cover it); decoding starts from the
//! initial noise, which costs what final latents cost.

use std::time::Instant;

use qwen_image::{ops::QwenBackend, processor::RgbImage};
use qwen_image_pruning::ScheduleSpec;
use serde::{Deserialize, Serialize};

use crate::{
    edit::{joined, prompt_conditioning, EditInputs},
    latents::tensor_to_image,
    progress::{sync, Stage},
    request::EditRequest,
    reuse::{NoReuse, ReuseCounts},
    sizes::EditSizes,
    QwenImageEditPipeline, Result,
};

/// One part of a stage, timed alone (the device synchronized after it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartTiming {
    /// What the part does (`"upload pixels"`, `"vision tower"`, …).
    pub part: String,
    /// Median seconds.
    pub seconds: f64,
    /// Whether the part is a network's own forward pass (the rest is the stage's overhead).
    pub network: bool,
}

/// A stage as the edit runs it, and its parts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageProfile {
    /// The stage.
    pub stage: Stage,
    /// Median seconds of the whole stage, run as the edit runs it (one synchronization at its end).
    pub seconds: f64,
    /// The parts, in order.
    pub parts: Vec<PartTiming>,
}

impl StageProfile {
    /// Seconds of the parts that are networks.
    pub fn network_seconds(&self) -> f64 {
        self.parts.iter().filter(|p| p.network).map(|p| p.seconds).sum()
    }

    /// The stage's time beyond its networks' (negative when the parts overlap less than the stage does).
    pub fn overhead_seconds(&self) -> f64 {
        self.seconds - self.network_seconds()
    }

    /// [`overhead_seconds`](Self::overhead_seconds) over the networks' time (`None` for a stage without one).
    pub fn overhead_fraction(&self) -> Option<f64> {
        let net = self.network_seconds();
        (net > 0.0).then(|| self.overhead_seconds() / net)
    }
}

/// The profile of one request's stages around the networks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EditProfile {
    /// Timed repetitions (after one untimed run); times are medians.
    pub reps: usize,
    /// Text-encoder tokens of the prompt.
    pub prompt_tokens: usize,
    /// Preprocess, encode image, encode prompt, decode.
    pub stages: Vec<StageProfile>,
    /// Median seconds of image and prompt encoding run as the edit runs them: the image's only queued, the prompt's
    /// right after it, one synchronization at the end. The edit hides the image processor and the text encoder's
    /// queueing behind the VAE's device time this way, so this, not the two stages measured apart, is what their
    /// overhead is judged by ([`encodings_overhead_fraction`](Self::encodings_overhead_fraction)).
    pub encodings_seconds: f64,
}

impl EditProfile {
    /// The profiled `stage`, if it was profiled.
    pub fn stage(&self, stage: Stage) -> Option<&StageProfile> {
        self.stages.iter().find(|s| s.stage == stage)
    }

    /// Seconds of the networks of image and prompt encoding (the VAE encoder, the vision tower, the language model).
    pub fn encodings_network_seconds(&self) -> f64 {
        [Stage::EncodeImage, Stage::EncodePrompt]
            .iter()
            .filter_map(|&s| self.stage(s))
            .map(|s| s.network_seconds())
            .sum()
    }

    /// [`encodings_seconds`](Self::encodings_seconds) beyond their networks' time, over it (`None` without one).
    pub fn encodings_overhead_fraction(&self) -> Option<f64> {
        let net = self.encodings_network_seconds();
        (net > 0.0).then(|| (self.encodings_seconds - net) / net)
    }
}

/// The samples of one stage: the whole stage's, then each part's, by name.
struct Samples {
    stage: Stage,
    whole: Vec<f64>,
    parts: Vec<(&'static str, bool, Vec<f64>)>,
}

impl Samples {
    fn new(stage: Stage) -> Self {
        Samples { stage, whole: Vec::new(), parts: Vec::new() }
    }

    fn part(&mut self, name: &'static str, network: bool, seconds: f64) {
        match self.parts.iter_mut().find(|p| p.0 == name) {
            Some(p) => p.2.push(seconds),
            None => self.parts.push((name, network, vec![seconds])),
        }
    }

    fn profile(self) -> StageProfile {
        StageProfile {
            stage: self.stage,
            seconds: median(self.whole),
            parts: self
                .parts
                .into_iter()
                .map(|(part, network, v)| PartTiming { part: part.into(), seconds: median(v), network })
                .collect(),
        }
    }
}

/// The upper median (0 for none).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

impl<B: QwenBackend> QwenImageEditPipeline<B> {
    /// Profiles the stages around the networks of `req` (see the [module docs](self)); the pipeline's state (the
    /// pruning caches, the modulation table) is left as it is.
    pub fn profile_stages(&self, req: &EditRequest, reps: usize) -> Result<EditProfile> {
        req.validate(self.variant())?;
        let reps = reps.max(1);
        let mut stages: Vec<Samples> =
            [Stage::Preprocess, Stage::EncodeImage, Stage::EncodePrompt, Stage::Decode]
                .map(Samples::new)
                .into();
        let mut prompt_tokens = 0;
        let mut encodings = Vec::new();
        for rep in 0..=reps {
            let mut run = Vec::new();
            let inputs = self.profile_preprocess(req, &mut run)?;
            prompt_tokens = inputs.prompt_ids.len();
            self.profile_encode_image(&inputs, &mut run)?;
            self.profile_encode_prompt(&inputs, &mut run)?;
            let both = self.profile_encodings(&inputs)?;
            self.profile_decode(&inputs, &mut run)?;
            if rep > 0 {
                encodings.push(both);
                for (stage, sample) in run {
                    let s = stages.iter_mut().find(|s| s.stage == stage).expect("a profiled stage");
                    match sample {
                        Sample::Whole(t) => s.whole.push(t),
                        Sample::Part(name, network, t) => s.part(name, network, t),
                    }
                }
            }
        }
        Ok(EditProfile {
            reps,
            prompt_tokens,
            stages: stages.into_iter().map(Samples::profile).collect(),
            encodings_seconds: median(encodings),
        })
    }

    /// Image and prompt encoding as the edit runs them (the patches made on another thread while image encoding is
    /// queued, prompt encoding right after it, one synchronization): seconds.
    fn profile_encodings(&self, inputs: &EditInputs<B>) -> Result<f64> {
        sync::<B>(&self.device)?;
        let (processor, vision) = (&self.image_processor, &inputs.images.vision);
        let (_, t) = self.timed(|| {
            std::thread::scope(|scope| {
                let ahead = scope.spawn(move || processor.preprocess_all(vision));
                let latents = self.encode_images(&inputs.images.vae)?;
                let pixels = joined(Some(ahead))?;
                let prompts =
                    self.encode_prompt_stage(inputs, pixels, &mut NoReuse, &mut ReuseCounts::default())?;
                Ok((latents, prompts))
            })
        })?;
        Ok(t)
    }

    /// Runs `f` and synchronizes the device: its result and seconds.
    fn timed<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
        let start = Instant::now();
        let out = f()?;
        sync::<B>(&self.device)?;
        Ok((out, start.elapsed().as_secs_f64()))
    }

    fn profile_preprocess(&self, req: &EditRequest, run: &mut Run) -> Result<EditInputs<B>> {
        const S: Stage = Stage::Preprocess;
        sync::<B>(&self.device)?;
        let (inputs, t) = self.timed(|| self.preprocess(req, &ScheduleSpec::None))?;
        run.push((S, Sample::Whole(t)));
        let (images, t) = self.timed(|| EditSizes::new(req, self.variant())?.resize(&req.images))?;
        run.push((S, Sample::Part("sizes and resizing", false, t)));
        let (_, t) =
            self.timed(|| self.tokenize(&req.prompt, &self.image_processor.grids(&images.vision)?))?;
        run.push((S, Sample::Part("patch grids and tokenizer", false, t)));
        let (_, t) = self.timed(|| self.initial_noise(req, &inputs.sizes))?;
        run.push((S, Sample::Part("initial noise", false, t)));
        Ok(inputs)
    }

    fn profile_encode_prompt(&self, inputs: &EditInputs<B>, run: &mut Run) -> Result<()> {
        const S: Stage = Stage::EncodePrompt;
        let (_, t) =
            self.timed(|| self.encode_prompt_stage(inputs, None, &mut NoReuse, &mut ReuseCounts::default()))?;
        run.push((S, Sample::Whole(t)));
        let (pixels, t) = self.timed(|| Ok(self.image_processor.preprocess_all(&inputs.images.vision)?))?;
        run.push((S, Sample::Part("image processor", false, t)));
        let (pixels, t) = self.timed(|| Ok(self.upload_pixels(&pixels)))?;
        run.push((S, Sample::Part("upload pixels", false, t)));
        let (embeds, t) = self.timed(|| Ok(self.text_encoder.vision_forward(pixels, &inputs.grids)?))?;
        run.push((S, Sample::Part("vision tower", true, t)));
        let prompts = [
            ("language model", "prompt embeddings", Some(&inputs.prompt_ids)),
            (
                "language model (negative prompt)",
                "prompt embeddings (negative prompt)",
                inputs.negative_ids.as_ref(),
            ),
        ];
        for (network, extraction, ids) in prompts {
            let Some(ids) = ids else { continue };
            let (hidden, t) = self.timed(|| self.text_hidden(ids, &embeds, &inputs.grids))?;
            run.push((S, Sample::Part(network, true, t)));
            let (_, t) = self.timed(|| prompt_conditioning(hidden, ids.len()))?;
            run.push((S, Sample::Part(extraction, false, t)));
        }
        Ok(())
    }

    fn profile_encode_image(&self, inputs: &EditInputs<B>, run: &mut Run) -> Result<()> {
        const S: Stage = Stage::EncodeImage;
        let images: &[RgbImage] = &inputs.images.vae;
        let (_, t) = self.timed(|| self.encode_images(images))?;
        run.push((S, Sample::Whole(t)));
        for image in images {
            let (x, t) = self.timed(|| self.upload_image(image))?;
            run.push((S, Sample::Part("upload image", false, t)));
            let (z, t) = self.timed(|| self.vae_encode(x))?;
            run.push((S, Sample::Part("VAE encode", true, t)));
            let (_, t) = self.timed(|| self.pack_latents(z))?;
            run.push((S, Sample::Part("normalize and pack", false, t)));
        }
        Ok(())
    }

    fn profile_decode(&self, inputs: &EditInputs<B>, run: &mut Run) -> Result<()> {
        const S: Stage = Stage::Decode;
        let latents = inputs.noise.clone().cast(self.transformer.dtype());
        sync::<B>(&self.device)?;
        let (_, t) = self.timed(|| self.decode(&latents, &inputs.sizes))?;
        run.push((S, Sample::Whole(t)));
        let (z, t) = self.timed(|| self.decoder_input(&latents, &inputs.sizes))?;
        run.push((S, Sample::Part("unpack and de-normalize", false, t)));
        let (x, t) = self.timed(|| self.vae_decode(z))?;
        run.push((S, Sample::Part("VAE decode", true, t)));
        let (_, t) = self.timed(|| tensor_to_image(x))?;
        run.push((S, Sample::Part("read back to RGB", false, t)));
        Ok(())
    }
}

/// One measurement of one run: a whole stage, or one of its parts (name, whether it is a network, seconds).
enum Sample {
    Whole(f64),
    Part(&'static str, bool, f64),
}

/// The measurements of one run, in order.
type Run = Vec<(Stage, Sample)>;
