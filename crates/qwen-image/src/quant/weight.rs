//! [`Fp8Weight`]: a linear layer's weight in e4m3 with one f32 scale per output channel, on the device.

use burn::tensor::{backend::Backend, DType, Int, Tensor};

use crate::{
    nn::{merge_update, LowRankUpdate},
    ops::QwenBackend,
    weights::DeferredTensor,
    ModelError, Result,
};

/// A linear weight `W [out, in]` as e4m3 bits and per-output-channel scales: `W[n, k] ≈ e4m3(bits[n, k]) · scales[n]`
/// (see [`e4m3`](super::e4m3) for the rounding). Made by [`QwenBackend::quantize_fp8`]; multiplied by
/// [`QwenBackend::dense_fp8`].
#[derive(Clone, Debug)]
pub struct Fp8Weight<B: Backend> {
    /// e4m3 bit patterns `[out, in]`, row-major, in an integer tensor of dtype `U8` (one byte per weight: the
    /// layout cuBLASLt reads as `CUDA_R_8F_E4M3`).
    pub bits: Tensor<B, 2, Int>,
    /// `[out]`, f32: the scale of each output channel (row of `bits`).
    pub scales: Tensor<B, 1>,
    /// The dtype the weight had before quantization (the model's): what [`Fp8Weight::dequantize`] returns.
    pub dtype: DType,
    /// What the weight was quantized from, to quantize again after a LoRA merge; `None` for weights read already
    /// quantized from a checkpoint.
    source: Option<Box<Fp8Source>>,
}

/// The unquantized weight of an [`Fp8Weight`] (left on the host, e.g. memory-mapped from the checkpoint) and the LoRA
/// updates merged into it since.
#[derive(Clone, Debug)]
struct Fp8Source {
    weight: DeferredTensor,
    merged: Vec<LowRankUpdate>,
}

impl<B: QwenBackend> Fp8Weight<B> {
    /// A weight from its parts (`bits` of dtype `U8`, f32 `scales` with one entry per row of `bits`), which cannot
    /// be quantized again after a LoRA merge.
    pub fn from_parts(bits: Tensor<B, 2, Int>, scales: Tensor<B, 1>, dtype: DType) -> Result<Self> {
        let [out, _] = bits.dims();
        if scales.dims() != [out] || scales.dtype() != DType::F32 || bits.dtype() != DType::U8 {
            return Err(ModelError::invalid(format!(
                "FP8 weight parts: bits {:?} ({:?}) need u8 bits and {out} f32 scales, got {:?} ({:?})",
                bits.dims(),
                bits.dtype(),
                scales.dims(),
                scales.dtype()
            )));
        }
        Ok(Fp8Weight { bits, scales, dtype, source: None })
    }

    /// A weight from parts known to fit together (u8 bits, one f32 scale per row).
    pub(crate) fn from_fitting_parts(bits: Tensor<B, 2, Int>, scales: Tensor<B, 1>, dtype: DType) -> Self {
        Fp8Weight { bits, scales, dtype, source: None }
    }

    /// `weight` quantized with [`QwenBackend::quantize_fp8`] (no source: it cannot be quantized again after a
    /// LoRA merge).
    pub fn quantize(weight: Tensor<B, 2>) -> Self {
        B::quantize_fp8(weight)
    }

    /// The weight `source` (left off the device) made on `device`, quantized there, and dropped: only the e4m3
    /// weight stays. The source is kept (it costs no device memory) so that a merged LoRA is applied to the
    /// unquantized weight and the result quantized again ([`Fp8Weight::merge_low_rank`]).
    pub fn from_source(source: DeferredTensor, device: &B::Device) -> Result<Self> {
        let mut weight = Self::quantize(source.to_device::<B, 2>(device)?);
        weight.source = Some(Box::new(Fp8Source { weight: source, merged: Vec::new() }));
        Ok(weight)
    }

    /// Whether it knows its unquantized weight, so that [`merge_low_rank`](Self::merge_low_rank) can quantize again
    /// (not for weights read already quantized).
    pub fn can_requantize(&self) -> bool {
        self.source.is_some()
    }

    /// `[out_features, in_features]`.
    pub fn shape(&self) -> [usize; 2] {
        self.bits.dims()
    }

    /// Device bytes: one per weight and four per scale.
    pub fn size_bytes(&self) -> usize {
        let [out, inp] = self.shape();
        out * inp + 4 * out
    }

    /// The e4m3 values `[out, in]` in f32 without the scales (exact), decoded on the device with a 256-entry table.
    pub fn values_f32(&self) -> Tensor<B, 2> {
        let [out, inp] = self.shape();
        super::activation::e4m3_values(self.bits.clone().reshape([out * inp])).reshape([out, inp])
    }

    /// `e4m3(bits) · scales` in f32, cast to the weight's original dtype.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        (self.values_f32() * self.scales.clone().unsqueeze_dim(1)).cast(self.dtype)
    }

    /// Merges `update` into the unquantized weight and quantizes the result again: the layer then holds
    /// `quantize(W + Σ updates)`, exactly what quantizing a weight merged in the model's dtype gives (the merge
    /// runs the same operations as [`LinearLayer::merge_low_rank`](crate::nn::LinearLayer::merge_low_rank) on a
    /// dense layer). Errors for a weight read already quantized: attach the LoRA at run time instead.
    pub fn merge_low_rank(&mut self, update: LowRankUpdate) -> Result<()> {
        let device = self.bits.device();
        let Some(source) = self.source.as_mut() else {
            return Err(ModelError::invalid(
                "this layer's FP8 weight was read already quantized from the checkpoint, so a LoRA cannot be merged \
                 into it without quantizing twice; attach the LoRA at run time instead (it runs in the model's dtype)",
            ));
        };
        source.merged.push(update);
        let mut weight = source.weight.to_device::<B, 2>(&device)?;
        for update in &source.merged {
            weight = merge_update(weight, update);
        }
        let source = self.source.take();
        *self = Self::quantize(weight);
        self.source = source;
        Ok(())
    }
}
