//! [`VaeConfig`]: the autoencoder's `vae/config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::{ModelError, Result};

/// Per-channel mean of the published Qwen-Image latents (diffusers' default `latents_mean`).
pub const QWEN_IMAGE_LATENTS_MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632,
    -0.1922, -0.9497, 0.2503, -0.2921,
];

/// Per-channel standard deviation of the published Qwen-Image latents (diffusers' default `latents_std`).
pub const QWEN_IMAGE_LATENTS_STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382,
    1.1253, 2.8251, 1.9160,
];

/// Hyper-parameters of `AutoencoderKLQwenImage`, read from a diffusers `vae/config.json`.
///
/// Unknown keys are ignored; missing keys take diffusers' defaults (the published Qwen-Image values).
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L684-L697
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// diffusers class name; must be `AutoencoderKLQwenImage` when present.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Channels of the first level (96).
    pub base_dim: usize,
    /// Latent channels (16); the encoder produces `2·z_dim` (mean and log-variance).
    pub z_dim: usize,
    /// Channel multiplier of each level (`[1, 2, 4, 4]`); `len − 1` levels halve the resolution.
    pub dim_mult: Vec<usize>,
    /// Residual blocks per encoder level (the decoder has one more per level).
    pub num_res_blocks: usize,
    /// Scales at which the encoder inserts attention blocks. Must be empty: diffusers' encoder cannot run them either
    /// (its attention block does not take the feature cache it is called with).
    pub attn_scales: Vec<f64>,
    /// Which downsamplers also downsample in time (they then carry a `time_conv`, unused for single images). The
    /// decoder's upsamplers use the reversed list.
    pub temperal_downsample: Vec<bool>,
    /// Dropout probability (training only; ignored).
    pub dropout: f64,
    /// Channels of the image (3).
    pub input_channels: usize,
    /// Per-channel mean of the latents, used by [`normalize_latents`](super::AutoencoderKLQwenImage::normalize_latents).
    pub latents_mean: Vec<f32>,
    /// Per-channel standard deviation of the latents.
    pub latents_std: Vec<f32>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            class_name: None,
            base_dim: 96,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: Vec::new(),
            temperal_downsample: vec![false, true, true],
            dropout: 0.0,
            input_channels: 3,
            latents_mean: QWEN_IMAGE_LATENTS_MEAN.to_vec(),
            latents_std: QWEN_IMAGE_LATENTS_STD.to_vec(),
        }
    }
}

impl VaeConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::error::read_config(path, Self::from_json)
    }

    /// Parses and validates a config from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: VaeConfig =
            serde_json::from_str(text).map_err(|e| ModelError::config("config.json", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the values describe a model this crate can run.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(ModelError::config("vae config", reason));
        if let Some(name) = &self.class_name {
            if name != "AutoencoderKLQwenImage" {
                return bad(format!("_class_name is `{name}`, expected `AutoencoderKLQwenImage`"));
            }
        }
        if self.base_dim < 2 || self.z_dim == 0 || self.input_channels == 0 {
            return bad(format!(
                "base_dim ({}) must be at least 2, z_dim ({}) and input_channels ({}) positive",
                self.base_dim, self.z_dim, self.input_channels
            ));
        }
        if self.dim_mult.is_empty() || self.dim_mult.contains(&0) {
            return bad(format!(
                "dim_mult {:?} must be a non-empty list of positive integers",
                self.dim_mult
            ));
        }
        if self.dim_mult.len() > 6 {
            return bad(format!("dim_mult {:?} has more than 6 levels", self.dim_mult));
        }
        if self.num_res_blocks == 0 {
            return bad("num_res_blocks must be at least 1".into());
        }
        if !self.attn_scales.is_empty() {
            return bad(format!(
                "attn_scales {:?} is not supported (must be empty, as in every published checkpoint)",
                self.attn_scales
            ));
        }
        if self.temperal_downsample.len() != self.dim_mult.len() - 1 {
            return bad(format!(
                "temperal_downsample {:?} must have one entry per downsampling level ({} for dim_mult {:?})",
                self.temperal_downsample,
                self.dim_mult.len() - 1,
                self.dim_mult
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            return bad(format!(
                "latents_mean ({} values) and latents_std ({} values) must have z_dim = {} values",
                self.latents_mean.len(),
                self.latents_std.len(),
                self.z_dim
            ));
        }
        if self.latents_mean.iter().any(|m| !m.is_finite())
            || self.latents_std.iter().any(|s| !s.is_finite() || *s <= 0.0)
        {
            return bad("latents_mean must be finite and latents_std finite and positive".into());
        }
        Ok(())
    }

    /// Channels of each encoder level boundary: `base_dim · [1, dim_mult…]`.
    pub fn encoder_dims(&self) -> Vec<usize> {
        std::iter::once(1).chain(self.dim_mult.iter().copied()).map(|m| m * self.base_dim).collect()
    }

    /// Channels of each decoder level boundary: `base_dim · [dim_mult[-1], dim_mult reversed…]`.
    pub fn decoder_dims(&self) -> Vec<usize> {
        let last = *self.dim_mult.last().expect("validated: dim_mult is not empty");
        std::iter::once(last).chain(self.dim_mult.iter().rev().copied()).map(|m| m * self.base_dim).collect()
    }

    /// Whether decoder level `i` upsamples in time (the reversed `temperal_downsample`).
    pub fn temperal_upsample(&self, level: usize) -> bool {
        self.temperal_downsample[self.temperal_downsample.len() - 1 - level]
    }

    /// Pixels per latent along each axis: `2^(len(dim_mult) − 1)` (8 for the published model).
    pub fn spatial_compression(&self) -> usize {
        1 << (self.dim_mult.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_published_config() {
        let cfg = VaeConfig::from_json(crate::published::VAE_CONFIG).unwrap();
        assert_eq!(
            cfg,
            VaeConfig { class_name: Some("AutoencoderKLQwenImage".into()), ..Default::default() }
        );
        assert_eq!(cfg.encoder_dims(), vec![96, 96, 192, 384, 384]);
        assert_eq!(cfg.decoder_dims(), vec![384, 384, 384, 192, 96]);
        assert_eq!(cfg.spatial_compression(), 8);
        assert_eq!((0..3).map(|i| cfg.temperal_upsample(i)).collect::<Vec<_>>(), vec![true, true, false]);
    }

    #[test]
    fn rejects_other_models_and_bad_values() {
        for bad in [
            r#"{"_class_name":"AutoencoderKLWan"}"#,
            r#"{"z_dim":4}"#,
            r#"{"temperal_downsample":[true,true]}"#,
            r#"{"attn_scales":[0.5]}"#,
            r#"{"dim_mult":[]}"#,
            r#"{"dim_mult":[1,0,2,2]}"#,
            r#"{"num_res_blocks":0}"#,
            r#"{"base_dim":"96"}"#,
            r#"{"dropout":1.5}"#,
        ] {
            assert!(VaeConfig::from_json(bad).is_err(), "{bad} was accepted");
        }
        let mut std = QWEN_IMAGE_LATENTS_STD.to_vec();
        std[3] = 0.0;
        let json = format!(r#"{{"latents_std":{std:?}}}"#);
        assert!(VaeConfig::from_json(&json).unwrap_err().to_string().contains("positive"));
        let small = VaeConfig::from_json(
            r#"{"z_dim":4,"latents_mean":[0,0,0,0],"latents_std":[1,1,1,1],"dim_mult":[1,2],
                "temperal_downsample":[false],"unknown_key":3}"#,
        )
        .unwrap();
        assert_eq!(small.spatial_compression(), 2);
    }
}
