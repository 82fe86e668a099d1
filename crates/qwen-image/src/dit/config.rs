//! [`DitConfig`]: the transformer's `config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::{ModelError, Result};

/// Hyper-parameters of `QwenImageTransformer2DModel`, read from a diffusers `transformer/config.json`.
///
/// Unknown keys are ignored; missing keys take diffusers' defaults (the published Qwen-Image-Edit values).
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/transformers/transformer_qwenimage.py#L816-L831
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct DitConfig {
    /// diffusers class name; must be `QwenImageTransformer2DModel` when present.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Latent patch size (2: each token packs 2×2 latent pixels).
    pub patch_size: usize,
    /// Channels of a packed input token (64 = 16 latent channels × 2 × 2).
    pub in_channels: usize,
    /// Latent channels of the output (the output token has `patch_size² · out_channels` features).
    pub out_channels: Option<usize>,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Dimension of one attention head.
    pub attention_head_dim: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Width of the text encoder's hidden states.
    pub joint_attention_dim: usize,
    /// Guidance embedding (not used by the Qwen-Image-Edit checkpoints; unsupported).
    pub guidance_embeds: bool,
    /// RoPE dimensions of the frame, height and width axes (they sum to the head dimension).
    pub axes_dims_rope: Vec<usize>,
    /// Edit-2511: condition-image tokens are modulated with timestep 0.
    pub zero_cond_t: bool,
    /// Qwen-Image-Layered only (unsupported).
    pub use_additional_t_cond: bool,
    /// Qwen-Image-Layered only (unsupported).
    pub use_layer3d_rope: bool,
}

impl Default for DitConfig {
    fn default() -> Self {
        DitConfig {
            class_name: None,
            patch_size: 2,
            in_channels: 64,
            out_channels: Some(16),
            num_layers: 60,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 3584,
            guidance_embeds: false,
            axes_dims_rope: vec![16, 56, 56],
            zero_cond_t: false,
            use_additional_t_cond: false,
            use_layer3d_rope: false,
        }
    }
}

impl DitConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::error::read_config(path, Self::from_json)
    }

    /// Parses and validates a config from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: DitConfig =
            serde_json::from_str(text).map_err(|e| ModelError::config("config.json", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the values describe a model this crate can run.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(ModelError::config("transformer config", reason));
        if let Some(name) = &self.class_name {
            if name != "QwenImageTransformer2DModel" {
                return bad(format!("_class_name is `{name}`, expected `QwenImageTransformer2DModel`"));
            }
        }
        if self.guidance_embeds || self.use_additional_t_cond || self.use_layer3d_rope {
            return bad(
                "guidance_embeds, use_additional_t_cond and use_layer3d_rope are not supported".into()
            );
        }
        if self.num_layers == 0 || self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return bad("num_layers, num_attention_heads and attention_head_dim must be positive".into());
        }
        if self.attention_head_dim % 2 != 0 {
            return bad(format!("attention_head_dim {} must be even", self.attention_head_dim));
        }
        if self.axes_dims_rope.len() != 3
            || self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| d % 2 != 0)
        {
            return bad(format!(
                "axes_dims_rope {:?} must be 3 even numbers summing to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        if self.patch_size == 0 || self.in_channels == 0 || self.joint_attention_dim == 0 {
            return bad("patch_size, in_channels and joint_attention_dim must be positive".into());
        }
        Ok(())
    }

    /// Model width: heads × head dimension.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Features of an output token: `patch_size² · out_channels`.
    pub fn out_features(&self) -> usize {
        self.patch_size * self.patch_size * self.out_channels.unwrap_or(self.in_channels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_published_config() {
        let cfg = DitConfig::from_json(
            r#"{"_class_name":"QwenImageTransformer2DModel","_diffusers_version":"0.35.0.dev0","attention_head_dim":128,
            "axes_dims_rope":[16,56,56],"guidance_embeds":false,"in_channels":64,"joint_attention_dim":3584,
            "num_attention_heads":24,"num_layers":60,"out_channels":16,"patch_size":2,"pooled_projection_dim":768}"#,
        )
        .unwrap();
        assert_eq!(
            cfg,
            DitConfig { class_name: Some("QwenImageTransformer2DModel".into()), ..Default::default() }
        );
        assert_eq!(cfg.inner_dim(), 3072);
        assert_eq!(cfg.out_features(), 64);
    }

    #[test]
    fn rejects_other_models_and_bad_values() {
        assert!(DitConfig::from_json(r#"{"_class_name":"FluxTransformer2DModel"}"#).is_err());
        assert!(DitConfig::from_json(r#"{"axes_dims_rope":[16,56,58]}"#).is_err());
        assert!(DitConfig::from_json(r#"{"num_layers":"sixty"}"#).is_err());
        assert!(DitConfig::from_json(r#"{"zero_cond_t":true}"#).unwrap().zero_cond_t);
    }
}
