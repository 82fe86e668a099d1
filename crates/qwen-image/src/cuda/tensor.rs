//! burn tensors of [`CudaBackend`](super::CudaBackend) as raw device memory: primitives, pointers, strides and
//! output allocation.

use burn::tensor::{Bool, DType, Shape, Tensor, TensorData, TensorPrimitive};
use burn_cubecl::{kernel::into_contiguous, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor};
use cubecl::{cuda::CudaRuntime, Runtime};
use cudarc::driver::sys;

use super::{
    error::{require, FastError},
    gpu::drv,
    registry::with_gpu,
    CudaBackend, CudaDevice,
};

/// A burn CUDA tensor's primitive.
pub(crate) type Prim = CubeTensor<CudaRuntime>;

/// The primitive of a float tensor.
pub(crate) fn prim<const D: usize>(t: Tensor<CudaBackend, D>) -> Prim {
    t.into_primitive().tensor()
}

/// The primitive of a bool tensor.
pub(crate) fn prim_bool<const D: usize>(t: Tensor<CudaBackend, D, Bool>) -> Prim {
    t.into_primitive()
}

/// A float tensor from its primitive.
pub(crate) fn wrap<const D: usize>(t: Prim) -> Tensor<CudaBackend, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The device address of the tensor's first element (the handle's offset included).
///
/// It asks burn's device thread: from any other thread a blocking round trip, so every operation this thread
/// submitted before has been handed to the CUDA driver when it returns (the ordering in [`super::gpu::Gpu::begin`]
/// relies on it). The fast operations run on that thread (`on_device_thread` in `cuda/registry.rs`), where the
/// lookup is a direct call and everything queued before the operation has already run.
pub(crate) fn ptr(t: &Prim) -> Result<u64, FastError> {
    let res = t
        .client
        .get_resource(t.handle.clone())
        .map_err(|e| FastError::cuda(format!("get_resource: {e:?}")))?;
    Ok(res.resource().ptr)
}

/// Element strides of the tensor.
pub(crate) fn strides(t: &Prim) -> Vec<usize> {
    t.meta.strides().iter().copied().collect()
}

/// Dimensions of the tensor.
pub(crate) fn dims(t: &Prim) -> Vec<usize> {
    t.meta.shape().iter().copied().collect()
}

/// Whether the tensor is bf16.
pub(crate) fn is_bf16(t: &Prim) -> bool {
    t.dtype == DType::BF16
}

/// The tensor with its innermost axis contiguous (stride 1), copying only when needed.
pub(crate) fn inner_contiguous(t: Prim) -> Prim {
    let s = strides(&t);
    let d = dims(&t);
    if s.last() == Some(&1) || d.last() == Some(&1) {
        t
    } else {
        into_contiguous(t)
    }
}

/// Whether the tensor is a dense row-major layout (possibly a view at an offset); axes of size 1 are ignored.
pub(crate) fn is_dense(t: &Prim) -> bool {
    let mut expected = 1usize;
    for (&n, &st) in dims(t).iter().zip(&strides(t)).rev() {
        if n != 1 && st != expected {
            return false;
        }
        expected *= n;
    }
    true
}

/// The tensor as a dense row-major buffer, copying only when needed.
pub(crate) fn dense(t: Prim) -> Prim {
    if is_dense(&t) {
        t
    } else {
        let t = into_contiguous(t);
        debug_assert!(is_dense(&t));
        t
    }
}

/// A new dense row-major bf16 (or `dtype`) tensor on the device of `like`.
pub(crate) fn empty_like_device(like: &Prim, shape: Vec<usize>, dtype: DType) -> Prim {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), Shape::from(shape), dtype)
}

/// A new device tensor holding `data`, copied straight from its host buffer (pageable memory, e.g. a memory-mapped
/// checkpoint) on our stream. The driver stages pageable copies through its own small pinned buffers and returns once
/// the source has been read, so `data` may be dropped right after; the copy is ordered before everything submitted
/// later, like any fast-path operation.
pub(crate) fn upload_prim(data: &TensorData, device: &CudaDevice) -> Result<Prim, FastError> {
    upload_bytes_prim(data.as_bytes(), data.shape.to_vec(), data.dtype, device)
}

/// [`upload_prim`] of `bytes`, the dense row-major values of a `dtype` tensor of `shape`.
pub(crate) fn upload_bytes_prim(
    bytes: &[u8],
    shape: Vec<usize>,
    dtype: DType,
    device: &CudaDevice,
) -> Result<Prim, FastError> {
    upload_into_new(bytes, shape, dtype, device, false)
}

/// Largest activation staged through page-locked memory (larger ones are copied from where they are).
const STAGED_MAX_BYTES: usize = 64 << 20;

/// [`upload_bytes_prim`] for an activation made during an edit: staged through a page-locked buffer when
/// [`FastPathConfig::staged_uploads`](super::FastPathConfig::staged_uploads) is on (at most [`STAGED_MAX_BYTES`]),
/// so that the call returns before the device has reached the copy.
pub(crate) fn upload_activation_prim(
    bytes: &[u8],
    shape: Vec<usize>,
    dtype: DType,
    device: &CudaDevice,
) -> Result<Prim, FastError> {
    upload_into_new(bytes, shape, dtype, device, bytes.len() <= STAGED_MAX_BYTES)
}

/// A new device tensor holding `bytes` (see [`upload_bytes_prim`]); `stageable`: through a staging buffer if the
/// configuration asks for staged uploads.
fn upload_into_new(
    bytes: &[u8],
    shape: Vec<usize>,
    dtype: DType,
    device: &CudaDevice,
    stageable: bool,
) -> Result<Prim, FastError> {
    let elems: usize = shape.iter().product();
    require(bytes.len() == elems * dtype.size(), || {
        format!("{} bytes for {shape:?} {dtype:?}", bytes.len())
    })?;
    let client = CudaRuntime::client(device);
    let out = empty_device_contiguous_dtype(client, device.clone(), Shape::from(shape), dtype);
    if bytes.is_empty() {
        return Ok(out);
    }
    let dst = ptr(&out)?;
    with_gpu(device.index, |dev| {
        dev.begin(&out)?;
        let stream = dev.stream();
        if stageable && dev.config().staged_uploads {
            // SAFETY: the context is bound (`with_gpu`); `dst` is the start of `out`, a new dense allocation of
            // exactly `bytes.len()` bytes, and everything submitted later (which may reuse it once `out` is
            // dropped) waits for the copy (`end`).
            unsafe { dev.state().staging.upload(dst, bytes, stream) }?;
        } else {
            // SAFETY: `dst` is the start of `out`, a new dense allocation of exactly `bytes.len()` bytes (checked
            // above) held until this function returns; `bytes` is host memory borrowed for the call, and a copy
            // from pageable memory returns only once the source has been read (staged by the driver). A copy from
            // page-locked memory returns at once: the only page-locked memory that reaches here is `PinnedBytes`
            // (`pinned.rs`), which waits for this stream before it is freed.
            drv("cuMemcpyHtoDAsync", unsafe {
                sys::cuMemcpyHtoDAsync_v2(dst, bytes.as_ptr().cast(), bytes.len(), stream).result()
            })?;
        }
        dev.end()
    })?;
    Ok(out)
}
