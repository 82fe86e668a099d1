//! FP8 at load time: which linear layers a [`WeightStore`]'s loader quantizes, and reading layers a checkpoint
//! stores already quantized.
//!
//! **Pre-quantized ("scaled fp8") checkpoints.** The community layout (ComfyUI's `scaled_fp8` files and its newer
//! mixed-precision files, and the ModelOpt/compressed-tensors exports that diffusers and vLLM read) stores a quantized
//! layer as `{layer}.weight` in `F8_E4M3` plus its scale as `{layer}.scale_weight` (ComfyUI's legacy name) or
//! `{layer}.weight_scale`: one f32 for the tensor (`[]`, `[1]`) or one per output channel (`[out]`, `[out, 1]`);
//! without either the scale is 1 (a plain cast). `W = e4m3(weight) · scale`. The static activation scales some files
//! carry (`input_scale`, `scale_input`) are not used, since activations get dynamic per-token scales here, and
//! ComfyUI's per-layer `comfy_quant` config and file-wide `scaled_fp8` marker are read past.

use burn::tensor::{DType, Int, Tensor};

use super::{Source, WeightStore};
use crate::{
    ops::QwenBackend,
    quant::{Fp8Options, Fp8Weight},
    ModelError, Result,
};

/// Names of a layer's weight scale, in the order they are looked for.
const SCALE_NAMES: [&str; 2] = ["weight_scale", "scale_weight"];
/// Per-layer keys of pre-quantized checkpoints that are read past.
const UNUSED_LAYER_KEYS: [&str; 3] = ["input_scale", "scale_input", "comfy_quant"];
/// File-wide marker of ComfyUI's scaled fp8 checkpoints.
const SCALED_FP8_MARKER: &str = "scaled_fp8";

impl WeightStore {
    /// Makes [`Linear::load`](crate::nn::Linear::load) quantize the linear layers it reads from this store to FP8
    /// (all but those `options` keep), or stop doing so (`None`). Layer names are the keys without `.weight`.
    pub fn quantize_linears(&mut self, options: Option<Fp8Options>) {
        self.fp8 = options;
    }

    /// The FP8 options in force ([`WeightStore::quantize_linears`]).
    pub fn fp8_options(&self) -> Option<&Fp8Options> {
        self.fp8.as_ref()
    }

    /// Whether the linear layer `layer` is to be quantized: `None` without FP8 options, else whether they do not
    /// keep it.
    pub fn quantizes(&self, layer: &str) -> Option<bool> {
        self.fp8.as_ref().map(|o| !o.keeps(layer))
    }

    /// The weight of the linear layer `layer` (`[out, in]` = `shape`) when the checkpoint stores it already quantized
    /// to e4m3 (see the module docs), on `device`; `None` when it does not (then the weight is read as usual).
    pub fn prequantized<B: QwenBackend>(
        &mut self,
        layer: &str,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Result<Option<Fp8Weight<B>>> {
        let key = format!("{layer}.weight");
        let Source::Files(files) = &self.source else {
            return Ok(None);
        };
        let Some(bits) = files.fp8_data(&key, &shape)? else {
            return Ok(None);
        };
        self.used.insert(key);
        let scales = self.prequantized_scales(layer, shape[0])?;
        for name in UNUSED_LAYER_KEYS {
            let key = format!("{layer}.{name}");
            if self.contains(&key) {
                self.mark_used(&key);
            }
        }
        let bits = Tensor::<B, 2, Int>::from_data(bits, (device, DType::U8));
        let scales = Tensor::<B, 1>::from_data(
            burn::tensor::TensorData::new(scales, [shape[0]]),
            (device, DType::F32),
        );
        Fp8Weight::from_parts(bits, scales, self.dtype).map(Some)
    }

    /// Marks the file-wide marker of ComfyUI's scaled fp8 checkpoints (`scaled_fp8`) as read, if the files hold it.
    pub fn read_past_fp8_marker(&mut self) {
        if let Source::Files(files) = &self.source {
            if files.contains(SCALED_FP8_MARKER) {
                self.mark_used(SCALED_FP8_MARKER);
            }
        }
    }

    /// One scale per output channel of the pre-quantized layer `layer` from its scale tensor (see the module docs).
    fn prequantized_scales(&mut self, layer: &str, out: usize) -> Result<Vec<f32>> {
        let Some(key) = SCALE_NAMES.iter().map(|n| format!("{layer}.{n}")).find(|k| self.contains(k)) else {
            return Ok(vec![1.0; out]);
        };
        let (values, shape) = self.host_f32(&key)?;
        match values.len() {
            1 => Ok(vec![values[0]; out]),
            n if n == out && matches!(shape.as_slice(), [_] | [_, 1]) => Ok(values),
            _ => Err(ModelError::invalid(format!(
                "`{key}` has shape {shape:?}: a pre-quantized weight's scale must be one value or one per output \
                 channel ([{out}] or [{out}, 1])"
            ))),
        }
    }
}
