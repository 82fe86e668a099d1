//! The DiT: its inputs read from a dump (`dit_forward` example, DiT parity tests), and a denoising loop run on
//! dumped inputs (`denoise` example).

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
