//! The Qwen-Image-Edit chat templates, `<|image_pad|>` expansion, and the selection of the text encoder's hidden
//! states that condition the DiT (diffusers' `_get_qwen_prompt_embeds`).
//!
//! Parity (`tests/processor_parity.rs`): the `input_ids` of both templates, with one and with several images, equal
//! those of transformers' `Qwen2VLProcessor` called as diffusers calls it; with the real Qwen vocabulary the 64
//! dropped tokens are exactly the system turn and `<|im_start|>user\n`.

use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};

use super::image_processor::GridThw;
use super::tokenizer::{QwenTokenizer, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START};
use crate::{ModelError, Result};

/// The system prompt of both edit templates.
pub const EDIT_SYSTEM_PROMPT: &str = "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain how the user's text instruction should alter or modify the image. Generate a new image that meets the user's requirements while maintaining consistency with the original input where appropriate.";

/// Number of leading template tokens whose hidden states are dropped (`prompt_template_encode_start_idx`): the
/// system turn and `<|im_start|>user\n`.
pub const DROP_IDX: usize = 64;

/// Which pipeline's prompt template to use.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py#L212-L213
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PromptTemplate {
    /// `QwenImageEditPipeline` (Qwen-Image-Edit): exactly one image, whose vision block precedes the prompt.
    Edit,
    /// `QwenImageEditPlusPipeline` (Edit-2509 / 2511): one or more images, each introduced by `Picture n: `.
    EditPlus,
}

impl PromptTemplate {
    /// The full text given to the processor for `prompt` and `num_images` images (before `<|image_pad|>`
    /// expansion), exactly as diffusers formats it.
    ///
    /// Errors for an empty prompt, for no image, and for more than one image with [`PromptTemplate::Edit`]. (A
    /// single space, Qwen's recommended negative prompt, is a valid prompt.)
    pub fn format(self, prompt: &str, num_images: usize) -> Result<String> {
        if prompt.is_empty() {
            return Err(ModelError::invalid("the prompt is empty (use \" \" for an empty negative prompt)"));
        }
        if num_images == 0 {
            return Err(ModelError::invalid("the edit templates need at least one condition image"));
        }
        let user = match self {
            PromptTemplate::Edit => {
                if num_images != 1 {
                    return Err(ModelError::invalid(format!(
                        "the Qwen-Image-Edit template has one image slot but {num_images} images were given \
                         (use the Edit-Plus template for several images)"
                    )));
                }
                format!("{VISION_START}{IMAGE_PAD}{VISION_END}{prompt}")
            }
            PromptTemplate::EditPlus => {
                let mut user = String::new();
                for n in 1..=num_images {
                    user.push_str(&format!("Picture {n}: {VISION_START}{IMAGE_PAD}{VISION_END}"));
                }
                user + prompt
            }
        };
        Ok(format!(
            "<|im_start|>system\n{EDIT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ))
    }

    /// Number of leading hidden states to drop: 64 for both edit templates.
    pub fn drop_idx(self) -> usize {
        DROP_IDX
    }
}

/// Token ids and attention mask of one prompt, vision placeholders expanded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextInputs {
    /// Token ids, `<|image_pad|>` repeated once per merged patch of each image.
    pub input_ids: Vec<u32>,
    /// 1 for every token (a single unpadded sequence).
    pub attention_mask: Vec<u32>,
}

/// Tokenizes `template` filled with `prompt` for images of `grids`, as `Qwen2VLProcessor(text, images)` does:
/// the `n`-th `<|image_pad|>` becomes `grids[n].num_tokens(merge_size)` copies.
///
/// Errors for an empty prompt, for a number of images the template cannot take, and when the prompt itself holds
/// `<|image_pad|>` or `<|video_pad|>` (the processor would count them as extra image or video slots).
pub fn encode_prompt(
    tokenizer: &QwenTokenizer,
    template: PromptTemplate,
    prompt: &str,
    grids: &[GridThw],
    merge_size: usize,
) -> Result<TextInputs> {
    for token in [IMAGE_PAD, VIDEO_PAD] {
        if prompt.contains(token) {
            return Err(ModelError::invalid(format!(
                "the prompt contains `{token}`, which is reserved for the condition images"
            )));
        }
    }
    let text = template.format(prompt, grids.len())?;
    let ids = tokenizer.encode(&text)?;
    let input_ids = expand_image_tokens(&ids, tokenizer.image_pad_id(), grids, merge_size)?;
    Ok(TextInputs { attention_mask: vec![1; input_ids.len()], input_ids })
}

/// Replaces the `n`-th `image_pad_id` of `ids` by `grids[n].num_tokens(merge_size)` copies of it.
///
/// Errors when the number of placeholders differs from the number of grids, or when a grid does not divide into
/// `merge_size × merge_size` cells.
pub fn expand_image_tokens(
    ids: &[u32],
    image_pad_id: u32,
    grids: &[GridThw],
    merge_size: usize,
) -> Result<Vec<u32>> {
    let slots = ids.iter().filter(|&&id| id == image_pad_id).count();
    if slots != grids.len() {
        return Err(ModelError::invalid(format!(
            "the prompt has {slots} image slot(s) but {} image(s) were given",
            grids.len()
        )));
    }
    let merge = merge_size * merge_size;
    let mut counts = Vec::with_capacity(grids.len());
    for g in grids {
        if merge == 0 || g.h % merge_size != 0 || g.w % merge_size != 0 || g.num_patches() == 0 {
            return Err(ModelError::invalid(format!(
                "image grid {}×{}×{} does not divide into {merge_size}×{merge_size} merged cells",
                g.t, g.h, g.w
            )));
        }
        counts.push(g.num_tokens(merge_size));
    }
    let mut out = Vec::with_capacity(ids.len() + counts.iter().sum::<usize>());
    let mut counts = counts.into_iter();
    for &id in ids {
        if id == image_pad_id {
            let n = counts.next().expect("one count per slot");
            out.extend(std::iter::repeat_n(image_pad_id, n));
        } else {
            out.push(id);
        }
    }
    Ok(out)
}

/// The DiT's text conditioning: the kept hidden states of each prompt, zero-padded to the longest.
#[derive(Clone, Debug)]
pub struct PromptEmbeds<B: Backend> {
    /// `[batch, max_len, hidden]`, in the hidden states' dtype.
    pub embeds: Tensor<B, 3>,
    /// `[batch, max_len]`, `true` for a kept token, `false` for padding.
    pub mask: Tensor<B, 2, Bool>,
    /// Kept tokens per prompt.
    pub lengths: Vec<usize>,
}

impl<B: Backend> PromptEmbeds<B> {
    /// The mask, or `None` when no prompt is padded (diffusers' `encode_prompt` drops an all-ones mask).
    pub fn mask_if_padded(&self) -> Option<Tensor<B, 2, Bool>> {
        let max = self.lengths.iter().copied().max().unwrap_or(0);
        self.lengths.iter().any(|&l| l != max).then(|| self.mask.clone())
    }
}

/// Selects, per prompt, the hidden states of the tokens whose attention mask is 1, drops the first `drop_idx` of
/// them, and zero-pads the results to the longest (diffusers' `_extract_masked_hidden` and what follows it).
///
/// `hidden` is the text encoder's last hidden state (after the final norm) `[batch, tokens, dim]`;
/// `attention_masks[b]` is prompt `b`'s mask over the `tokens` positions. Errors on mismatched shapes and when a
/// prompt has no more than `drop_idx` tokens.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py#L228
pub fn extract_prompt_embeds<B: Backend>(
    hidden: Tensor<B, 3>,
    attention_masks: &[Vec<u32>],
    drop_idx: usize,
) -> Result<PromptEmbeds<B>> {
    let [batch, tokens, dim] = hidden.dims();
    if attention_masks.len() != batch {
        return Err(ModelError::invalid(format!(
            "{} attention masks for a batch of {batch} hidden states",
            attention_masks.len()
        )));
    }
    let device = hidden.device();
    let mut kept = Vec::with_capacity(batch);
    for (b, mask) in attention_masks.iter().enumerate() {
        if mask.len() != tokens {
            return Err(ModelError::invalid(format!(
                "attention mask {b} has {} entries for {tokens} hidden states",
                mask.len()
            )));
        }
        let valid: Vec<i64> =
            mask.iter().enumerate().filter(|(_, &m)| m != 0).map(|(i, _)| i as i64).collect();
        if valid.len() <= drop_idx {
            return Err(ModelError::invalid(format!(
                "prompt {b} has {} tokens; more than the {drop_idx} template tokens to drop are needed",
                valid.len()
            )));
        }
        kept.push(valid[drop_idx..].to_vec());
    }
    let lengths: Vec<usize> = kept.iter().map(Vec::len).collect();
    let max = lengths.iter().copied().max().unwrap_or(0);
    let dtype = hidden.dtype();
    let mut rows = Vec::with_capacity(batch);
    for (b, idx) in kept.iter().enumerate() {
        let row = hidden.clone().narrow(0, b, 1);
        let contiguous = idx.windows(2).all(|w| w[1] == w[0] + 1);
        let mut sel = if contiguous {
            row.narrow(1, idx[0] as usize, idx.len())
        } else {
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(idx.clone(), [idx.len()]), &device);
            row.select(1, index)
        };
        if idx.len() < max {
            let pad = Tensor::<B, 3>::zeros([1, max - idx.len(), dim], (&device, dtype));
            sel = Tensor::cat(vec![sel, pad], 1);
        }
        rows.push(sel);
    }
    let embeds = Tensor::cat(rows, 0);
    let mask_values: Vec<bool> = lengths.iter().flat_map(|&l| (0..max).map(move |i| i < l)).collect();
    let mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(mask_values, [batch, max]), &device);
    Ok(PromptEmbeds { embeds, mask, lengths })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_diffusers_text() {
        let edit = PromptTemplate::Edit.format("make it red", 1).unwrap();
        assert!(edit.starts_with("<|im_start|>system\nDescribe the key features"));
        assert!(edit.ends_with(
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>make it red<|im_end|>\n<|im_start|>assistant\n"
        ));
        let plus = PromptTemplate::EditPlus.format("swap", 2).unwrap();
        assert!(plus.ends_with(
            "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: \
             <|vision_start|><|image_pad|><|vision_end|>swap<|im_end|>\n<|im_start|>assistant\n"
        ));
    }

    #[test]
    fn bad_prompts_and_image_counts_are_errors() {
        assert!(PromptTemplate::Edit.format("", 1).unwrap_err().to_string().contains("empty"));
        assert!(PromptTemplate::Edit.format(" ", 1).is_ok());
        assert!(PromptTemplate::Edit.format("x", 2).unwrap_err().to_string().contains("one image slot"));
        assert!(PromptTemplate::EditPlus.format("x", 0).is_err());
    }

    #[test]
    fn expansion_counts_merged_patches() {
        let grids = [GridThw { t: 1, h: 4, w: 6 }, GridThw { t: 1, h: 2, w: 2 }];
        let out = expand_image_tokens(&[7, 9, 8, 9, 5], 9, &grids, 2).unwrap();
        assert_eq!(out, [vec![7], vec![9; 6], vec![8], vec![9; 1], vec![5]].concat());
        assert!(expand_image_tokens(&[9], 9, &grids, 2).unwrap_err().to_string().contains("1 image slot"));
        assert!(expand_image_tokens(&[9], 9, &[GridThw { t: 1, h: 3, w: 4 }], 2).is_err());
    }

    #[test]
    fn extraction_drops_masks_and_pads() {
        type B = crate::CpuBackend;
        let dev = Default::default();
        // batch 2, 6 tokens, dim 2; value = 10·b + t.
        let data: Vec<f32> =
            (0..2).flat_map(|b| (0..6).flat_map(move |t| [(10 * b + t) as f32; 2])).collect();
        let hidden = Tensor::<B, 3>::from_data(TensorData::new(data, [2, 6, 2]), &dev);
        // Prompt 0 is left-padded by one token, prompt 1 has a hole (unusual but handled).
        let masks = vec![vec![0, 1, 1, 1, 1, 1], vec![1, 0, 1, 1, 0, 1]];
        let out = extract_prompt_embeds(hidden, &masks, 2).unwrap();
        assert_eq!(out.lengths, vec![3, 2]);
        let v = out.embeds.clone().into_data().to_vec::<f32>().unwrap();
        assert_eq!(v, vec![3., 3., 4., 4., 5., 5., 13., 13., 15., 15., 0., 0.]);
        let m = out.mask.clone().into_data().to_vec::<bool>().unwrap();
        assert_eq!(m, vec![true, true, true, true, true, false]);
        assert!(out.mask_if_padded().is_some());
        let hidden = Tensor::<B, 3>::zeros([1, 3, 2], &dev);
        assert!(extract_prompt_embeds(hidden.clone(), &[vec![1, 1, 1]], 3).is_err());
        assert!(extract_prompt_embeds(hidden, &[vec![1, 1]], 1).is_err());
    }
}
