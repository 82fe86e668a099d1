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

    /// Whether the checkpoint stores `key` as e4m3 (`F8_E4M3`).
    pub fn stores_fp8(&self, key: &str) -> bool {
        matches!(&self.source, Source::Files(files) if files.is_fp8(key))
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

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use safetensors::{tensor::TensorView, Dtype};

    use super::*;

    /// A checkpoint with one pre-quantized layer `lin` ([2, 3] e4m3 of 1, 2, …, 6) and the given scale tensors.
    fn checkpoint(name: &str, scales: &[(&str, Vec<f32>, Vec<usize>)]) -> WeightStore {
        let path = std::env::temp_dir().join(format!("qwen-fp8-{}-{name}.safetensors", std::process::id()));
        let bits: Vec<u8> = (1..=6).map(|v| crate::quant::e4m3::encode(v as f32)).collect();
        let scale_bytes: Vec<Vec<u8>> =
            scales.iter().map(|(_, v, _)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let mut views = vec![
            ("lin.weight".to_string(), TensorView::new(Dtype::F8_E4M3, vec![2, 3], &bits).unwrap()),
            (SCALED_FP8_MARKER.to_string(), TensorView::new(Dtype::F8_E4M3, vec![0], &[]).unwrap()),
        ];
        for ((key, _, shape), bytes) in scales.iter().zip(&scale_bytes) {
            views.push((key.to_string(), TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap()));
        }
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let store = WeightStore::open_files(std::slice::from_ref(&path), DType::F32).unwrap();
        let _ = std::fs::remove_file(path);
        store
    }

    fn weight(store: &mut WeightStore) -> Result<Vec<f32>> {
        let w = store.prequantized::<Flex>("lin", [2, 3], &Default::default())?.expect("stored as e4m3");
        Ok(w.dequantize().into_data().iter::<f32>().collect())
    }

    #[test]
    fn scales_are_per_tensor_per_channel_or_one() {
        let mut per_channel = checkpoint("channel", &[("lin.weight_scale", vec![0.5, 2.0], vec![2, 1])]);
        assert_eq!(weight(&mut per_channel).unwrap(), vec![0.5, 1.0, 1.5, 8.0, 10.0, 12.0]);
        per_channel.read_past_fp8_marker();
        per_channel.finish().unwrap();
        let mut per_tensor = checkpoint("tensor", &[("lin.scale_weight", vec![0.25], vec![])]);
        assert_eq!(weight(&mut per_tensor).unwrap(), vec![0.25, 0.5, 0.75, 1.0, 1.25, 1.5]);
        let mut plain_cast = checkpoint("none", &[]);
        assert_eq!(weight(&mut plain_cast).unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // Not stored as e4m3: read as usual.
        assert!(plain_cast.prequantized::<Flex>("other", [2, 3], &Default::default()).unwrap().is_none());
    }

    #[test]
    fn a_prequantized_layer_cannot_stay_on_the_host() {
        let mut store = checkpoint("deferred", &[]);
        let err = crate::nn::DeferredLinear::<Flex>::load(
            &mut store.root().pp("lin"),
            3,
            2,
            false,
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("lin.weight") && err.contains("--modulation resident"), "{err}");
    }

    #[test]
    fn a_scale_of_another_shape_is_an_error_naming_it() {
        let mut store = checkpoint("bad", &[("lin.scale_weight", vec![1.0, 2.0, 3.0], vec![3])]);
        let err = weight(&mut store).unwrap_err().to_string();
        assert!(err.contains("lin.scale_weight") && err.contains("[3]"), "{err}");
    }
}
