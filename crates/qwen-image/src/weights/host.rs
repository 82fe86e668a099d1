//! [`HostTensor`]: a weight parked in host memory and uploaded to the device for every use, for layers that are
//! streamed through the device one at a time (the text encoder's decoder layers under low-memory mode,
//! [`TextEncoderLoadOptions::stream_layers`](crate::text_encoder::TextEncoderLoadOptions)).
//!
//! Unlike a [`DeferredTensor`](super::DeferredTensor), which is made again from the checkpoint, a host tensor holds
//! the values the device held (e.g. a weight quantized to FP8 at load time), so the layer made from it is the
//! same bit for bit. Its bytes live in [`HostMemory`]: page-locked where the backend copies faster from it (the CUDA
//! fast path), ordinary memory otherwise ([`QwenBackend::host_memory`]).

use std::sync::Arc;

use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::{ops::QwenBackend, ModelError, Result};

/// Bytes in host memory, shared by clones: an ordinary allocation, or memory a backend provides (page-locked).
#[derive(Clone)]
pub struct HostMemory(Arc<dyn AsRef<[u8]> + Send + Sync>);

impl HostMemory {
    /// A copy of `bytes` in an ordinary allocation.
    pub fn ordinary(bytes: &[u8]) -> Self {
        HostMemory(Arc::new(bytes.to_vec()))
    }

    /// Memory a backend allocated and filled (e.g. page-locked).
    pub fn from_backend(memory: impl AsRef<[u8]> + Send + Sync + 'static) -> Self {
        HostMemory(Arc::new(memory))
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

impl std::fmt::Debug for HostMemory {
    // Not the bytes: a layer holds hundreds of megabytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostMemory({} bytes)", self.bytes().len())
    }
}

/// A dense row-major tensor of `dtype` parked in host memory: made from a device tensor with
/// [`HostTensor::park`] (read back once), put on a device again with [`HostTensor::float`] or [`HostTensor::u8`].
#[derive(Clone, Debug)]
pub struct HostTensor {
    memory: HostMemory,
    shape: Vec<usize>,
    dtype: DType,
}

impl HostTensor {
    /// Reads `tensor` back into host memory ([`QwenBackend::host_memory`] on `tensor`'s device).
    pub fn park<B: QwenBackend, const D: usize>(tensor: Tensor<B, D>) -> Self {
        let device = tensor.device();
        Self::from_data::<B>(tensor.into_data(), &device)
    }

    /// [`park`](Self::park) of an integer tensor (the `U8` bits of an FP8 weight).
    pub fn park_int<B: QwenBackend, const D: usize>(tensor: Tensor<B, D, Int>) -> Self {
        let device = tensor.device();
        Self::from_data::<B>(tensor.into_data(), &device)
    }

    fn from_data<B: QwenBackend>(data: TensorData, device: &B::Device) -> Self {
        HostTensor {
            memory: B::host_memory(data.as_bytes(), device),
            shape: data.shape.to_vec(),
            dtype: data.dtype,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes it takes (on the host, and on the device once uploaded).
    pub fn size_bytes(&self) -> usize {
        self.memory.bytes().len()
    }

    /// The float tensor on `device`, with the values it was parked with ([`QwenBackend::upload_bytes`]).
    pub fn float<B: QwenBackend, const D: usize>(&self, device: &B::Device) -> Result<Tensor<B, D>> {
        let shape = self.shape_of::<D>()?;
        if !self.dtype.is_float() {
            return Err(ModelError::invalid(format!(
                "a parked {:?} tensor is not a float tensor",
                self.dtype
            )));
        }
        Ok(B::upload_bytes(self.memory.bytes(), shape, self.dtype, device))
    }

    /// The `U8` integer tensor on `device` (the bits of an FP8 weight), with the values it was parked with
    /// ([`QwenBackend::upload_u8`]).
    pub fn u8<B: QwenBackend, const D: usize>(&self, device: &B::Device) -> Result<Tensor<B, D, Int>> {
        let shape = self.shape_of::<D>()?;
        if self.dtype != DType::U8 {
            return Err(ModelError::invalid(format!("a parked {:?} tensor is not a U8 tensor", self.dtype)));
        }
        Ok(B::upload_u8(self.memory.bytes(), shape, device))
    }

    fn shape_of<const D: usize>(&self) -> Result<[usize; D]> {
        self.shape.clone().try_into().map_err(|_| {
            ModelError::invalid(format!("a parked tensor of shape {:?} is not of rank {D}", self.shape))
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Int, Tensor, TensorData};

    use super::HostTensor;
    use crate::CpuBackend as B;

    #[test]
    fn parked_tensors_come_back_with_their_values_and_refuse_the_wrong_kind_or_rank() {
        let dev = Default::default();
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let float =
            Tensor::<B, 2>::from_data(TensorData::new(values.clone(), [3, 4]), &dev).cast(DType::BF16);
        let parked = HostTensor::park(float);
        assert_eq!((parked.shape(), parked.dtype(), parked.size_bytes()), (&[3, 4][..], DType::BF16, 24));
        let back: Tensor<B, 2> = parked.float(&dev).unwrap();
        assert_eq!(back.dtype(), DType::BF16);
        assert_eq!(back.cast(DType::F32).into_data().to_vec::<f32>().unwrap(), values);
        let bits: Vec<u8> = (0..6).map(|i| 40 * i as u8 + 3).collect();
        let int = Tensor::<B, 2, Int>::from_data(TensorData::new(bits.clone(), [2, 3]), (&dev, DType::U8));
        let parked_bits = HostTensor::park_int(int);
        let back = parked_bits.u8::<B, 2>(&dev).unwrap();
        assert_eq!((back.dims(), back.dtype()), ([2, 3], DType::U8));
        assert_eq!(back.into_data().to_vec::<u8>().unwrap(), bits);
        let errors = [
            parked.u8::<B, 2>(&dev).unwrap_err().to_string(),
            parked_bits.float::<B, 2>(&dev).unwrap_err().to_string(),
            parked.float::<B, 3>(&dev).unwrap_err().to_string(),
        ];
        assert!(errors[0].contains("not a U8 tensor"), "{}", errors[0]);
        assert!(errors[1].contains("not a float tensor"), "{}", errors[1]);
        assert!(errors[2].contains("not of rank 3"), "{}", errors[2]);
    }
}
