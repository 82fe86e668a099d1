//! [`Qwen25VlConfig`]: the text encoder's `config.json`, in either layout.
//!
//! - **Flat** (the published `text_encoder/config.json`, transformers 4.x): the language-model fields sit at the top
//!   level with `rope_scaling` and `rope_theta`; the vision tower is `vision_config` (legacy keys `in_chans`,
//!   `spatial_patch_size` accepted).
//! - **Nested** (transformers 5 `save_pretrained`): the language model is `text_config` with `rope_parameters`.
//!
//! When both are present, `text_config` wins, as in transformers. Unknown keys are ignored. Sizes the model cannot
//! run without are required; the remaining fields take transformers' defaults.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::{ModelError, Result};

/// Hyper-parameters of the language model (`Qwen2_5_VLTextConfig`).
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/configuration_qwen2_5_vl.py#L72
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    /// Rows of `embed_tokens`.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SiLU-gated MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// M-RoPE frequency sections of the (temporal, height, width) axes; they sum to `head_dim / 2`.
    pub mrope_section: [usize; 3],
}

impl TextConfig {
    /// Dimension of one attention head (`hidden_size / num_attention_heads`).
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Hyper-parameters of the vision tower (`Qwen2_5_VLVisionConfig`).
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/configuration_qwen2_5_vl.py#L36
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// Number of vision blocks.
    pub depth: usize,
    /// Width of the vision blocks.
    pub hidden_size: usize,
    /// Width of the blocks' SiLU-gated MLP.
    pub intermediate_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Image channels (3).
    pub in_channels: usize,
    /// Spatial side of a patch in pixels (14).
    pub patch_size: usize,
    /// Frames per patch (2: a still image is repeated).
    pub temporal_patch_size: usize,
    /// Side of the cell of patches merged into one language-model token (2).
    pub spatial_merge_size: usize,
    /// Side of an attention window in pixels (112 = 4 merged cells of 2×14 pixels).
    pub window_size: usize,
    /// Output width of the patch merger (the language model's width).
    pub out_hidden_size: usize,
    /// Blocks that attend over the whole image instead of a window.
    pub fullatt_block_indexes: Vec<usize>,
    /// Base θ of the 2-D rotary embedding.
    pub rope_theta: f64,
}

impl VisionConfig {
    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Features of a flattened patch: `in_channels · temporal_patch_size · patch_size²` (1176).
    pub fn patch_features(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches merged into one output token (`spatial_merge_size²`).
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// Side of an attention window in merged cells (`window_size / spatial_merge_size / patch_size`).
    pub fn window_cells(&self) -> usize {
        self.window_size / self.spatial_merge_size / self.patch_size
    }

    /// Whether block `i` attends over whole images (otherwise within windows).
    pub fn is_full_attention(&self, block: usize) -> bool {
        self.fullatt_block_indexes.contains(&block)
    }
}

/// The text encoder's `config.json` (`Qwen2_5_VLConfig`): both towers and the special token ids.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/configuration_qwen2_5_vl.py#L161
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen25VlConfig {
    /// The language model.
    pub text: TextConfig,
    /// The vision tower.
    pub vision: VisionConfig,
    /// `<|image_pad|>`: the placeholder replaced by image embeddings (151655).
    pub image_token_id: i64,
    /// `<|video_pad|>` (151656); videos are not supported.
    pub video_token_id: i64,
    /// `<|vision_start|>` (151652).
    pub vision_start_token_id: i64,
    /// `<|vision_end|>` (151653).
    pub vision_end_token_id: i64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawTop {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    image_token_id: Option<i64>,
    video_token_id: Option<i64>,
    vision_start_token_id: Option<i64>,
    vision_end_token_id: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawRope {
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_type: Option<String>,
    mrope_section: Option<Vec<usize>>,
    rope_theta: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawText {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawVision {
    depth: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_heads: Option<usize>,
    in_channels: Option<usize>,
    in_chans: Option<usize>,
    patch_size: Option<usize>,
    spatial_patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    spatial_merge_size: Option<usize>,
    window_size: Option<usize>,
    out_hidden_size: Option<usize>,
    fullatt_block_indexes: Option<Vec<usize>>,
    hidden_act: Option<String>,
    rope_parameters: Option<RawRope>,
}

/// Architectures this crate runs (the class names transformers writes into `architectures`).
const ARCHITECTURES: [&str; 2] = ["Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"];

fn bad(reason: impl Into<String>) -> ModelError {
    ModelError::config("text encoder config", reason)
}

fn parse<T: serde::de::DeserializeOwned>(value: &Value, what: &str) -> Result<T> {
    serde_json::from_value(value.clone()).map_err(|e| bad(format!("{what}: {e}")))
}

fn required(value: Option<usize>, key: &str, section: &str) -> Result<usize> {
    value.ok_or_else(|| bad(format!("`{section}{key}` is missing")))
}

impl Qwen25VlConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::error::read_config(path, Self::from_json)
    }

    /// Parses and validates a config from JSON text (flat or nested layout).
    pub fn from_json(text: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if !root.is_object() {
            return Err(bad("the config is not a JSON object"));
        }
        let top: RawTop = parse(&root, "top level")?;
        if let Some(model_type) = &top.model_type {
            if model_type != "qwen2_5_vl" {
                return Err(bad(format!("model_type is `{model_type}`, expected `qwen2_5_vl` (Qwen2.5-VL)")));
            }
        }
        if let Some(archs) = &top.architectures {
            if !archs.iter().any(|a| ARCHITECTURES.contains(&a.as_str())) {
                return Err(bad(format!("architectures {archs:?} name none of {ARCHITECTURES:?}")));
            }
        }
        let (text_value, section) = match root.get("text_config").filter(|v| !v.is_null()) {
            Some(v) => (v, "text_config."),
            None => (&root, ""),
        };
        let raw_text: RawText = parse(text_value, "text_config")?;
        let raw_vision: RawVision = match root.get("vision_config").filter(|v| !v.is_null()) {
            Some(v) => parse(v, "vision_config")?,
            None => return Err(bad("`vision_config` is missing")),
        };
        let cfg = Qwen25VlConfig {
            text: resolve_text(raw_text, section)?,
            vision: resolve_vision(raw_vision)?,
            image_token_id: top.image_token_id.unwrap_or(151655),
            video_token_id: top.video_token_id.unwrap_or(151656),
            vision_start_token_id: top.vision_start_token_id.unwrap_or(151652),
            vision_end_token_id: top.vision_end_token_id.unwrap_or(151653),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the values describe a model this crate can run.
    pub fn validate(&self) -> Result<()> {
        let (t, v) = (&self.text, &self.vision);
        let positive = [
            ("vocab_size", t.vocab_size),
            ("hidden_size", t.hidden_size),
            ("intermediate_size", t.intermediate_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
            ("num_key_value_heads", t.num_key_value_heads),
            ("vision_config.depth", v.depth),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_heads", v.num_heads),
            ("vision_config.in_channels", v.in_channels),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.temporal_patch_size", v.temporal_patch_size),
            ("vision_config.spatial_merge_size", v.spatial_merge_size),
            ("vision_config.out_hidden_size", v.out_hidden_size),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(bad(format!("`{key}` must be positive")));
        }
        if t.hidden_size % t.num_attention_heads != 0 {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            )));
        }
        if t.num_attention_heads % t.num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads, t.num_key_value_heads
            )));
        }
        if t.head_dim() % 2 != 0 || t.mrope_section.iter().sum::<usize>() * 2 != t.head_dim() {
            return Err(bad(format!(
                "mrope_section {:?} must sum to head_dim / 2 = {} (head_dim {})",
                t.mrope_section,
                t.head_dim() / 2,
                t.head_dim()
            )));
        }
        if !(t.rms_norm_eps > 0.0 && t.rope_theta > 0.0 && v.rope_theta > 0.0) {
            return Err(bad("rms_norm_eps and the rope thetas must be positive"));
        }
        if v.hidden_size % v.num_heads != 0 || v.head_dim() % 4 != 0 {
            return Err(bad(format!(
                "vision hidden_size {} / num_heads {} must give a head dimension that is a multiple of 4 \
                 (two rotary axes of rotate-half pairs)",
                v.hidden_size, v.num_heads
            )));
        }
        let cell = v.spatial_merge_size * v.patch_size;
        if v.window_size == 0 || v.window_size % cell != 0 {
            return Err(bad(format!(
                "vision window_size {} must be a positive multiple of spatial_merge_size · patch_size = {cell}",
                v.window_size
            )));
        }
        if let Some(&i) = v.fullatt_block_indexes.iter().find(|&&i| i >= v.depth) {
            return Err(bad(format!("fullatt_block_indexes holds block {i}, but depth is {}", v.depth)));
        }
        if v.out_hidden_size != t.hidden_size {
            return Err(bad(format!(
                "vision out_hidden_size {} differs from the language model's hidden_size {}",
                v.out_hidden_size, t.hidden_size
            )));
        }
        let ids =
            [self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id];
        if ids.iter().any(|&id| id < 0) {
            return Err(bad(format!("special token ids must not be negative: {ids:?}")));
        }
        if self.image_token_id as usize >= t.vocab_size {
            return Err(bad(format!(
                "image_token_id {} is outside the vocabulary of {} tokens",
                self.image_token_id, t.vocab_size
            )));
        }
        Ok(())
    }
}

fn resolve_text(raw: RawText, section: &str) -> Result<TextConfig> {
    if let Some(model_type) = &raw.model_type {
        if !section.is_empty() && model_type != "qwen2_5_vl_text" {
            return Err(bad(format!("text_config.model_type is `{model_type}`, expected `qwen2_5_vl_text`")));
        }
    }
    let act = raw.hidden_act.as_deref().unwrap_or("silu");
    if act != "silu" {
        return Err(bad(format!("{section}hidden_act is `{act}`; only `silu` is supported")));
    }
    if raw.use_sliding_window == Some(true) {
        return Err(bad("use_sliding_window = true is not supported (Qwen2.5-VL ships with full attention)"));
    }
    if let Some(kind) = raw.layer_types.iter().flatten().find(|k| k.as_str() != "full_attention") {
        return Err(bad(format!(
            "layer type `{kind}` is not supported; every layer must be `full_attention`"
        )));
    }
    // transformers: `rope_parameters = rope_scaling or rope_parameters`, θ from there, else `rope_theta`, else 1e6.
    let rope = raw.rope_scaling.or(raw.rope_parameters).unwrap_or_default();
    let rope_type = rope.rope_type.as_deref().or(rope.kind.as_deref()).unwrap_or("default");
    if rope_type != "default" && rope_type != "mrope" {
        return Err(bad(format!("rope type `{rope_type}` is not supported (expected `default` or `mrope`)")));
    }
    let section_vec = rope.mrope_section.unwrap_or_else(|| vec![16, 24, 24]);
    let mrope_section: [usize; 3] = section_vec
        .as_slice()
        .try_into()
        .map_err(|_| bad(format!("mrope_section {section_vec:?} must have 3 entries (t, h, w)")))?;
    let text = TextConfig {
        vocab_size: required(raw.vocab_size, "vocab_size", section)?,
        hidden_size: required(raw.hidden_size, "hidden_size", section)?,
        intermediate_size: required(raw.intermediate_size, "intermediate_size", section)?,
        num_hidden_layers: required(raw.num_hidden_layers, "num_hidden_layers", section)?,
        num_attention_heads: required(raw.num_attention_heads, "num_attention_heads", section)?,
        num_key_value_heads: required(raw.num_key_value_heads, "num_key_value_heads", section)?,
        rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
        rope_theta: rope.rope_theta.or(raw.rope_theta).unwrap_or(1e6),
        mrope_section,
    };
    if let Some(head_dim) = raw.head_dim {
        if text.num_attention_heads != 0 && head_dim * text.num_attention_heads != text.hidden_size {
            return Err(bad(format!(
                "{section}head_dim {head_dim} differs from hidden_size / num_attention_heads = {}",
                text.hidden_size / text.num_attention_heads
            )));
        }
    }
    Ok(text)
}

fn resolve_vision(raw: RawVision) -> Result<VisionConfig> {
    let s = "vision_config.";
    let act = raw.hidden_act.as_deref().unwrap_or("silu");
    if act != "silu" {
        return Err(bad(format!("vision_config.hidden_act is `{act}`; only `silu` is supported")));
    }
    let alias = |new: Option<usize>, old: Option<usize>, key: &str, old_key: &str| match (new, old) {
        (Some(a), Some(b)) if a != b => {
            Err(bad(format!("vision_config has {key} = {a} but {old_key} = {b}")))
        }
        (a, b) => Ok(a.or(b)),
    };
    let rope = raw.rope_parameters.unwrap_or_default();
    if let Some(kind) = rope.rope_type.as_deref().or(rope.kind.as_deref()) {
        if kind != "axial" && kind != "default" {
            return Err(bad(format!("vision rope type `{kind}` is not supported (expected `axial`)")));
        }
    }
    Ok(VisionConfig {
        depth: required(raw.depth, "depth", s)?,
        hidden_size: required(raw.hidden_size, "hidden_size", s)?,
        intermediate_size: required(raw.intermediate_size, "intermediate_size", s)?,
        num_heads: required(raw.num_heads, "num_heads", s)?,
        in_channels: alias(raw.in_channels, raw.in_chans, "in_channels", "in_chans")?.unwrap_or(3),
        patch_size: alias(raw.patch_size, raw.spatial_patch_size, "patch_size", "spatial_patch_size")?
            .unwrap_or(14),
        temporal_patch_size: raw.temporal_patch_size.unwrap_or(2),
        spatial_merge_size: raw.spatial_merge_size.unwrap_or(2),
        window_size: raw.window_size.unwrap_or(112),
        out_hidden_size: required(raw.out_hidden_size, "out_hidden_size", s)?,
        fullatt_block_indexes: raw.fullatt_block_indexes.unwrap_or_else(|| vec![7, 15, 23, 31]),
        rope_theta: rope.rope_theta.unwrap_or(10000.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-VL-7B in the legacy flat layout (transformers 4.49: no `text_config`).
    const FLAT_CONFIG: &str = r#"{
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
        "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "transformers_version": "4.49.0", "use_cache": true, "use_sliding_window": false,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
            "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
            "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2, "temporal_patch_size": 2, "model_type": "qwen2_5_vl"},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 152064
    }"#;

    #[test]
    fn parses_the_edit_snapshot_config_saved_by_transformers_4_53() {
        let text = crate::published::TEXT_ENCODER_CONFIG;
        let cfg = Qwen25VlConfig::from_json(text).unwrap();
        assert_eq!(cfg, Qwen25VlConfig::from_json(FLAT_CONFIG).unwrap());
        assert_eq!(
            (
                cfg.text.vocab_size,
                cfg.text.hidden_size,
                cfg.text.intermediate_size,
                cfg.text.num_hidden_layers
            ),
            (152064, 3584, 18944, 28)
        );
        assert_eq!((cfg.text.num_attention_heads, cfg.text.num_key_value_heads), (28, 4));
        assert_eq!(
            (cfg.text.mrope_section, cfg.text.rope_theta, cfg.text.rms_norm_eps),
            ([16, 24, 24], 1e6, 1e-6)
        );
        assert_eq!((cfg.vision.in_channels, cfg.vision.patch_size, cfg.vision.depth), (3, 14, 32));
        assert_eq!(
            [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id],
            [151655, 151656, 151652, 151653]
        );
        // The file has what the parser must cope with: both layouts, nulls, `type` beside `rope_type`, both
        // channel keys.
        let v: Value = serde_json::from_str(text).unwrap();
        let t = &v["text_config"];
        assert!(
            t["sliding_window"].is_null() && t["image_token_id"].is_null() && v["sliding_window"] == 32768
        );
        assert_eq!(t["layer_types"].as_array().unwrap().len(), 28);
        assert_eq!(t["rope_scaling"]["type"], "default");
        assert_eq!(
            (&v["vision_config"]["in_channels"], &v["vision_config"]["in_chans"]),
            (&3.into(), &3.into())
        );
        // `text_config` is what is read: a change there shows, the same change in the flat copy does not.
        let with = |section: Option<&str>, key: &str, value: Value| {
            let mut v = v.clone();
            match section {
                Some(s) => v[s][key] = value,
                None => v[key] = value,
            }
            Qwen25VlConfig::from_json(&v.to_string())
        };
        let err = with(Some("text_config"), "num_key_value_heads", 5.into()).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
        assert_eq!(with(None, "num_key_value_heads", 5.into()).unwrap(), cfg);
        assert_eq!(with(Some("text_config"), "rope_theta", 5e5.into()).unwrap().text.rope_theta, 5e5);
        let swa = with(Some("text_config"), "layer_types", serde_json::json!(vec!["sliding_attention"; 28]));
        assert!(swa.unwrap_err().to_string().contains("sliding_attention"));
    }

    #[test]
    fn parses_the_published_flat_config() {
        let cfg = Qwen25VlConfig::from_json(FLAT_CONFIG).unwrap();
        assert_eq!(cfg.text.head_dim(), 128);
        assert_eq!(cfg.text.mrope_section, [16, 24, 24]);
        assert_eq!(cfg.text.rope_theta, 1e6);
        assert_eq!(cfg.text.rms_norm_eps, 1e-6);
        assert_eq!(cfg.text.num_key_value_heads, 4);
        assert_eq!(cfg.vision.head_dim(), 80);
        assert_eq!(cfg.vision.patch_features(), 1176);
        assert_eq!(cfg.vision.window_cells(), 4);
        assert!(cfg.vision.is_full_attention(31) && !cfg.vision.is_full_attention(30));
        assert_eq!(cfg.image_token_id, 151655);
        assert_eq!(cfg.vision.rope_theta, 10000.0);
    }

    #[test]
    fn the_nested_layout_takes_text_config() {
        let mut v: Value = serde_json::from_str(FLAT_CONFIG).unwrap();
        let obj = v.as_object_mut().unwrap();
        let mut text = serde_json::Map::new();
        for key in
            ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        {
            text.insert(key.into(), obj.remove(key).unwrap());
        }
        text.insert("num_key_value_heads".into(), 2.into());
        text.insert("model_type".into(), "qwen2_5_vl_text".into());
        text.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "mrope_section": [32, 16, 16], "rope_theta": 5e5}),
        );
        obj.insert("text_config".into(), Value::Object(text));
        let cfg = Qwen25VlConfig::from_json(&v.to_string()).unwrap();
        assert_eq!(cfg.text.num_key_value_heads, 2);
        assert_eq!(cfg.text.mrope_section, [32, 16, 16]);
        assert_eq!(cfg.text.rope_theta, 5e5);
    }

    #[test]
    fn rejects_other_models_and_bad_values() {
        let with = |from: &str, to: &str| {
            assert!(FLAT_CONFIG.contains(from), "{from}");
            Qwen25VlConfig::from_json(&FLAT_CONFIG.replace(from, to)).unwrap_err().to_string()
        };
        assert!(with("\"model_type\": \"qwen2_5_vl\"", "\"model_type\": \"qwen2_vl\"").contains("model_type"));
        assert!(with("[\"Qwen2_5_VLForConditionalGeneration\"]", "[\"LlamaForCausalLM\"]")
            .contains("architectures"));
        assert!(with("[16, 24, 24]", "[16, 24, 26]").contains("mrope_section"));
        assert!(with("[16, 24, 24]", "[64, 0]").contains("3 entries"));
        assert!(
            with("\"num_key_value_heads\": 4", "\"num_key_value_heads\": 5").contains("num_key_value_heads")
        );
        assert!(with("\"num_key_value_heads\": 4,", "").contains("`num_key_value_heads` is missing"));
        assert!(with("\"window_size\": 112", "\"window_size\": 100").contains("window_size"));
        assert!(with("[7, 15, 23, 31]", "[7, 15, 23, 32]").contains("block 32"));
        assert!(with("\"use_sliding_window\": false", "\"use_sliding_window\": true").contains("sliding"));
        assert!(with("\"in_chans\": 3", "\"in_chans\": 3, \"in_channels\": 4").contains("in_chans"));
        assert!(with("\"out_hidden_size\": 3584", "\"out_hidden_size\": 2048").contains("out_hidden_size"));
        assert!(with("\"hidden_size\": 3584", "\"hidden_size\": \"big\"").contains("invalid type"));
        assert!(Qwen25VlConfig::from_json("[]").is_err());
        let no_vision = FLAT_CONFIG.replace("\"vision_config\"", "\"other\"");
        assert!(Qwen25VlConfig::from_json(&no_vision).unwrap_err().to_string().contains("vision_config"));
    }
}
