//! [`ParkedLinear`]: a [`Linear`] whose weight and bias were moved to host memory after loading, to be put on the
//! device again for each use (layers streamed through the device one at a time: the text encoder's decoder layers
//! under low-memory mode). Unlike a [`DeferredLinear`](super::DeferredLinear), it keeps what the device held (an
//! FP8 weight stays quantized), so the layer made again is the same bit for bit.

use burn::tensor::DType;

use super::{Linear, LinearWeight};
use crate::{ops::QwenBackend, quant::Fp8Weight, weights::HostTensor, ModelError, Result};

/// A parked weight: dense, or FP8 bits and scales.
#[derive(Clone, Debug)]
enum ParkedWeight {
    Dense(HostTensor),
    Fp8 { bits: HostTensor, scales: HostTensor, dtype: DType },
}

/// A [`Linear`] in host memory ([`ParkedLinear::park`]); [`ParkedLinear::to_device`] makes it on the device again.
#[derive(Clone, Debug)]
pub struct ParkedLinear {
    weight: ParkedWeight,
    bias: Option<HostTensor>,
}

impl ParkedLinear {
    /// Moves `layer`'s weight and bias to host memory (read back from the device once). Errors for a layer with
    /// runtime adapters (LoRA): those are not parked. An FP8 weight made again cannot be quantized again after a
    /// LoRA merge ([`Fp8Weight::from_parts`]).
    pub fn park<B: QwenBackend>(layer: Linear<B>) -> Result<Self> {
        if !layer.adapters.is_empty() {
            return Err(ModelError::invalid(
                "a linear layer with runtime adapters (LoRA) cannot be parked on the host",
            ));
        }
        let weight = match layer.weight {
            LinearWeight::Dense(w) => ParkedWeight::Dense(HostTensor::park(w)),
            LinearWeight::Fp8(w) => ParkedWeight::Fp8 {
                bits: HostTensor::park_int(w.bits),
                scales: HostTensor::park(w.scales),
                dtype: w.dtype,
            },
        };
        Ok(ParkedLinear { weight, bias: layer.bias.map(HostTensor::park) })
    }

    /// The layer on `device`, with the weight and bias it was parked with.
    pub fn to_device<B: QwenBackend>(&self, device: &B::Device) -> Result<Linear<B>> {
        let weight = match &self.weight {
            ParkedWeight::Dense(w) => LinearWeight::Dense(w.float(device)?),
            ParkedWeight::Fp8 { bits, scales, dtype } => {
                LinearWeight::Fp8(Fp8Weight::from_parts(bits.u8(device)?, scales.float(device)?, *dtype)?)
            }
        };
        let bias = self.bias.as_ref().map(|b| b.float(device)).transpose()?;
        Ok(Linear::new(weight, bias))
    }

    /// Bytes [`to_device`](Self::to_device) puts on the device (and the host holds).
    pub fn size_bytes(&self) -> usize {
        let weight = match &self.weight {
            ParkedWeight::Dense(w) => w.size_bytes(),
            ParkedWeight::Fp8 { bits, scales, .. } => bits.size_bytes() + scales.size_bytes(),
        };
        weight + self.bias.as_ref().map_or(0, HostTensor::size_bytes)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Tensor, TensorData};

    use super::ParkedLinear;
    use crate::{
        nn::{Linear, LinearWeight, LowRankAdapter},
        quant::Fp8Weight,
        tensor_io::to_f32_vec,
        CpuBackend as B,
    };

    fn tensor<const D: usize>(n: usize, shape: [usize; D]) -> Tensor<B, D> {
        let v: Vec<f32> = (0..n).map(|i| ((i * 7) % 11) as f32 * 0.25 - 1.0).collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    #[test]
    fn parked_layers_compute_what_they_computed_and_adapters_are_refused() {
        let dev = Default::default();
        let x = tensor(2 * 3 * 8, [2, 3, 8]);
        let dense = Linear::new(tensor(40, [5, 8]), Some(tensor(5, [5])));
        let fp8 = Linear::new(LinearWeight::Fp8(Fp8Weight::quantize(tensor(40, [5, 8]))), None);
        for layer in [dense, fp8] {
            let want = to_f32_vec(layer.forward(x.clone()));
            let parked = ParkedLinear::park(layer).unwrap();
            assert!(parked.size_bytes() > 0);
            assert_eq!(to_f32_vec(parked.to_device::<B>(&dev).unwrap().forward(x.clone())), want);
        }
        let mut adapted = Linear::new(tensor(40, [5, 8]), None);
        adapted.adapters.push(LowRankAdapter {
            id: 1,
            down: tensor(16, [2, 8]),
            up: tensor(10, [5, 2]),
            scale: 0.5,
        });
        let err = ParkedLinear::park(adapted).unwrap_err().to_string();
        assert!(err.contains("runtime adapters"), "{err}");
    }
}
