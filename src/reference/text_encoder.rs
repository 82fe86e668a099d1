//! The text encoder on dumped token ids and pixel values (the `text_encode` example, text-encoder parity tests).

use std::path::Path;

use qwen_image::{
    ops::QwenBackend,
    tensor_io::{to_f32_vec, TensorFile},
    text_encoder::{GridThw, PositionMode, Qwen25VlTextEncoder, TextEncoderInput, TokenTensor},
    ModelError,
};

/// Reads `image_grid_thw` (`[n, 3]` positive integers: frames, height, width in patches).
pub fn read_image_grid_thw(file: &TensorFile) -> Result<Vec<GridThw>, ModelError> {
    let (v, shape) = file.i64("image_grid_thw")?;
    if shape.len() != 2 || shape[1] != 3 || v.iter().any(|&x| x <= 0) {
        return Err(ModelError::invalid(format!(
            "image_grid_thw must be a [n, 3] tensor of positive (frames, height, width), got shape {shape:?} values \
             {v:?}"
        )));
    }
    Ok(v.chunks(3).map(|c| GridThw::new(c[0] as usize, c[1] as usize, c[2] as usize)).collect())
}

fn read_tokens<B: QwenBackend>(file: &TensorFile, name: &str) -> Result<TokenTensor<B>, ModelError> {
    let (values, shape) = file.i64(name)?;
    match shape.as_slice() {
        [batch, tokens] => Ok(TokenTensor::Host { values, shape: [*batch, *tokens] }),
        _ => Err(ModelError::invalid(format!("`{name}` must be [batch, tokens], got {shape:?}"))),
    }
}

/// The text-encoder inputs stored in `file`: `input_ids` (integers `[batch, tokens]`), optionally `attention_mask`
/// (`[batch, tokens]`, 1 = token, 0 = padding) and `pixel_values` (`[patches, 1176]`) with `image_grid_thw`
/// (`[n, 3]`).
pub fn read_text_encoder_input<B: QwenBackend>(
    file: &TensorFile,
    device: &B::Device,
) -> Result<TextEncoderInput<B>, ModelError> {
    let mut input = TextEncoderInput::new(read_tokens::<B>(file, "input_ids")?);
    if file.contains("attention_mask") {
        input = input.with_attention_mask(read_tokens::<B>(file, "attention_mask")?);
    }
    match (file.contains("pixel_values"), file.contains("image_grid_thw")) {
        (true, true) => {
            input = input.with_images(file.tensor("pixel_values", device)?, read_image_grid_thw(file)?);
        }
        (false, false) => {}
        _ => return Err(ModelError::invalid("give both pixel_values and image_grid_thw, or neither")),
    }
    Ok(input)
}

/// Runs the text encoder on the inputs in `inputs` with the given rotary `positions`; returns `last_hidden_state`
/// (diffusers' `hidden_states[-1]`) as f32 values and its shape `[batch, tokens, hidden]`.
pub fn text_encode<B: QwenBackend>(
    model: &Qwen25VlTextEncoder<B>,
    inputs: &Path,
    positions: PositionMode,
) -> Result<(Vec<f32>, Vec<usize>), ModelError> {
    let file = TensorFile::open(inputs)?;
    let input = read_text_encoder_input(&file, model.device())?.with_positions(positions);
    let out = model.forward(&input)?;
    let shape = out.dims().to_vec();
    Ok((to_f32_vec(out), shape))
}
