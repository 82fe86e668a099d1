//! The published configs of the Qwen-Image-Edit networks (`transformer/`, `vae/` and `text_encoder/config.json` of
//! the diffusers snapshot): the full-size architecture, for tests of the config parsers, the full-size demo and the
//! benchmarks (with random weights, no checkpoint needed). The parameters they take are documented at the classes
//! that read them (linked at each constant).

/// `transformer/config.json`: the 20 B DiT. `pooled_projection_dim` is written by the diffusers version that saved
/// the snapshot and read by none today.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/transformers/transformer_qwenimage.py#L816-L831
pub const TRANSFORMER_CONFIG: &str = r#"{
  "_class_name": "QwenImageTransformer2DModel",
  "attention_head_dim": 128,
  "axes_dims_rope": [16, 56, 56],
  "guidance_embeds": false,
  "in_channels": 64,
  "joint_attention_dim": 3584,
  "num_attention_heads": 24,
  "num_layers": 60,
  "out_channels": 16,
  "patch_size": 2,
  "pooled_projection_dim": 768
}"#;

/// `vae/config.json` (without `input_channels`, as published: it defaults to 3).
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L684-L697
pub const VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKLQwenImage",
  "attn_scales": [],
  "base_dim": 96,
  "dim_mult": [1, 2, 4, 4],
  "dropout": 0.0,
  "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
  "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.916],
  "num_res_blocks": 2,
  "temperal_downsample": [false, true, true],
  "z_dim": 16
}"#;

/// `text_encoder/config.json` of the Qwen-Image-Edit snapshots: Qwen2.5-VL-7B as transformers 4.53.1 saves it,
/// with the language model's fields both at the top level (the legacy flat layout) and in `text_config` (with
/// `layer_types`, `rope_scaling` carrying both `rope_type` and `type`, and `null`s), and a `vision_config` with both
/// `in_channels` and `in_chans`; the special token ids are at the top level.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/configuration_qwen2_5_vl.py#L161
pub const TEXT_ENCODER_CONFIG: &str = r#"{
  "architectures": [
    "Qwen2_5_VLForConditionalGeneration"
  ],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "hidden_size": 3584,
  "image_token_id": 151655,
  "initializer_range": 0.02,
  "intermediate_size": 18944,
  "max_position_embeddings": 128000,
  "max_window_layers": 28,
  "model_type": "qwen2_5_vl",
  "num_attention_heads": 28,
  "num_hidden_layers": 28,
  "num_key_value_heads": 4,
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "mrope_section": [
      16,
      24,
      24
    ],
    "rope_type": "default",
    "type": "default"
  },
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "text_config": {
    "architectures": [
      "Qwen2_5_VLForConditionalGeneration"
    ],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "image_token_id": null,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "layer_types": [
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention",
      "full_attention"
    ],
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl_text",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
      "mrope_section": [
        16,
        24,
        24
      ],
      "rope_type": "default",
      "type": "default"
    },
    "rope_theta": 1000000.0,
    "sliding_window": null,
    "torch_dtype": "float32",
    "use_cache": true,
    "use_sliding_window": false,
    "video_token_id": null,
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
    "vision_token_id": 151654,
    "vocab_size": 152064
  },
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.53.1",
  "use_cache": true,
  "use_sliding_window": false,
  "video_token_id": 151656,
  "vision_config": {
    "depth": 32,
    "fullatt_block_indexes": [
      7,
      15,
      23,
      31
    ],
    "hidden_act": "silu",
    "hidden_size": 1280,
    "in_channels": 3,
    "in_chans": 3,
    "initializer_range": 0.02,
    "intermediate_size": 3420,
    "model_type": "qwen2_5_vl",
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "temporal_patch_size": 2,
    "tokens_per_second": 2,
    "torch_dtype": "float32",
    "window_size": 112
  },
  "vision_end_token_id": 151653,
  "vision_start_token_id": 151652,
  "vision_token_id": 151654,
  "vocab_size": 152064
}
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dit::DitConfig, synthetic, text_encoder::Qwen25VlConfig, vae::VaeConfig};

    #[test]
    fn the_published_configs_give_the_full_size_networks() {
        let dit = DitConfig::from_json(TRANSFORMER_CONFIG).unwrap();
        assert_eq!((dit.num_layers, dit.inner_dim(), dit.joint_attention_dim), (60, 3072, 3584));
        let vae = VaeConfig::from_json(VAE_CONFIG).unwrap();
        assert_eq!((vae.base_dim, vae.z_dim), (96, 16));
        let te = Qwen25VlConfig::from_json(TEXT_ENCODER_CONFIG).unwrap();
        assert_eq!((te.text.hidden_size, te.text.num_hidden_layers, te.vision.depth), (3584, 28, 32));
    }

    /// Tensors and parameters of a checkpoint's key/shape list.
    fn count(tensors: Vec<(String, Vec<usize>)>) -> (usize, usize) {
        (tensors.len(), tensors.iter().map(|(_, s)| s.iter().product::<usize>()).sum())
    }

    #[test]
    fn the_loaders_read_the_published_checkpoints_tensor_for_tensor() {
        // The published files: 1933 DiT tensors in 9 shards, 194 VAE tensors, 729 text-encoder tensors of which
        // the loader skips `lm_head.weight` (152064 × 3584). Counted from what each loader reads on a shape-only
        // store: nothing is allocated.
        let dit = DitConfig::from_json(TRANSFORMER_CONFIG).unwrap();
        assert_eq!(count(synthetic::dit_checkpoint_tensors(&dit).unwrap()), (1933, 20_430_401_088));
        let vae = VaeConfig::from_json(VAE_CONFIG).unwrap();
        assert_eq!(count(synthetic::vae_checkpoint_tensors(&vae).unwrap()), (194, 126_892_531));
        let te = Qwen25VlConfig::from_json(TEXT_ENCODER_CONFIG).unwrap();
        assert_eq!(count(synthetic::text_encoder_checkpoint_tensors(&te).unwrap()), (728, 7_747_169_280));
    }
}
