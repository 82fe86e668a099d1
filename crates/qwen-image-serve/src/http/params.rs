//! The fields of `POST /v1/images/edits`, from a multipart form (OpenAI's format) or a JSON body with base64
//! images, checked against the [`Limits`] and turned into [`EditJob`]s.

use axum::extract::Multipart;
use base64::Engine;
use qwen_image::processor::RgbImage;
use qwen_image_pipeline::{EditRequest, ImageAreas};
use qwen_image_pruning::ScheduleSpec;
use serde::Deserialize;

use super::error::ApiError;
use crate::job::EditJob;

/// What a request may ask for.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Request body bytes (413 above).
    pub max_body_bytes: usize,
    /// Pixels of one input image (checked from its header, before its pixels are decoded).
    pub max_image_pixels: u64,
    /// Characters of the prompt and of the negative prompt.
    pub max_prompt_chars: usize,
    /// Input images per request.
    pub max_images: usize,
    /// Images per request (`n`).
    pub max_n: usize,
    /// Denoising steps.
    pub max_steps: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 32 << 20,
            max_image_pixels: 4096 * 4096,
            max_prompt_chars: 2000,
            max_images: 3,
            max_n: 4,
            max_steps: 100,
        }
    }
}

/// The values of fields a request leaves out.
#[derive(Clone, Debug, PartialEq)]
pub struct Defaults {
    /// Denoising steps.
    pub steps: usize,
    /// True-CFG scale.
    pub cfg: f32,
    /// Noise seed (image `i` of `n` gets `seed + i`).
    pub seed: u64,
    /// Pruning schedule.
    pub schedule: ScheduleSpec,
    /// Image areas (the model's: 1024² for real snapshots, the demo's for `--demo`).
    pub areas: ImageAreas,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            steps: 4,
            cfg: 1.0,
            seed: 42,
            schedule: "cat".parse().expect("a valid spec"),
            areas: ImageAreas::default(),
        }
    }
}

/// The fields of one request, as sent (images still encoded).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditParams {
    /// Encoded input images (PNG or JPEG). JSON: `image` (a base64 string or data URL, or a list of them).
    #[serde(rename = "image", alias = "images", deserialize_with = "one_or_many_base64", default)]
    pub images: Vec<Vec<u8>>,
    /// The instruction.
    pub prompt: Option<String>,
    /// Images to make (seeds `seed`, `seed + 1`, …).
    pub n: Option<usize>,
    /// `WIDTHxHEIGHT` or `auto`.
    pub size: Option<String>,
    /// Only `b64_json`.
    pub response_format: Option<String>,
    /// Server-sent progress events.
    pub stream: Option<bool>,
    /// The model id (must be the served one).
    pub model: Option<String>,
    /// OpenAI's end-user id (logged, not used).
    pub user: Option<String>,
    /// Extension: denoising steps.
    pub steps: Option<usize>,
    /// Extension: noise seed.
    pub seed: Option<u64>,
    /// Extension: true-CFG scale.
    pub cfg: Option<f32>,
    /// Extension: negative prompt (for CFG).
    pub negative_prompt: Option<String>,
    /// Extension: pruning schedule (`none`, `cat`, `reuse:2,3`, …).
    pub schedule: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

fn one_or_many_base64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
    let list = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    list.iter().map(|s| decode_base64(s).map_err(serde::de::Error::custom)).collect()
}

/// Base64 (standard alphabet), optionally as a `data:…;base64,` URL.
fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
    let data = s.split_once(";base64,").map_or(s, |(_, d)| d);
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| format!("an image is not valid base64: {e}"))
}

impl EditParams {
    /// Parses a JSON body.
    pub fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }

    /// Reads a multipart form. After the first bad field (an image beyond `limits.max_images` included), the
    /// rest of the body is read and dropped, so that the client gets the error instead of a reset connection.
    pub async fn from_multipart(mut form: Multipart, limits: &Limits) -> Result<Self, ApiError> {
        let mut p = EditParams::default();
        let result = p.read_fields(&mut form, limits).await;
        if result.is_err() {
            while let Ok(Some(field)) = form.next_field().await {
                if field.bytes().await.is_err() {
                    break;
                }
            }
        }
        result.map(|()| p)
    }

    async fn read_fields(&mut self, form: &mut Multipart, limits: &Limits) -> Result<(), ApiError> {
        let multipart_error = |e: axum::extract::multipart::MultipartError| {
            let status = e.status();
            let code = if status.as_u16() == 413 { "body_too_large" } else { "invalid_multipart" };
            ApiError::new(status, code, format!("malformed multipart body: {}", e.body_text()))
        };
        while let Some(field) = form.next_field().await.map_err(multipart_error)? {
            let name = field.name().unwrap_or_default().to_owned();
            if name == "image" || name == "image[]" {
                if self.images.len() >= limits.max_images {
                    return Err(too_many_images(limits));
                }
                self.images.push(field.bytes().await.map_err(multipart_error)?.to_vec());
                continue;
            }
            let text = field.text().await.map_err(multipart_error)?;
            self.set_text_field(&name, text)?;
        }
        Ok(())
    }

    /// Sets the form field `name` from its text.
    fn set_text_field(&mut self, name: &str, text: String) -> Result<(), ApiError> {
        fn parse<T: std::str::FromStr>(name: &str, text: &str) -> Result<Option<T>, ApiError> {
            text.trim()
                .parse()
                .map(Some)
                .map_err(|_| ApiError::field(name, format!("`{name}` is not valid: {text:?}")))
        }
        match name {
            "prompt" => self.prompt = Some(text),
            "n" => self.n = parse(name, &text)?,
            "size" => self.size = Some(text),
            "response_format" => self.response_format = Some(text),
            "stream" => self.stream = parse(name, &text)?,
            "model" => self.model = Some(text),
            "user" => self.user = Some(text),
            "steps" => self.steps = parse(name, &text)?,
            "seed" => self.seed = parse(name, &text)?,
            "cfg" => self.cfg = parse(name, &text)?,
            "negative_prompt" => self.negative_prompt = Some(text),
            "schedule" => self.schedule = Some(text),
            "mask" => {
                return Err(ApiError::field(
                    name,
                    "masks are not supported: the instruction says what to edit",
                ))
            }
            other => return Err(ApiError::field(other, format!("unknown field `{other}`"))),
        }
        Ok(())
    }

    /// Checks every field but the images against `limits` and the served `model`, and returns the number of
    /// images to make.
    pub fn check(&self, limits: &Limits, model: &str) -> Result<usize, ApiError> {
        if self.images.is_empty() {
            return Err(ApiError::field("image", "at least one input image (`image`) is required"));
        }
        if self.images.len() > limits.max_images {
            return Err(too_many_images(limits));
        }
        let prompt = self.prompt.as_deref().unwrap_or_default();
        if prompt.trim().is_empty() {
            return Err(ApiError::field("prompt", "`prompt` is required"));
        }
        for (name, text) in [("prompt", Some(prompt)), ("negative_prompt", self.negative_prompt.as_deref())] {
            let chars = text.map_or(0, |t| t.chars().count());
            if chars > limits.max_prompt_chars {
                let max = limits.max_prompt_chars;
                return Err(ApiError::field(name, format!("`{name}` has {chars} characters; at most {max}")));
            }
        }
        if let Some(m) = self.model.as_deref().filter(|m| *m != model) {
            return Err(ApiError::field(
                "model",
                format!("unknown model `{m}`; this server serves `{model}`"),
            ));
        }
        if let Some(f) = self.response_format.as_deref().filter(|f| *f != "b64_json") {
            return Err(ApiError::field(
                "response_format",
                format!("response_format `{f}`: only `b64_json`"),
            ));
        }
        let n = self.n.unwrap_or(1);
        if n == 0 || n > limits.max_n {
            return Err(ApiError::field(
                "n",
                format!("`n` is {n}; 1 to {} images per request", limits.max_n),
            ));
        }
        if self.stream == Some(true) && n != 1 {
            return Err(ApiError::field("n", "with `stream`, `n` must be 1"));
        }
        if let Some(steps) = self.steps.filter(|s| *s == 0 || *s > limits.max_steps) {
            return Err(ApiError::field("steps", format!("`steps` is {steps}; 1 to {}", limits.max_steps)));
        }
        Ok(n)
    }

    /// The requested output size (`None` for `auto` or no size).
    fn size(&self) -> Result<(Option<u32>, Option<u32>), ApiError> {
        match self.size.as_deref().map(str::trim) {
            None | Some("auto") => Ok((None, None)),
            Some(s) => {
                let bad = || ApiError::field("size", format!("`size` {s:?} is not `WIDTHxHEIGHT` or `auto`"));
                let (w, h) = s.split_once('x').ok_or_else(bad)?;
                Ok((Some(w.parse().map_err(|_| bad())?), Some(h.parse().map_err(|_| bad())?)))
            }
        }
    }

    /// The jobs of a checked request whose images are decoded (`images`): `n` of them, seeds `seed + i`.
    pub fn jobs(
        &self,
        images: Vec<RgbImage>,
        n: usize,
        defaults: &Defaults,
    ) -> Result<Vec<EditJob>, ApiError> {
        let schedule = match &self.schedule {
            Some(s) => s
                .parse::<ScheduleSpec>()
                .map_err(|e| ApiError::field("schedule", format!("`schedule`: {e}")))?,
            None => defaults.schedule.clone(),
        };
        let (width, height) = self.size()?;
        let mut request = EditRequest::new(images, self.prompt.clone().unwrap_or_default());
        request.negative_prompt = self.negative_prompt.clone();
        request.true_cfg_scale = self.cfg.unwrap_or(defaults.cfg);
        if request.true_cfg_scale > 1.0 && request.negative_prompt.is_none() {
            request.negative_prompt = Some(" ".into()); // as the CLI and Qwen's examples do
        }
        request.num_steps = self.steps.unwrap_or(defaults.steps);
        request.width = width;
        request.height = height;
        request.areas = defaults.areas;
        let seed = self.seed.unwrap_or(defaults.seed);
        Ok((0..n as u64)
            .map(|i| EditJob {
                request: EditRequest { seed: seed.wrapping_add(i), ..request.clone() },
                schedule: schedule.clone(),
            })
            .collect())
    }
}

fn too_many_images(limits: &Limits) -> ApiError {
    ApiError::field("image", format!("at most {} input images per request", limits.max_images))
}

/// Decodes one input image (PNG or JPEG), refusing more than `max_pixels` from its header before decoding (so a
/// decompression bomb costs nothing); the decoder's own limits apply too.
pub fn decode_image(bytes: &[u8], max_pixels: u64, index: usize) -> Result<RgbImage, ApiError> {
    let bad = |msg: String| {
        ApiError::new(axum::http::StatusCode::BAD_REQUEST, "invalid_image", format!("image {index}: {msg}"))
    };
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    if reader.format().is_none() {
        return Err(bad("not a PNG or JPEG image".into()));
    }
    let (w, h) = reader.into_dimensions().map_err(|e| bad(format!("unreadable image header: {e}")))?;
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(bad(format!("{w}×{h} pixels is more than the limit of {max_pixels}")));
    }
    qwen_image::processor::decode_image(bytes).map_err(|e| bad(e.to_string()))
}
