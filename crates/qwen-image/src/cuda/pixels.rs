//! 8-bit images across the bus (`QwenBackend::upload_rgb8` / `read_rgb8`, [`crate::pixels`]): the image crosses as
//! its 8-bit values (a quarter of f32's bytes, half of bf16's) and `rgb8_to_planes` / `planes_to_rgb8` in
//! `kernels/elementwise.cu` convert on the GPU with the host formulas' f32 arithmetic, so the values are the same
//! bits as the portable path's and no host conversion runs.

use std::ffi::c_void;

use burn::tensor::{DType, Int, Tensor};

use super::{
    error::{require, FastError},
    glue::{grid_stride_blocks, MODULE},
    kernels,
    registry::with_gpu,
    tensor::{dense, dims, empty_like_device, is_bf16, ptr, upload_bytes_prim, Prim},
    CudaBackend, CudaDevice,
};

/// `rgb` (`height·width·3` interleaved bytes, checked by the caller) as a bf16 `[1, 3, height, width]` tensor.
pub(crate) fn upload_rgb8_prim(
    rgb: &[u8],
    height: usize,
    width: usize,
    device: &CudaDevice,
) -> Result<Prim, FastError> {
    let plane = height * width;
    require(plane > 0 && rgb.len() == 3 * plane, || format!("{} bytes for {width}×{height}", rgb.len()))?;
    let raw = upload_bytes_prim(rgb, vec![3 * plane], DType::U8, device)?;
    let out = empty_like_device(&raw, vec![1, 3, height, width], DType::BF16);
    queue_pixels("rgb8_to_planes", &raw, &out, plane)?;
    drop(raw);
    Ok(out)
}

/// A bf16 `[1, 3, H, W]` tensor as interleaved 8-bit RGB, read back.
pub(crate) fn read_rgb8_prim(x: Prim) -> Result<Vec<u8>, FastError> {
    let d = dims(&x);
    require(is_bf16(&x) && d.len() == 4 && d[0] == 1 && d[1] == 3 && d[2] * d[3] > 0, || {
        format!("{:?} {d:?}", x.dtype)
    })?;
    let plane = d[2] * d[3];
    let x = dense(x);
    let rgb = empty_like_device(&x, vec![3 * plane], DType::U8);
    queue_pixels("planes_to_rgb8", &x, &rgb, plane)?;
    drop(x);
    let data = Tensor::<CudaBackend, 1, Int>::from_primitive(rgb)
        .try_into_data()
        .map_err(|e| FastError::cuda(format!("read-back: {e:?}")))?;
    require(data.dtype == DType::U8, || format!("read back as {:?}", data.dtype))?;
    data.into_vec::<u8>().map_err(|e| FastError::cuda(format!("read-back: {e:?}")))
}

/// Queues the conversion kernel `name` from `src` into `dst` over `plane` pixels (three values each).
fn queue_pixels(name: &'static str, src: &Prim, dst: &Prim, plane: usize) -> Result<(), FastError> {
    let (mut ps, mut pd, mut n) = (ptr(src)?, ptr(dst)?, plane as i64);
    with_gpu(src.device.index, |dev| {
        let f = dev.function(MODULE, kernels::ELEMENTWISE, name, 0)?;
        dev.begin(src)?;
        let mut args = [
            &mut ps as *mut u64 as *mut c_void,
            &mut pd as *mut u64 as *mut c_void,
            &mut n as *mut i64 as *mut c_void,
        ];
        // SAFETY: the arguments match `rgb8_to_planes(const u8*, bf16*, i64)` and `planes_to_rgb8(const bf16*, u8*,
        // i64)` in type and order; `src` and `dst` are dense buffers of `3·plane` values of the kernel's input and
        // output types (made or checked by the callers), held by them until the launch is queued. One thread per
        // pixel, grid-stride.
        unsafe { dev.launch(f, (grid_stride_blocks(plane), 1, 1), (256, 1, 1), 0, &mut args) }?;
        dev.end()
    })
}
