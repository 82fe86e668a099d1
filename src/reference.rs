//! Reference checks: run the DiT or a denoising loop on inputs dumped to a safetensors file (by the fixture script
//! or by a user from diffusers), so that outputs can be compared with the reference implementation.

use std::path::Path;

use burn::tensor::{Bool, Tensor, TensorData};
use qwen_image::{
    dit::{DitInput, ImageShape, QwenImageTransformer},
    ops::QwenBackend,
    tensor_io::{to_f32_vec, TensorFile},
    ModelError,
};
use qwen_image_pipeline::{
    denoise, DenoiseCaches, DenoiseInputs, PipelineError, StepReport, TextConditioning,
};
use qwen_image_pruning::ScheduleSpec;

/// Reads `img_shapes` (`[n, 3]` integers: frames, height, width in tokens).
pub fn read_img_shapes(file: &TensorFile) -> Result<Vec<ImageShape>, ModelError> {
    let (v, shape) = file.i64("img_shapes")?;
    if shape.len() != 2 || shape[1] != 3 || shape[0] == 0 || v.iter().any(|&x| x <= 0) {
        return Err(ModelError::invalid(format!(
            "img_shapes must be a [n, 3] tensor of positive (frames, height, width), got shape {shape:?} values {v:?}"
        )));
    }
    Ok(v.chunks(3)
        .map(|c| ImageShape { frames: c[0] as usize, height: c[1] as usize, width: c[2] as usize })
        .collect())
}

fn read_mask<B: QwenBackend>(
    file: &TensorFile,
    name: &str,
    device: &B::Device,
) -> Result<Option<Tensor<B, 2, Bool>>, ModelError> {
    if !file.contains(name) {
        return Ok(None);
    }
    let (v, shape) = file.f32(name)?;
    if shape.len() != 2 {
        return Err(ModelError::invalid(format!("{name} must be [batch, text_tokens], got {shape:?}")));
    }
    let bools: Vec<bool> = v.iter().map(|&x| x != 0.0).collect();
    Ok(Some(Tensor::from_data(TensorData::new(bools, shape), device)))
}

/// The DiT inputs stored in `file`: `hidden_states`, `encoder_hidden_states`, `timestep`, `img_shapes` and optionally
/// `encoder_hidden_states_mask`.
pub fn read_dit_input<B: QwenBackend>(
    file: &TensorFile,
    device: &B::Device,
) -> Result<DitInput<B>, ModelError> {
    let (timestep, _) = file.f32("timestep")?;
    Ok(DitInput {
        hidden_states: file.tensor("hidden_states", device)?,
        encoder_hidden_states: file.tensor("encoder_hidden_states", device)?,
        encoder_hidden_states_mask: read_mask(file, "encoder_hidden_states_mask", device)?,
        timestep,
        img_shapes: read_img_shapes(file)?,
        modulation: None,
    })
}

/// Runs the plain DiT forward pass on the inputs in `inputs`; returns `sample` as f32 values and its shape.
pub fn dit_forward<B: QwenBackend>(
    model: &QwenImageTransformer<B>,
    inputs: &Path,
) -> Result<(Vec<f32>, Vec<usize>), ModelError> {
    let file = TensorFile::open(inputs)?;
    let input = read_dit_input(&file, model.device())?;
    let out = model.forward(&input)?;
    let shape = out.dims().to_vec();
    Ok((to_f32_vec(out), shape))
}

/// Final latents (f32 values and shape) and the per-step reports of [`denoise_file`].
pub type DenoiseOutput = (Vec<f32>, Vec<usize>, Vec<StepReport>);

/// Runs a plain Euler denoising loop (`x += (σ_{i+1} − σ_i)·v`, timestep = σ) under `schedule` on the inputs in
/// `inputs` (`latents`, `image_latents`, `encoder_hidden_states`, `img_shapes`, optional
/// `encoder_hidden_states_mask`). Returns the final latents, their shape and the per-step reports.
pub fn denoise_file<B: QwenBackend>(
    model: &QwenImageTransformer<B>,
    inputs: &Path,
    sigmas: &[f32],
    schedule: &ScheduleSpec,
) -> Result<DenoiseOutput, PipelineError> {
    let file = TensorFile::open(inputs)?;
    let dev = model.device();
    let sigmas = sigmas.to_vec();
    if sigmas.len() < 2 || sigmas.iter().any(|s| !s.is_finite()) {
        return Err(PipelineError::invalid("give at least two finite sigmas (the last is usually 0)"));
    }
    let inputs = DenoiseInputs {
        latents: file.tensor("latents", dev)?,
        image_latents: file.tensor("image_latents", dev)?,
        prompt: TextConditioning {
            embeds: file.tensor("encoder_hidden_states", dev)?,
            mask: read_mask(&file, "encoder_hidden_states_mask", dev)?,
        },
        negative: None,
        cfg_scale: 1.0,
        img_shapes: read_img_shapes(&file)?,
        timesteps: sigmas[..sigmas.len() - 1].to_vec(),
        sigmas,
        modulation: None,
    };
    let mut schedule = schedule.build()?;
    let mut caches = DenoiseCaches::default();
    let (x, reports) = denoise(model, &inputs, schedule.as_mut(), &mut caches, &mut |_| {})?;
    let shape = x.dims().to_vec();
    Ok((to_f32_vec(x), shape, reports))
}

// ---------------------------------------------------------------------------------------------------------------------
// VAE (the `vae` example)

use qwen_image::vae::{AutoencoderKLQwenImage, TileConfig};

/// Named f32 tensors `(name, values, shape)`, as the reference examples write them.
pub type NamedTensors = Vec<(&'static str, Vec<f32>, Vec<usize>)>;

/// Reads `name` as a 4-D `[batch, channels, h, w]` tensor, also accepting diffusers' single-frame 5-D form
/// `[batch, channels, 1, h, w]`; returns the tensor and whether the file held the 5-D form.
fn read_frame<B: QwenBackend>(
    file: &TensorFile,
    name: &str,
    device: &B::Device,
) -> Result<(Tensor<B, 4>, bool), ModelError> {
    let (values, shape) = file.f32(name)?;
    let (dims, five_d) = match *shape.as_slice() {
        [b, c, h, w] => ([b, c, h, w], false),
        [b, c, 1, h, w] => ([b, c, h, w], true),
        _ => {
            return Err(ModelError::invalid(format!(
                "`{name}` has shape {shape:?}; expected [batch, channels, height, width] or [batch, channels, 1, \
                 height, width] (one frame)"
            )))
        }
    };
    let data = TensorData::new(values, dims);
    Ok((Tensor::from_data(data, (device, burn::tensor::DType::F32)), five_d))
}

/// `t` as f32 values and its shape, with a frame axis of 1 inserted when `five_d` (diffusers' rank convention).
fn frame_output<B: QwenBackend>(
    name: &'static str,
    t: Tensor<B, 4>,
    five_d: bool,
) -> (&'static str, Vec<f32>, Vec<usize>) {
    let [b, c, h, w] = t.dims();
    let shape = if five_d { vec![b, c, 1, h, w] } else { vec![b, c, h, w] };
    (name, to_f32_vec(t), shape)
}

/// Runs the VAE on the inputs in `inputs`, as the `vae` example does:
///
/// - `image` (`[B, 3, 1, H, W]` or `[B, 3, H, W]`, values in `[-1, 1]`, `H`/`W` multiples of 8) → `latent_mode`, the
///   raw posterior mean (diffusers' `vae.encode(image).latent_dist.mode()`);
/// - `latents` (raw, `[B, z, 1, h, w]` or `[B, z, h, w]`) → `decoded` (diffusers' `vae.decode(latents).sample`,
///   clamped to `[-1, 1]`).
///
/// Each output has the rank of its input. With `tiles`, the tiled modes are used. At least one input must be present.
pub fn vae_file<B: QwenBackend>(
    model: &AutoencoderKLQwenImage<B>,
    inputs: &Path,
    tiles: Option<&TileConfig>,
) -> Result<NamedTensors, ModelError> {
    let file = TensorFile::open(inputs)?;
    if !file.contains("image") && !file.contains("latents") {
        return Err(ModelError::invalid(format!(
            "{} holds neither `image` nor `latents` (it has {:?})",
            inputs.display(),
            file.names()
        )));
    }
    let dev = model.device();
    let mut out = NamedTensors::new();
    if file.contains("image") {
        let (image, five_d) = read_frame::<B>(&file, "image", dev)?;
        let (lo, hi) = to_f32_vec(image.clone())
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        if !(lo >= -1.001 && hi <= 1.001) {
            return Err(ModelError::invalid(format!(
                "`image` values span [{lo}, {hi}]; the VAE expects pixels scaled to [-1, 1] (x / 127.5 − 1)"
            )));
        }
        let mode = match tiles {
            Some(t) => model.encode_mode_tiled(image, t)?,
            None => model.encode_mode(image)?,
        };
        out.push(frame_output("latent_mode", mode, five_d));
    }
    if file.contains("latents") {
        let (latents, five_d) = read_frame::<B>(&file, "latents", dev)?;
        let decoded = match tiles {
            Some(t) => model.decode_tiled(latents, t)?,
            None => model.decode(latents)?,
        };
        out.push(frame_output("decoded", decoded, five_d));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------------------
// Text encoder (the `text_encode` example)

use qwen_image::text_encoder::{GridThw, PositionMode, Qwen25VlTextEncoder, TextEncoderInput, TokenTensor};

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
