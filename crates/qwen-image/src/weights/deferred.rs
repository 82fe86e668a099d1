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
                        let made = read_back_in_chunks(self.to_device::<B, 2>(device)?);
                        // The table's device copy (1.09 GB for the full-size text encoder) opened a pool page of
                        // its own (a sixteenth of the card's memory) that nothing else fills: given back now, or a
                        // demo edit's peak would carry it (docs/memory.md).
                        B::release_unused_memory(device);
                        host.0.get_or_init(|| made)
                    }
                };
                gather_rows(table.as_bytes(), &table.shape, table.dtype, rows)
            }
        };
        Ok(B::upload_activation(data, device))
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

/// Rows read back per transfer by [`read_back_in_chunks`]: 64 MiB of a full-size token table (bf16, 3584 wide).
const READ_BACK_ROWS: usize = 8192;

/// The host copy of a 2-D device tensor, read back [`READ_BACK_ROWS`] rows at a time: a whole read-back would stage
/// it through one pinned host buffer as large as the tensor, which burn's pool then keeps for the process.
fn read_back_in_chunks<B: QwenBackend>(t: Tensor<B, 2>) -> TensorData {
    let [rows, cols] = t.dims();
    let dtype = t.dtype();
    let mut bytes = Vec::with_capacity(rows * cols * dtype.size());
    for start in (0..rows).step_by(READ_BACK_ROWS) {
        let chunk = t.clone().narrow(0, start, READ_BACK_ROWS.min(rows - start)).into_data();
        bytes.extend_from_slice(chunk.as_bytes());
    }
    TensorData::from_bytes_vec(bytes, [rows, cols], dtype)
}

#[cfg(test)]
mod tests {
    use burn::tensor::DType;

    use super::READ_BACK_ROWS;
    use crate::{tensor_io::to_f32_vec, weights::WeightStore, CpuBackend as B};

    #[test]
    fn generated_rows_equal_the_tensor_made_on_the_device() {
        // More rows than one read-back chunk, so the host copy is stitched from two.
        let (rows, cols) = (READ_BACK_ROWS + 3, 4);
        let mut store = WeightStore::random(DType::F32, 7);
        let table = store.deferred("embed_tokens.weight", &[rows, cols]).expect("deferred");
        let device = Default::default();
        let whole = to_f32_vec(table.to_device::<B, 2>(&device).expect("whole"));
        let picks = [0, 5, READ_BACK_ROWS - 1, READ_BACK_ROWS, rows - 1, 5];
        let got = to_f32_vec(table.select_rows::<B>(&picks, &device).expect("rows"));
        let want: Vec<f32> = picks.iter().flat_map(|&r| whole[r * cols..(r + 1) * cols].to_vec()).collect();
        assert_eq!(got, want);
        assert!(want.iter().any(|&v| v != 0.0));
        // A row past the table is an error, not a panic.
        assert!(table.select_rows::<B>(&[rows], &device).is_err());
    }
}
