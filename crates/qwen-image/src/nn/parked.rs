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
