//! Page-locked host memory for weights streamed to the GPU for every use ([`QwenBackend::host_memory`]
//! (crate::ops::QwenBackend::host_memory)): the driver copies from it by DMA at the host link's full speed
//! (≈ 50 GB/s on PCIe 5) without staging it through its own small pinned buffers, and the copy returns at once.

use std::ffi::c_void;

use cudarc::driver::sys;

use super::{error::FastError, gpu::drv, registry::with_gpu};

/// A page-locked host allocation holding a copy of some bytes, freed when dropped (after the device's stream has
/// finished every copy that may still read it).
pub(crate) struct PinnedBytes {
    ptr: *mut u8,
    len: usize,
    device: usize,
}

// SAFETY: the allocation is plain host memory owned by this value alone and never written after `copy_of`; reading
// it from several threads is safe, and it is freed once, by `drop`.
unsafe impl Send for PinnedBytes {}
// SAFETY: see `Send`: shared access only reads.
unsafe impl Sync for PinnedBytes {}

impl PinnedBytes {
    /// Page-locked memory (portable to every context) holding a copy of `bytes`, for uploads to device `device`.
    pub(crate) fn copy_of(bytes: &[u8], device: usize) -> Result<Self, FastError> {
        let len = bytes.len().max(1);
        let ptr = with_gpu(device, |_| {
            let mut ptr: *mut c_void = std::ptr::null_mut();
            // SAFETY: the device's context is bound by `with_gpu`; `ptr` receives an allocation of `len` bytes.
            drv("cuMemHostAlloc", unsafe {
                sys::cuMemHostAlloc(&mut ptr, len, sys::CU_MEMHOSTALLOC_PORTABLE).result()
            })?;
            Ok(ptr.cast::<u8>())
        })?;
        // SAFETY: `ptr` is a fresh allocation of at least `bytes.len()` bytes that nothing else references, and
        // `bytes` is a separate host buffer.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len()) };
        Ok(PinnedBytes { ptr, len: bytes.len(), device })
    }
}

impl AsRef<[u8]> for PinnedBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` points to an allocation of at least `len` initialized bytes (filled by `copy_of`), alive
        // until `drop`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for PinnedBytes {
    fn drop(&mut self) {
        let freed = with_gpu(self.device, |gpu| {
            // An upload from this memory returns before the copy has run: wait for our stream (where every upload
            // runs) before freeing it.
            gpu.synchronize()?;
            // SAFETY: `ptr` came from `cuMemHostAlloc` and is freed once, here, after every copy that reads it.
            drv("cuMemFreeHost", unsafe { sys::cuMemFreeHost(self.ptr.cast()).result() })
        });
        if let Err(e) = freed {
            log::warn!("qwen-image: freeing page-locked host memory: {e}");
        }
    }
}
