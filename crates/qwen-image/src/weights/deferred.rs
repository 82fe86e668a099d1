//! [`DeferredTensor`]: a tensor a loader took from a [`WeightStore`](super::WeightStore) without putting it on a
//! device. It is made on a device only when asked ([`DeferredTensor::to_device`]), every time with the same values a
//! device load would have given, and can be dropped from the device again right after use.
//!
//! Used for weights that are needed rarely and are large, such as the DiT's modulation layers (`img_mod.1`,
//! `txt_mod.1`: a third of its parameters, needed only once per timestep, see
//! [`ModulationTable`](crate::dit::ModulationTable)).

use std::sync::{Arc, OnceLock};

use burn::tensor::{DType, Tensor, TensorData};

use super::{
    generated::{self, Fill},
    mapped::{gather_rows, MappedTensor},
};
use crate::{ops::QwenBackend, ModelError, Result};

/// Where a deferred tensor's values come from.
#[derive(Clone, Debug)]
enum Source {
    /// A tensor of a memory-mapped checkpoint: the file stays mapped, the host never holds a copy.
    Mapped(MappedTensor),
    /// A store without files: the tensor is made again exactly as the store makes it; for row lookups it is made
    /// once and kept on the host (`select_rows`).
    Generated(Fill, HostCopy),
}

/// The host copy of a generated tensor, made at its first row lookup (shared by clones).
#[derive(Clone, Default)]
struct HostCopy(Arc<OnceLock<TensorData>>);

impl std::fmt::Debug for HostCopy {
    // Not the values: a table can hold a gigabyte.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "HostCopy(made)" } else { "HostCopy(not made)" })
    }
}

/// A tensor of a store left off the device: its key, shape and dtype, and the means to make it on a device.
#[derive(Clone, Debug)]
pub struct DeferredTensor {
    key: String,
    shape: Vec<usize>,
    dtype: DType,
    source: Source,
}

impl DeferredTensor {
    /// A tensor of a memory-mapped checkpoint, converted to `dtype` when it is made.
    pub(super) fn mapped(key: &str, shape: &[usize], dtype: DType, tensor: MappedTensor) -> Self {
        DeferredTensor { key: key.to_string(), shape: shape.to_vec(), dtype, source: Source::Mapped(tensor) }
    }

    /// A tensor of a store without files.
    pub(super) fn generated(key: &str, shape: &[usize], dtype: DType, fill: Fill) -> Self {
        let source = Source::Generated(fill, HostCopy::default());
        DeferredTensor { key: key.to_string(), shape: shape.to_vec(), dtype, source }
    }

    /// The checkpoint key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The shape (as the loader asked for it).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The dtype it is made in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes it takes on a device.
    pub fn size_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }

    /// Rows `rows` of a 2-D tensor on `device` (an embedding lookup), with the values of the same rows of
    /// [`to_device`](Self::to_device)'s tensor, gathered on the host and uploaded: from the memory map, or, for a
    /// store without files, from the whole tensor made on `device` at the first lookup and read back once (so
    /// that every later lookup costs what a checkpoint's does).
    pub fn select_rows<B: QwenBackend>(&self, rows: &[usize], device: &B::Device) -> Result<Tensor<B, 2>> {
        let height = match self.shape.as_slice() {
            [height, _] => *height,
            shape => return Err(ModelError::invalid(format!("`{}` has shape {shape:?}, not 2-D", self.key))),
        };
        if let Some(&r) = rows.iter().find(|&&r| r >= height) {
            return Err(ModelError::invalid(format!(
                "row {r} of `{}` is outside its {height} rows",
                self.key
            )));
        }
        let data = match &self.source {
            Source::Mapped(t) => t.rows(rows, self.dtype),
            Source::Generated(_, host) => {
                let table = match host.0.get() {
                    Some(table) => table,
                    None => {
                        let made = self.to_device::<B, 2>(device)?.into_data();
                        host.0.get_or_init(|| made)
                    }
                };
                gather_rows(table.as_bytes(), &table.shape, table.dtype, rows)
            }
        };
        Ok(B::upload(data, device))
    }

    /// The tensor on `device`, with the values a load onto the device would have given: uploaded from the memory
    /// map with [`QwenBackend::upload`], or made again by the store without files (same seed, same values).
    pub fn to_device<B: QwenBackend, const D: usize>(&self, device: &B::Device) -> Result<Tensor<B, D>> {
        let shape: [usize; D] = self.shape.clone().try_into().map_err(|_| {
            ModelError::invalid(format!("`{}` has shape {:?}, not rank {D}", self.key, self.shape))
        })?;
        Ok(match &self.source {
            Source::Mapped(t) => B::upload(t.data(self.dtype), device),
            Source::Generated(fill, _) => generated::make(*fill, &self.key, shape, self.dtype, device),
        })
    }
}
