//! Small layers shared by the networks: linear (on the device with a dense or [FP8](Fp8Weight) weight,
//! [deferred](DeferredLinear) on the host until needed, or [parked](ParkedLinear) there after loading), RMSNorm,
//! LayerNorm without affine parameters.
//!
//! The structs are plain parameter holders (tensors loaded by [`WeightPath`]); there is no burn `Module`
//! machinery and no lazily initialized parameter that could silently stay random.

mod input;
mod pad;
mod parked;

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
pub use input::{InputNeeds, LinearInput};
pub use parked::ParkedLinear;

use crate::{
    ops::QwenBackend,
    quant::Fp8Weight,
    weights::{DeferredTensor, WeightPath},
    Result,
};

/// The weight of a [`Linear`], `[out_features, in_features]`: dense in the model's dtype, or e4m3 with one scale per
/// output channel.
#[derive(Clone, Debug)]
pub enum LinearWeight<B: Backend> {
    /// In a float dtype (the model's).
    Dense(Tensor<B, 2>),
    /// e4m3 with per-output-channel scales ([`QwenBackend::dense_fp8`] multiplies by it).
    Fp8(Fp8Weight<B>),
}

/// How a linear layer's weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// In this float dtype.
    Dense(DType),
    /// e4m3 with per-output-channel f32 scales.
    Fp8E4M3,
}

impl<B: QwenBackend> LinearWeight<B> {
    /// `[out_features, in_features]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            LinearWeight::Dense(w) => w.dims(),
            LinearWeight::Fp8(w) => w.shape(),
        }
    }

    /// The model's dtype: the dense weight's, or the one an FP8 weight was quantized from.
    pub fn dtype(&self) -> DType {
        match self {
            LinearWeight::Dense(w) => w.dtype(),
            LinearWeight::Fp8(w) => w.dtype,
        }
    }

    /// How it is stored.
    pub fn format(&self) -> WeightFormat {
        match self {
            LinearWeight::Dense(w) => WeightFormat::Dense(w.dtype()),
            LinearWeight::Fp8(_) => WeightFormat::Fp8E4M3,
        }
    }

    /// The dense weight, or the FP8 one dequantized to the model's dtype.
    pub fn to_dense(&self) -> Tensor<B, 2> {
        match self {
            LinearWeight::Dense(w) => w.clone(),
            LinearWeight::Fp8(w) => w.dequantize(),
        }
    }

    /// `x · Wᵀ + bias` through the backend's dense or FP8 GEMM.
    fn forward(&self, x: Tensor<B, 3>, bias: Option<&Tensor<B, 1>>) -> Tensor<B, 3> {
        match self {
            LinearWeight::Dense(w) => B::dense(x, w, bias),
            LinearWeight::Fp8(w) => B::dense_fp8(x, w, bias),
        }
    }

    /// `gelu_tanh(x · Wᵀ + bias)`, fused where the backend can.
    fn forward_gelu_tanh(&self, x: Tensor<B, 3>, bias: Option<&Tensor<B, 1>>) -> Tensor<B, 3> {
        match self {
            LinearWeight::Dense(w) => B::dense_gelu_tanh(x, w, bias),
            LinearWeight::Fp8(w) => B::dense_fp8_gelu_tanh(x, w, bias),
        }
    }

    /// Loads `{path}.weight` `[out, in]`: quantized to FP8 when the store's FP8 options name this layer
    /// ([`WeightStore::quantize_linears`](crate::weights::WeightStore::quantize_linears)) and its shape
    /// [fits the FP8 GEMM](crate::quant::fits_fp8_gemm), kept as the checkpoint
    /// stores it when that is already FP8 ([`WeightStore::prequantized`](crate::weights::WeightStore::prequantized);
    /// dequantized if the options keep the layer dense), else dense in the store's dtype.
    fn load(path: &mut WeightPath<'_>, shape: [usize; 2], device: &B::Device) -> Result<Self> {
        let layer = path.prefix().to_string();
        let fp8 = path.store().quantizes(&layer);
        let dtype = path.store().dtype();
        if let Some(weight) = path.store().prequantized::<B>(&layer, shape, device)? {
            let weight = match fp8 {
                Some(false) => LinearWeight::Dense(weight.dequantize()),
                _ => LinearWeight::Fp8(weight),
            };
            path.store().count_placed(0, weight.planned_bytes(shape, dtype), weight.device_bytes());
            return Ok(weight);
        }
        Ok(match fp8 {
            Some(true) if crate::quant::fits_fp8_gemm(shape) => {
                let weight =
                    LinearWeight::Fp8(Fp8Weight::from_source(path.deferred("weight", &shape)?, device)?);
                let from_host = (shape[0] * shape[1] * dtype.size()) as u64;
                path.store().count_placed(
                    from_host,
                    weight.planned_bytes(shape, dtype),
                    weight.device_bytes(),
                );
                weight
            }
            _ => LinearWeight::Dense(path.tensor("weight", shape, device)?),
        })
    }

    /// Device bytes of the tensors it holds: the dense weight, or the e4m3 bits and the f32 scales.
    pub fn device_bytes(&self) -> usize {
        match self {
            LinearWeight::Dense(w) => w.shape().num_elements() * w.dtype().size(),
            LinearWeight::Fp8(w) => w.bits.shape().num_elements() + 4 * w.scales.shape().num_elements(),
        }
    }

    /// Device bytes a weight of this format takes at `shape` (`[out, in]`) in a model of `dtype`: one byte per
    /// weight plus an f32 scale per output channel for FP8.
    fn planned_bytes(&self, [out, inp]: [usize; 2], dtype: DType) -> u64 {
        match self {
            LinearWeight::Dense(_) => (out * inp * dtype.size()) as u64,
            LinearWeight::Fp8(_) => (out * inp + 4 * out) as u64,
        }
    }
}

impl<B: Backend> From<Tensor<B, 2>> for LinearWeight<B> {
    fn from(weight: Tensor<B, 2>) -> Self {
        LinearWeight::Dense(weight)
    }
}

/// A linear layer in PyTorch layout: weight `[out, in]` ([dense or FP8](LinearWeight)), optional `bias [out]`, and
/// optional runtime low-rank adapters (LoRA) added to its output.
#[derive(Clone, Debug)]
pub struct Linear<B: Backend> {
    /// `[out_features, in_features]`.
    pub weight: LinearWeight<B>,
    /// `[out_features]`.
    pub bias: Option<Tensor<B, 1>>,
    /// Runtime (unmerged) LoRA adapters: `y = W·x + b + Σ scale·up(down(x))`, in the model's dtype (also on an FP8
    /// weight). Empty for a plain layer.
    pub adapters: Vec<LowRankAdapter<B>>,
}

/// A runtime low-rank adapter of a [`Linear`]: adds `scale · up · down · x` to the layer's output.
#[derive(Clone, Debug)]
pub struct LowRankAdapter<B: Backend> {
    /// Identifies the adapter (the LoRA it came from), so that it can be removed again.
    pub id: u64,
    /// `[rank, in_features]` (`lora_down` / `lora_A`).
    pub down: Tensor<B, 2>,
    /// `[out_features, rank]` (`lora_up` / `lora_B`).
    pub up: Tensor<B, 2>,
    /// `alpha / rank` times the user's multiplier.
    pub scale: f32,
}

impl<B: QwenBackend> Linear<B> {
    /// A layer from its weight `[out, in]` (a dense tensor or a [`LinearWeight`]) and optional bias `[out]`, without
    /// adapters.
    pub fn new(weight: impl Into<LinearWeight<B>>, bias: Option<Tensor<B, 1>>) -> Self {
        Linear { weight: weight.into(), bias, adapters: Vec::new() }
    }

    /// Loads `{path}.weight` (and `{path}.bias` when `bias`): dense in the store's dtype; quantized to FP8 when the
    /// store's FP8 options name the layer ([`WeightStore::quantize_linears`](crate::weights::WeightStore::quantize_linears));
    /// FP8 as stored when the checkpoint holds it already quantized
    /// ([`WeightStore::prequantized`](crate::weights::WeightStore::prequantized); dequantized if the options keep it).
    pub fn load(
        path: &mut WeightPath<'_>,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Self> {
        let weight = LinearWeight::load(path, [out_dim, in_dim], device)?;
        let bias = if bias { Some(path.tensor("bias", [out_dim], device)?) } else { None };
        Ok(Linear::new(weight, bias))
    }

    /// `[batch, tokens, in] → [batch, tokens, out]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if self.adapters.is_empty() {
            return self.weight.forward(x, self.bias.as_ref());
        }
        let base = self.weight.forward(x.clone(), self.bias.as_ref());
        self.adapters.iter().fold(base, |y, a| {
            y + B::dense(B::dense(x.clone(), &a.down, None), &a.up, None).mul_scalar(a.scale)
        })
    }

    /// `gelu_tanh(self.forward(x))`, fused where the backend can.
    pub fn forward_gelu_tanh(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if self.adapters.is_empty() {
            self.weight.forward_gelu_tanh(x, self.bias.as_ref())
        } else {
            burn::tensor::activation::gelu_approximate(self.forward(x))
        }
    }

    /// `[batch, in] → [batch, out]`.
    pub fn forward_2d(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [b, _] = x.dims();
        let y = self.forward(x.unsqueeze_dim(0));
        let out = y.dims()[2];
        y.reshape([b, out])
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// A low-rank weight update `scale · up · down` on the host, in f32 (a LoRA merged into a layer).
#[derive(Clone, Debug)]
pub struct LowRankUpdate {
    /// `[rank, in_features]`, f32.
    pub down: TensorData,
    /// `[out_features, rank]`, f32.
    pub up: TensorData,
    /// The factor (`alpha / rank` times the user's multiplier).
    pub scale: f32,
}

/// `weight + update`: the product computed in f32 on the weight's device, the sum stored in the weight's dtype.
pub(crate) fn merge_update<B: QwenBackend>(weight: Tensor<B, 2>, update: &LowRankUpdate) -> Tensor<B, 2> {
    let (device, dtype) = (weight.device(), weight.dtype());
    // Through `QwenBackend::upload`: burn's own upload would keep a pinned host copy.
    let down = B::upload::<2>(update.down.clone(), &device).cast(DType::F32);
    let up = B::upload::<2>(update.up.clone(), &device).cast(DType::F32);
    let delta = up.matmul(down).mul_scalar(update.scale);
    (weight.cast(DType::F32) + delta).cast(dtype)
}

/// What every linear layer offers whatever holds its weight ([`Linear`] on the device, [`DeferredLinear`] on the
/// host): its shape and its LoRA updates. The DiT's
/// [visitor](crate::dit::QwenImageTransformer::visit_linears) hands its layers out as this trait.
pub trait LinearLayer<B: Backend> {
    /// `[out_features, in_features]` of the weight as held (a shape-only build holds `[0, in_features]` on the
    /// device).
    fn shape(&self) -> [usize; 2];

    /// Whether the weight is on the device (`false`: [deferred](DeferredLinear)).
    fn is_resident(&self) -> bool;

    /// How the weight is stored (dense in a dtype, or FP8).
    fn weight_format(&self) -> WeightFormat;

    /// The runtime adapters.
    fn adapters(&self) -> &[LowRankAdapter<B>];

    /// The runtime adapters, to attach or remove some.
    fn adapters_mut(&mut self) -> &mut Vec<LowRankAdapter<B>>;

    /// Merges `update` into the weight: `W ← W + scale · up · down`, the product computed in f32 on the device and
    /// the sum stored in the weight's dtype. A [`DeferredLinear`] keeps the update and applies it, with the same
    /// operations, each time its weight is made on the device. An FP8 weight merges it into its unquantized weight
    /// and quantizes again ([`Fp8Weight::merge_low_rank`]; an error for weights read already quantized).
    fn merge_low_rank(&mut self, update: LowRankUpdate) -> Result<()>;

    /// Whether [`merge_low_rank`](Self::merge_low_rank) can succeed (not for FP8 weights read already quantized).
    fn can_merge(&self) -> bool {
        true
    }
}

impl<B: QwenBackend> LinearLayer<B> for Linear<B> {
    fn shape(&self) -> [usize; 2] {
        self.weight.dims()
    }

    fn is_resident(&self) -> bool {
        true
    }

    fn weight_format(&self) -> WeightFormat {
        self.weight.format()
    }

    fn adapters(&self) -> &[LowRankAdapter<B>] {
        &self.adapters
    }

    fn adapters_mut(&mut self) -> &mut Vec<LowRankAdapter<B>> {
        &mut self.adapters
    }

    fn can_merge(&self) -> bool {
        match &self.weight {
            LinearWeight::Dense(_) => true,
            LinearWeight::Fp8(w) => w.can_requantize(),
        }
    }

    fn merge_low_rank(&mut self, update: LowRankUpdate) -> Result<()> {
        match &mut self.weight {
            LinearWeight::Dense(w) => *w = merge_update(w.clone(), &update),
            LinearWeight::Fp8(w) => w.merge_low_rank(update)?,
        }
        Ok(())
    }
}

/// A linear layer whose weight and bias stay off the device ([`DeferredTensor`]s: memory-mapped from the checkpoint,
/// or made again by a store without files) until [`DeferredLinear::to_device`] makes the [`Linear`] that a device
/// load, the same merged updates and the same adapters would have given. For large layers that are used rarely.
#[derive(Clone, Debug)]
pub struct DeferredLinear<B: Backend> {
    /// `[out_features, in_features]`.
    pub weight: DeferredTensor,
    /// `[out_features]`.
    pub bias: Option<DeferredTensor>,
    /// Runtime adapters (on the device: they are small), used as [`Linear::adapters`].
    pub adapters: Vec<LowRankAdapter<B>>,
    /// Merged updates, applied in order to the weight each time it is made on the device.
    pub merged: Vec<LowRankUpdate>,
    /// The device it is made on.
    pub device: B::Device,
}

impl<B: QwenBackend> DeferredLinear<B> {
    /// Takes `{path}.weight` (and `{path}.bias` when `bias`) without putting them on the device. A weight the
    /// checkpoint stores already quantized to e4m3 is an error (load the layer onto the device instead).
    pub fn load(
        path: &mut WeightPath<'_>,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Self> {
        let key = path.key("weight");
        if path.store().stores_fp8(&key) {
            return Err(crate::ModelError::invalid(format!(
                "`{key}` is stored as e4m3 (a pre-quantized checkpoint), but this layer stays on the host until used, \
                 which needs a float dtype: load it onto the device (for the DiT's modulation layers: \
                 ModulationMode::Resident, `--modulation resident`)"
            )));
        }
        let weight = path.deferred("weight", &[out_dim, in_dim])?;
        let bias = if bias { Some(path.deferred("bias", &[out_dim])?) } else { None };
        Ok(DeferredLinear { weight, bias, adapters: Vec::new(), merged: Vec::new(), device: device.clone() })
    }

    /// The layer on the device: the weight made there with the merged updates applied in order, the bias, and the
    /// adapters. Bit-identical to the [`Linear`] a device load followed by the same merges would hold.
    pub fn to_device(&self) -> Result<Linear<B>> {
        let mut weight = self.weight.to_device::<B, 2>(&self.device)?;
        for update in &self.merged {
            weight = merge_update(weight, update);
        }
        let bias = self.bias.as_ref().map(|b| b.to_device::<B, 1>(&self.device)).transpose()?;
        Ok(Linear { weight: LinearWeight::Dense(weight), bias, adapters: self.adapters.clone() })
    }

    /// Bytes [`to_device`](Self::to_device) puts on the device for the weight and the bias.
    pub fn size_bytes(&self) -> usize {
        self.weight.size_bytes() + self.bias.as_ref().map_or(0, DeferredTensor::size_bytes)
    }
}

impl<B: QwenBackend> LinearLayer<B> for DeferredLinear<B> {
    fn shape(&self) -> [usize; 2] {
        let s = self.weight.shape();
        [s[0], s[1]]
    }

    fn is_resident(&self) -> bool {
        false
    }

    fn weight_format(&self) -> WeightFormat {
        WeightFormat::Dense(self.weight.dtype())
    }

    fn adapters(&self) -> &[LowRankAdapter<B>] {
        &self.adapters
    }

    fn adapters_mut(&mut self) -> &mut Vec<LowRankAdapter<B>> {
        &mut self.adapters
    }

    fn merge_low_rank(&mut self, update: LowRankUpdate) -> Result<()> {
        self.merged.push(update);
        Ok(())
    }
}

/// A linear layer on the device, or deferred on the host until it is needed (chosen at load time).
#[derive(Clone, Debug)]
pub enum PlacedLinear<B: Backend> {
    /// On the device.
    Resident(Linear<B>),
    /// On the host; made on the device for each use.
    Deferred(Box<DeferredLinear<B>>),
}

impl<B: QwenBackend> PlacedLinear<B> {
    /// Loads `{path}.weight` (and `{path}.bias`) onto the device when `resident`, else defers them.
    pub fn load(
        path: &mut WeightPath<'_>,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        resident: bool,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(if resident {
            PlacedLinear::Resident(Linear::load(path, in_dim, out_dim, bias, device)?)
        } else {
            PlacedLinear::Deferred(Box::new(DeferredLinear::load(path, in_dim, out_dim, bias, device)?))
        })
    }

    /// Runs `f` on the layer on the device: the resident layer, or the deferred one made on the device for this
    /// call and dropped when `f` returns.
    pub fn with_device_layer<R>(&self, f: impl FnOnce(&Linear<B>) -> R) -> Result<R> {
        match self {
            PlacedLinear::Resident(layer) => Ok(f(layer)),
            PlacedLinear::Deferred(layer) => Ok(f(&layer.to_device()?)),
        }
    }

    /// The layer, whatever holds it.
    pub fn layer(&self) -> &dyn LinearLayer<B> {
        match self {
            PlacedLinear::Resident(layer) => layer,
            PlacedLinear::Deferred(layer) => layer.as_ref(),
        }
    }

    /// The layer, mutably.
    pub fn layer_mut(&mut self) -> &mut dyn LinearLayer<B> {
        match self {
            PlacedLinear::Resident(layer) => layer,
            PlacedLinear::Deferred(layer) => layer.as_mut(),
        }
    }

    /// Bytes each use of a deferred layer puts on the device for a while (0 for a resident one).
    pub fn deferred_bytes(&self) -> usize {
        match self {
            PlacedLinear::Resident(_) => 0,
            PlacedLinear::Deferred(layer) => layer.size_bytes(),
        }
    }
}

/// RMSNorm with a learned scale, as in diffusers' `RMSNorm` and HF's `Qwen2RMSNorm`: the mean square is taken in
/// f32, the normalized value is cast back to the input dtype and multiplied by the weight.
#[derive(Clone, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[dim]`.
    pub weight: Tensor<B, 1>,
    /// Added to the mean square.
    pub eps: f64,
}

impl<B: QwenBackend> RmsNorm<B> {
    /// Loads `{path}.weight`.
    pub fn load(path: &mut WeightPath<'_>, dim: usize, eps: f64, device: &B::Device) -> Result<Self> {
        Ok(RmsNorm { weight: path.tensor("weight", [dim], device)?, eps })
    }

    /// Normalizes over the last axis.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // As `[1, rows, dim]` for [`QwenBackend::rms_norm`] (a free reshape of a contiguous tensor).
        let shape = x.dims();
        let dim = shape[D - 1];
        let rows = shape.iter().product::<usize>() / dim.max(1);
        B::rms_norm(x.reshape([1, rows, dim]), &self.weight, self.eps).reshape(shape)
    }
}

/// `x · rsqrt(mean(x²) + eps)` over the last axis in f32, cast back, times `weight`.
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let xf = x.cast(DType::F32);
    let inv = (xf.clone().square().mean_dim(D - 1) + eps).sqrt().recip();
    (xf * inv).cast(dtype) * weight.clone().unsqueeze::<D>()
}

/// LayerNorm over the last axis without affine parameters (`elementwise_affine=False`), statistics in f32.
pub fn layer_norm<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let dtype = x.dtype();
    let xf = x.cast(DType::F32);
    let (var, mean) = xf.clone().var_mean_bias(D - 1);
    ((xf - mean) * (var + eps).sqrt().recip()).cast(dtype)
}

/// Zero-pads axis `dim` with `before` and `after` zeros in `x`'s dtype.
///
/// Written with `cat` because burn 0.21's `Tensor::pad` (also used by asymmetric `conv2d` options) builds its
/// zeros in the device's default dtype and fails on bf16 tensors.
pub fn zero_pad<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    dim: usize,
    before: usize,
    after: usize,
) -> Tensor<B, D> {
    if before == 0 && after == 0 {
        return x;
    }
    let (device, dtype) = (x.device(), x.dtype());
    let zeros = |n: usize| {
        let mut shape = x.dims();
        shape[dim] = n;
        Tensor::<B, D>::zeros(shape, (&device, dtype))
    };
    let mut parts = Vec::with_capacity(3);
    if before > 0 {
        parts.push(zeros(before));
    }
    let tail = (after > 0).then(|| zeros(after));
    parts.push(x);
    parts.extend(tail);
    Tensor::cat(parts, dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn adapters_add_a_scaled_low_rank_product() {
        let dev = Default::default();
        let w = Tensor::<Flex, 2>::from_floats([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], &dev);
        let mut lin = Linear::new(w, Some(Tensor::from_floats([0.5, 0.0, -1.0], &dev)));
        let x = Tensor::<Flex, 3>::from_floats([[[1.0, 3.0]]], &dev);
        let plain: Vec<f32> = lin.forward(x.clone()).into_data().to_vec().unwrap();
        assert_eq!(plain, vec![1.5, 6.0, 3.0]);
        lin.adapters.push(LowRankAdapter {
            id: 7,
            down: Tensor::from_floats([[1.0, 1.0]], &dev),
            up: Tensor::from_floats([[1.0], [0.0], [2.0]], &dev),
            scale: 0.5,
        });
        // down·x = 4; up·4 = [4, 0, 8]; × 0.5 = [2, 0, 4].
        let y: Vec<f32> = lin.forward(x.clone()).into_data().to_vec().unwrap();
        assert_eq!(y, vec![3.5, 6.0, 7.0]);
        let g: Vec<f32> = lin.forward_gelu_tanh(x).into_data().to_vec().unwrap();
        assert!(
            (g[0]
                - 3.5
                    * 0.5
                    * (1.0
                        + ((2.0f32 / std::f32::consts::PI).sqrt() * (3.5 + 0.044715 * 3.5f32.powi(3)))
                            .tanh()))
            .abs()
                < 1e-4
        );
    }

    #[test]
    fn layer_norm_normalizes() {
        let dev = Default::default();
        let x = Tensor::<Flex, 2>::from_floats([[1.0, 2.0, 3.0, 6.0]], &dev);
        let y: Vec<f32> = layer_norm(x, 0.0).into_data().to_vec().unwrap();
        let mean: f32 = y.iter().sum::<f32>() / 4.0;
        let var: f32 = y.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "{y:?}");
    }

    #[test]
    fn rms_norm_scales_by_weight() {
        let dev = Default::default();
        let x = Tensor::<Flex, 2>::from_floats([[3.0, 4.0]], &dev);
        let w = Tensor::<Flex, 1>::from_floats([1.0, 2.0], &dev);
        let y: Vec<f32> = rms_norm(x, &w, 0.0).into_data().to_vec().unwrap();
        let rms = (12.5f32).sqrt();
        assert!((y[0] - 3.0 / rms).abs() < 1e-6 && (y[1] - 8.0 / rms).abs() < 1e-6, "{y:?}");
    }
}
