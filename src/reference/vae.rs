//! The VAE on dumped images and latents (the `vae` example, VAE parity tests).

use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use qwen_image::{
    ops::QwenBackend,
    tensor_io::{to_f32_vec, TensorFile},
    vae::{AutoencoderKLQwenImage, TileConfig},
    ModelError,
};

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
