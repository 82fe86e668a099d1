//! The Qwen2-VL image processor: [`smart_resize`] to multiples of 28, bicubic resize, rescale + normalize, temporal
//! duplication and patch flattening into the vision tower's `pixel_values [P, 1176]` and `image_grid_thw`.
//!
//! Reproduces transformers 5.24's `Qwen2VLImageProcessor` (torchvision backend), which is what
//! `Qwen2VLProcessor.from_pretrained` (and so diffusers' Qwen-Image-Edit pipelines) gets whenever torchvision is
//! installed: `AutoImageProcessor` resolves `"image_processor_type": "Qwen2VLImageProcessor"` to the torchvision
//! class and falls back to `Qwen2VLImageProcessorPil` only when torchvision cannot be imported. Both are supported
//! ([`ImageProcessorConfig::resampler`]); the only difference is the bicubic resize arithmetic and the order of
//! the rescale/normalize float operations (see [`super::resize`](mod@super::resize)).
//!
//! Parity (`tests/processor_parity.rs`, 7 crops of real photos: up- and downscaled, mixed, both size-limit branches,
//! already a multiple of 28; one and two images): `pixel_values` are **bit-identical** to transformers' for both
//! backends.

use std::path::Path;

use image::RgbImage;
use rayon::prelude::*;
use serde::Deserialize;

use super::resize::{resize_with, Filter, Resampler};
use crate::{ModelError, Result};

/// OpenAI CLIP mean, the Qwen2-VL default (transformers' Python floats, rounded to f32 as `torch.tensor` does).
pub const CLIP_MEAN: [f32; 3] = [0.48145466_f64 as f32, 0.4578275_f64 as f32, 0.40821073_f64 as f32];
/// OpenAI CLIP standard deviation, the Qwen2-VL default.
pub const CLIP_STD: [f32; 3] = [0.26862954_f64 as f32, 0.26130258_f64 as f32, 0.27577711_f64 as f32];

/// Settings of the Qwen2-VL image processor, from `preprocessor_config.json`.
///
/// Missing keys take transformers' class defaults (`min_pixels` 56², `max_pixels` 28²·1280, patch 14, temporal
/// patch 2, merge 2, CLIP mean/std, rescale 1/255, bicubic). Note that the published Qwen-Image-Edit processor sets
/// `max_pixels` to 12 845 056, which [`ImageProcessorConfig::default`] does not assume.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    /// Smallest resized area in pixels (`min_pixels`, or `size.shortest_edge`).
    pub min_pixels: usize,
    /// Largest resized area in pixels (`max_pixels`, or `size.longest_edge`).
    pub max_pixels: usize,
    /// Side of a vision patch (14).
    pub patch_size: usize,
    /// Frames per temporal patch (2); a still image is repeated this many times.
    pub temporal_patch_size: usize,
    /// Patches merged per side into one LLM token (2).
    pub merge_size: usize,
    /// Per-channel mean subtracted after rescaling.
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub image_std: [f32; 3],
    /// Factor from 8-bit values to `[0, 1]` (1/255).
    pub rescale_factor: f64,
    /// Whether to resize to [`smart_resize`]'s size (otherwise the sides must already be multiples of 28).
    pub do_resize: bool,
    /// Whether to multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// Whether to normalize with `image_mean` / `image_std`.
    pub do_normalize: bool,
    /// The resize filter (`resample`: 3 = bicubic, 1 = Lanczos).
    pub filter: Filter,
    /// Whose arithmetic to reproduce: [`Resampler::Torch`] for `Qwen2VLImageProcessor` (transformers' default),
    /// [`Resampler::Pillow`] for `Qwen2VLImageProcessorPil`. Chosen from `image_processor_type`.
    pub resampler: Resampler,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
            filter: Filter::Bicubic,
            resampler: Resampler::Torch,
        }
    }
}

/// The keys of `preprocessor_config.json` that matter; everything else is ignored.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConfig {
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    size: Option<RawSize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
    rescale_factor: Option<f64>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    resample: Option<u32>,
    image_processor_type: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawSize {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
}

impl ImageProcessorConfig {
    /// Reads `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::error::read_config(path, Self::from_json)
    }

    /// Parses the JSON text of a `preprocessor_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let origin = "preprocessor_config.json";
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| ModelError::config(origin, e.to_string()))?;
        let d = ImageProcessorConfig::default();
        let size = raw.size.unwrap_or_default();
        // transformers: `size` first, then the `min_pixels` / `max_pixels` keys override it.
        let min_pixels = raw.min_pixels.or(size.min_pixels).or(size.shortest_edge).unwrap_or(d.min_pixels);
        let max_pixels = raw.max_pixels.or(size.max_pixels).or(size.longest_edge).unwrap_or(d.max_pixels);
        let triple = |v: Option<Vec<f32>>, default: [f32; 3], key: &str| -> Result<[f32; 3]> {
            match v {
                None => Ok(default),
                Some(v) => <[f32; 3]>::try_from(v.as_slice()).map_err(|_| {
                    ModelError::config(
                        origin,
                        format!("`{key}` has {} values; 3 (RGB) are expected", v.len()),
                    )
                }),
            }
        };
        let filter = match raw.resample.unwrap_or(3) {
            3 => Filter::Bicubic,
            1 => Filter::Lanczos,
            other => {
                return Err(ModelError::config(
                    origin,
                    format!("`resample` = {other} is not supported (3 = bicubic and 1 = Lanczos are)"),
                ))
            }
        };
        let resampler = match raw.image_processor_type.as_deref() {
            Some(t) if t.ends_with("Pil") => Resampler::Pillow,
            _ => Resampler::Torch,
        };
        let config = ImageProcessorConfig {
            min_pixels,
            max_pixels,
            patch_size: raw.patch_size.unwrap_or(d.patch_size),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            merge_size: raw.merge_size.unwrap_or(d.merge_size),
            image_mean: triple(raw.image_mean, d.image_mean, "image_mean")?,
            image_std: triple(raw.image_std, d.image_std, "image_std")?,
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_resize: raw.do_resize.unwrap_or(true),
            do_rescale: raw.do_rescale.unwrap_or(true),
            do_normalize: raw.do_normalize.unwrap_or(true),
            filter,
            resampler,
        };
        config.validate().map_err(|reason| ModelError::config(origin, reason))?;
        Ok(config)
    }

    /// Returns the config with `resampler` replaced.
    pub fn with_resampler(mut self, resampler: Resampler) -> Self {
        self.resampler = resampler;
        self
    }

    /// The side multiple of resized images: `patch_size · merge_size` (28).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values per flattened patch: `3 · temporal_patch_size · patch_size²` (1176).
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.patch_size == 0 || self.merge_size == 0 || self.temporal_patch_size == 0 {
            return Err(format!(
                "patch_size ({}), merge_size ({}) and temporal_patch_size ({}) must be positive",
                self.patch_size, self.merge_size, self.temporal_patch_size
            ));
        }
        if self.min_pixels == 0 || self.min_pixels > self.max_pixels {
            return Err(format!(
                "min_pixels ({}) must be positive and at most max_pixels ({})",
                self.min_pixels, self.max_pixels
            ));
        }
        if self.image_std.iter().any(|s| !s.is_finite() || *s == 0.0)
            || self.image_mean.iter().any(|m| !m.is_finite())
        {
            return Err(format!(
                "image_mean {:?} must be finite and image_std {:?} finite and non-zero",
                self.image_mean, self.image_std
            ));
        }
        if !self.rescale_factor.is_finite() || self.rescale_factor <= 0.0 {
            return Err(format!("rescale_factor ({}) must be positive", self.rescale_factor));
        }
        Ok(())
    }
}

/// transformers' `smart_resize`: the `(height, width)` closest to the input whose sides are multiples of `factor`
/// and whose area lies in `[min_pixels, max_pixels]`, keeping the aspect ratio as well as possible.
///
/// Sides are rounded half to even (Python's `round`); when the rounded area exceeds `max_pixels` both sides shrink by
/// `√(h·w / max_pixels)` and are floored (never below `factor`), when it is under `min_pixels` they grow by
/// `√(min_pixels / (h·w))` and are ceiled.
///
/// Errors (instead of transformers' `ValueError`s and silent degenerate results) when a side is under 10 pixels,
/// when the aspect ratio exceeds 200, or when `factor` is 0.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_vl/image_processing_qwen2_vl.py#L63
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height < 10 || width < 10 {
        return Err(ModelError::invalid(format!(
            "the image is {width}×{height} pixels; both sides must be at least 10 pixels"
        )));
    }
    if factor == 0 {
        return Err(ModelError::invalid("smart_resize: factor must be positive"));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let aspect = h.max(w) / h.min(w);
    if aspect > 200.0 {
        return Err(ModelError::invalid(format!(
            "the image is {width}×{height} pixels: its aspect ratio {aspect:.1} exceeds 200"
        )));
    }
    let mut h_bar = (h / f).round_ties_even() as usize * factor;
    let mut w_bar = (w / f).round_ties_even() as usize * factor;
    if h_bar * w_bar > max_pixels {
        let beta = ((height * width) as f64 / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as usize * factor);
        w_bar = factor.max((w / beta / f).floor() as usize * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (height * width) as f64).sqrt();
        h_bar = (h * beta / f).ceil() as usize * factor;
        w_bar = (w * beta / f).ceil() as usize * factor;
    }
    Ok((h_bar, w_bar))
}

/// `image_grid_thw` of one image: its size in patches along time, height and width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GridThw {
    /// Temporal patches (1 for a still image).
    pub t: usize,
    /// Patch rows.
    pub h: usize,
    /// Patch columns.
    pub w: usize,
}

impl GridThw {
    /// The grid of `t × h × w` patches.
    pub fn new(t: usize, h: usize, w: usize) -> Self {
        GridThw { t, h, w }
    }

    /// Number of vision patches (`t · h · w`): rows of `pixel_values`.
    pub fn num_patches(&self) -> usize {
        self.t * self.h * self.w
    }

    /// Number of LLM tokens after merging `merge_size × merge_size` patches: `<|image_pad|>` copies in the prompt.
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.num_patches() / (merge_size * merge_size)
    }
}

/// A `[t, h, w]` row of `image_grid_thw`.
impl From<[usize; 3]> for GridThw {
    fn from([t, h, w]: [usize; 3]) -> Self {
        GridThw { t, h, w }
    }
}

/// The `[t, h, w]` row of `image_grid_thw`.
impl From<GridThw> for [usize; 3] {
    fn from(g: GridThw) -> Self {
        [g.t, g.h, g.w]
    }
}

/// The vision tower's input for one or more images.
#[derive(Clone, Debug, PartialEq)]
pub struct PixelValues {
    /// Row-major `[num_patches, patch_dim]` values: the images' patches one after the other.
    pub values: Vec<f32>,
    /// Values per patch (1176).
    pub patch_dim: usize,
    /// One grid per image, in order.
    pub grids: Vec<GridThw>,
}

impl PixelValues {
    /// Total number of patches (rows of [`PixelValues::values`]).
    pub fn num_patches(&self) -> usize {
        self.grids.iter().map(GridThw::num_patches).sum()
    }

    /// The shape `[num_patches, patch_dim]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.num_patches(), self.patch_dim]
    }

    /// `image_grid_thw`: a copy of [`grids`](Self::grids), as the text encoder takes it.
    pub fn grid_thw(&self) -> Vec<GridThw> {
        self.grids.clone()
    }
}

/// The Qwen2-VL image processor.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_vl/image_processing_qwen2_vl.py#L93
#[derive(Clone, Debug)]
pub struct ImageProcessor {
    config: ImageProcessorConfig,
    /// Normalized value of every 8-bit level, per channel.
    lut: [[f32; 256]; 3],
}

impl ImageProcessor {
    /// A processor with `config`.
    pub fn new(config: ImageProcessorConfig) -> Result<Self> {
        config.validate().map_err(|reason| ModelError::config("image processor config", reason))?;
        let lut = std::array::from_fn(|c| std::array::from_fn(|v| normalized(&config, c, v as u8)));
        Ok(ImageProcessor { config, lut })
    }

    /// A processor configured by the `preprocessor_config.json` at `path`.
    pub fn from_config_file(path: &Path) -> Result<Self> {
        Self::new(ImageProcessorConfig::from_file(path)?)
    }

    /// The configuration.
    pub fn config(&self) -> &ImageProcessorConfig {
        &self.config
    }

    /// The `(width, height)` an image of `width × height` is resized to.
    pub fn target_size(&self, width: u32, height: u32) -> Result<(u32, u32)> {
        let c = &self.config;
        if !c.do_resize {
            let f = c.factor();
            if width as usize % f != 0 || height as usize % f != 0 || width == 0 || height == 0 {
                return Err(ModelError::invalid(format!(
                    "do_resize is off, so the image's sides must be positive multiples of {f}; it is {width}×{height}"
                )));
            }
            return Ok((width, height));
        }
        let (h, w) = smart_resize(height as usize, width as usize, c.factor(), c.min_pixels, c.max_pixels)?;
        let side = |v: usize| {
            u32::try_from(v).map_err(|_| ModelError::invalid(format!("resized side {v} is too large")))
        };
        Ok((side(w)?, side(h)?))
    }

    /// The grid of an image of `width × height`.
    pub fn grid(&self, width: u32, height: u32) -> Result<GridThw> {
        let (w, h) = self.target_size(width, height)?;
        let p = self.config.patch_size;
        Ok(GridThw { t: 1, h: h as usize / p, w: w as usize / p })
    }

    /// The grid of each of `images` (what [`preprocess_all`](Self::preprocess_all) makes, without making the
    /// patches).
    pub fn grids(&self, images: &[RgbImage]) -> Result<Vec<GridThw>> {
        images.iter().map(|i| self.grid(i.width(), i.height())).collect()
    }

    /// Resizes `image` to [`ImageProcessor::target_size`] with the configured filter and resampler.
    pub fn resize(&self, image: &RgbImage) -> Result<RgbImage> {
        let (w, h) = self.target_size(image.width(), image.height())?;
        if (w, h) == image.dimensions() {
            return Ok(image.clone());
        }
        resize_with(image, w, h, self.config.filter, self.config.resampler)
    }

    /// `pixel_values` and `image_grid_thw` of one image.
    pub fn preprocess(&self, image: &RgbImage) -> Result<PixelValues> {
        self.preprocess_all(std::slice::from_ref(image))
    }

    /// `pixel_values` and `image_grid_thw` of several images (Edit Plus), concatenated in order.
    pub fn preprocess_all(&self, images: &[RgbImage]) -> Result<PixelValues> {
        if images.is_empty() {
            return Err(ModelError::invalid("no image to preprocess"));
        }
        let grids = self.grids(images)?;
        let patch_dim = self.config.patch_dim();
        // One zeroed allocation for all images (fresh pages, first touched by the parallel writers).
        let mut values = vec![0f32; grids.iter().map(|g| g.num_patches() * patch_dim).sum()];
        let mut rest = values.as_mut_slice();
        for (image, grid) in images.iter().zip(&grids) {
            let (out, tail) = std::mem::take(&mut rest).split_at_mut(grid.num_patches() * patch_dim);
            let patched = self.patchify(&self.resize(image)?, out);
            debug_assert_eq!(&patched, grid);
            rest = tail;
        }
        Ok(PixelValues { values, patch_dim, grids })
    }

    /// Normalizes `image` (sides multiples of `patch_size · merge_size`) and writes its flattened patches to `out`
    /// (exactly their length).
    ///
    /// Patch order: merged 2×2 cells row-major, and inside a cell (0,0), (0,1), (1,0), (1,1); inside a patch:
    /// channel, then frame (the image repeated `temporal_patch_size` times), then row, then column.
    fn patchify(&self, image: &RgbImage, out: &mut [f32]) -> GridThw {
        let c = &self.config;
        let (p, m, patch_dim) = (c.patch_size, c.merge_size, c.patch_dim());
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (gh, gw) = (h / p, w / p);
        let raw = image.as_raw();
        debug_assert_eq!(out.len(), gh * gw * patch_dim);
        // One band of merged cells (`m` patch rows) per task, each filling its own contiguous run of patches.
        let band = (gw / m) * m * m * patch_dim;
        if band > 0 {
            out.par_chunks_mut(band).enumerate().for_each(|(bh, band_out)| {
                let cells = (0..gw / m).flat_map(|bw| (0..m * m).map(move |i| (bw, i / m, i % m)));
                for ((bw, mh, mw), patch) in cells.zip(band_out.chunks_exact_mut(patch_dim)) {
                    self.write_patch(raw, w, ((bh * m + mh) * p, (bw * m + mw) * p), patch);
                }
            });
        }
        GridThw { t: 1, h: gh, w: gw }
    }

    /// Writes the normalized patch whose top-left pixel is `(y0, x0)` of an RGB image `w` pixels wide: channel, then
    /// frame, then row, then column.
    fn write_patch(&self, raw: &[u8], w: usize, (y0, x0): (usize, usize), patch: &mut [f32]) {
        let (p, tp) = (self.config.patch_size, self.config.temporal_patch_size);
        let mut dst = patch.iter_mut();
        for (ch, lut) in self.lut.iter().enumerate() {
            for _ in 0..tp {
                for y in y0..y0 + p {
                    let row = &raw[(y * w + x0) * 3..(y * w + x0 + p) * 3];
                    // The row first: `zip` then stops without taking a value past it.
                    for (px, d) in row.chunks_exact(3).zip(&mut dst) {
                        *d = lut[px[ch] as usize];
                    }
                }
            }
        }
    }
}

/// The processed value of 8-bit level `v` in channel `c`, with the reference's float operations.
fn normalized(config: &ImageProcessorConfig, c: usize, v: u8) -> f32 {
    let (mean, std) = (config.image_mean[c], config.image_std[c]);
    match config.resampler {
        // torchvision backend: rescale fused into normalize, `(x - mean/r) / (std/r)` in f32.
        Resampler::Torch => {
            let x = v as f32;
            match (config.do_rescale, config.do_normalize) {
                (true, true) => {
                    let inv = (1.0 / config.rescale_factor) as f32;
                    (x - mean * inv) / (std * inv)
                }
                (true, false) => x * config.rescale_factor as f32,
                (false, true) => (x - mean) / std,
                (false, false) => x,
            }
        }
        // PIL backend: rescale in f64 then cast, normalize in f32.
        Resampler::Pillow => {
            let x = if config.do_rescale { (v as f64 * config.rescale_factor) as f32 } else { v as f32 };
            if config.do_normalize {
                (x - mean) / std
            } else {
                x
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_half_to_even_and_respects_limits() {
        // 42 / 28 = 1.5 rounds to 2 (even), 70 / 28 = 2.5 rounds to 2 (even): Python's round, not f64::round.
        assert_eq!(smart_resize(42, 70, 28, 1, 1 << 30).unwrap(), (56, 56));
        assert_eq!(smart_resize(1024, 1024, 28, 3136, 12845056).unwrap(), (1036, 1036));
        assert_eq!(smart_resize(768, 1376, 28, 3136, 12845056).unwrap(), (756, 1372));
        // Below min_pixels: ceil branch.
        assert_eq!(smart_resize(20, 30, 28, 3136, 1003520).unwrap(), (56, 84));
        // Above max_pixels: floor branch, never below the factor.
        assert_eq!(smart_resize(300, 451, 28, 3136, 10000).unwrap(), (56, 112));
        assert_eq!(smart_resize(30, 3000, 28, 28, 1568).unwrap(), (28, 392));
    }

    #[test]
    fn smart_resize_rejects_degenerate_images() {
        assert!(smart_resize(9, 100, 28, 3136, 1 << 24).unwrap_err().to_string().contains("at least 10"));
        assert!(smart_resize(10, 2001, 28, 3136, 1 << 24).unwrap_err().to_string().contains("aspect ratio"));
        assert!(smart_resize(10, 2000, 28, 3136, 1 << 24).is_ok());
    }

    #[test]
    fn processed_values_round_to_bf16_and_f16_the_same_on_every_path() {
        // The pipeline converts pixel values to the text encoder's dtype on the host (round to nearest even, as
        // CUDA does); burn's CPU cast rounds through f64 and differs just above a tie. No processed value of the
        // published config (either resampler) is such a value.
        use burn::tensor::{bf16, f16};
        for resampler in [Resampler::Torch, Resampler::Pillow] {
            let p = ImageProcessor::new(ImageProcessorConfig { resampler, ..Default::default() }).unwrap();
            for &v in p.lut.iter().flatten() {
                assert_eq!(
                    bf16::from_f32(v).to_bits(),
                    bf16::from_f64(v as f64).to_bits(),
                    "{v:e} ({resampler:?})"
                );
                assert_eq!(
                    f16::from_f32(v).to_bits(),
                    f16::from_f64(v as f64).to_bits(),
                    "{v:e} ({resampler:?})"
                );
            }
        }
    }

    #[test]
    fn config_parsing_follows_transformers_precedence() {
        let c = ImageProcessorConfig::from_json(
            r#"{"size": {"shortest_edge": 100, "longest_edge": 5000}, "max_pixels": 4000, "patch_size": 14,
                "image_processor_type": "Qwen2VLImageProcessorPil", "unknown": 1}"#,
        )
        .unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (100, 4000));
        assert_eq!(c.resampler, Resampler::Pillow);
        let d = ImageProcessorConfig::from_json("{}").unwrap();
        assert_eq!(d, ImageProcessorConfig::default());
        assert!(ImageProcessorConfig::from_json(r#"{"image_mean": [0.5, 0.5]}"#).is_err());
        assert!(ImageProcessorConfig::from_json(r#"{"resample": 0}"#)
            .unwrap_err()
            .to_string()
            .contains("resample"));
        assert!(ImageProcessorConfig::from_json(r#"{"min_pixels": 10, "max_pixels": 5}"#).is_err());
    }

    #[test]
    fn patch_layout_is_merge_group_major() {
        // A 56×28 image (2×4 patches) whose red channel encodes the patch column and green the patch row.
        let img = RgbImage::from_fn(56, 28, |x, y| image::Rgb([(x / 14) as u8, (y / 14) as u8, 0]));
        let cfg = ImageProcessorConfig { do_rescale: false, do_normalize: false, ..Default::default() };
        let proc = ImageProcessor::new(cfg).unwrap();
        let mut out = vec![f32::NAN; 8 * 1176];
        let grid = proc.patchify(&img, &mut out);
        assert_eq!(grid, GridThw { t: 1, h: 2, w: 4 });
        assert_eq!(out.len(), 8 * 1176);
        // (row, col) of each patch, read from its first green and red values.
        let got: Vec<(f32, f32)> = out.chunks_exact(1176).map(|p| (p[392], p[0])).collect();
        // First merged cell (cols 0–1), then the second (cols 2–3).
        let want = [(0., 0.), (0., 1.), (1., 0.), (1., 1.), (0., 2.), (0., 3.), (1., 2.), (1., 3.)];
        assert_eq!(got, want);
        // Both frames of a patch are the same image.
        for p in out.chunks_exact(1176) {
            for c in 0..3 {
                assert_eq!(p[c * 392..c * 392 + 196], p[c * 392 + 196..c * 392 + 392]);
            }
        }
    }
}
