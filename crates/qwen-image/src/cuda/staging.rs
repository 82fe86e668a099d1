//! Page-locked staging buffers for uploads of activations made during an edit (the vision tower's patches, the
//! prompt's token embeddings under FP8): [`FastPathConfig::staged_uploads`](super::FastPathConfig::staged_uploads).
//!
//! A copy from pageable host memory makes the driver wait until the stream reaches the copy (it stages the bytes
//! through its own small pinned buffers as the DMA runs), and our stream first waits for everything queued before
//! it, so the host stops queueing until the device has caught up. From page-locked memory the copy returns at once.
//! Each buffer is reused once the copy that last read it has run (its event); there are at most [`MAX_BUFFERS`],
//! kept for the process (≈ 40 MB at 1024²: two of 16 MiB, the others 1 MiB).

use std::ffi::c_void;

use cudarc::driver::sys;

use super::{error::FastError, gpu::drv};

/// Buffers kept at most; with all of them in flight the smallest one's copy is waited for. A prompt stage makes up
/// to six such uploads (the patches and the vision tower's two rotary tables, the language model's two and, under
/// FP8, the token rows), each queued behind work the device has not reached yet, so fewer buffers would make the
/// host wait in the middle of queueing, which is what staging avoids.
const MAX_BUFFERS: usize = 8;
/// The smallest buffer made (smaller uploads share it).
const MIN_CAPACITY: usize = 1 << 20;

/// One page-locked buffer and the event recorded after the last copy that read it.
struct Buffer {
    ptr: *mut u8,
    capacity: usize,
    done: sys::CUevent,
}

/// A device's staging buffers (in its `GpuState`, used under the registry's lock with the context bound).
#[derive(Default)]
pub(crate) struct StagingBuffers {
    buffers: Vec<Buffer>,
}

impl StagingBuffers {
    /// Copies `bytes` to device address `dst` on `stream` through a staging buffer: returns once the bytes are in
    /// page-locked memory, before the copy to the device has run.
    ///
    /// # Safety
    ///
    /// The device's context is bound to this thread; `dst` is device memory of at least `bytes.len()` bytes that
    /// stays allocated until the copy has run on `stream` (the caller orders later work after it).
    pub(crate) unsafe fn upload(
        &mut self,
        dst: u64,
        bytes: &[u8],
        stream: sys::CUstream,
    ) -> Result<(), FastError> {
        let i = self.free_buffer(bytes.len())?;
        let b = &self.buffers[i];
        // SAFETY: `b.ptr` is a live page-locked allocation of `b.capacity ≥ bytes.len()` bytes whose last copy has
        // run (`free_buffer`), so nothing reads it; `bytes` is a separate host buffer.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), b.ptr, bytes.len()) };
        // SAFETY: the context is bound (caller); `dst` holds `bytes.len()` bytes (caller); the source stays
        // allocated and unwritten until `b.done`, recorded right after on the same stream, has completed.
        drv("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, b.ptr.cast::<c_void>(), bytes.len(), stream).result()
        })?;
        // SAFETY: `done` and `stream` are live handles of the bound context.
        drv("cuEventRecord", unsafe { sys::cuEventRecord(b.done, stream).result() })
    }

    /// The index of a buffer of at least `len` bytes that no copy reads any more: the smallest free one that fits
    /// (so that a small upload does not take the buffer a large one needs next), a new one while fewer than
    /// [`MAX_BUFFERS`] exist, a free one too small (made larger), else the smallest, waited for (and made larger if
    /// needed). Making a buffer costs a page-locked allocation (and freeing one may wait for the device), so after
    /// the first edit of a size the same buffers serve every edit.
    fn free_buffer(&mut self, len: usize) -> Result<usize, FastError> {
        let (mut fits, mut free_but_small) = (None::<usize>, None);
        for (i, b) in self.buffers.iter().enumerate() {
            // SAFETY: `done` is a live event of the bound context (never recorded yet counts as completed).
            let state = unsafe { sys::cuEventQuery(b.done) };
            match state {
                sys::CUresult::CUDA_SUCCESS if b.capacity >= len => {
                    if fits.is_none_or(|f| self.buffers[f].capacity > b.capacity) {
                        fits = Some(i);
                    }
                }
                sys::CUresult::CUDA_SUCCESS => free_but_small = Some(i),
                sys::CUresult::CUDA_ERROR_NOT_READY => {}
                err => drv("cuEventQuery", err.result())?,
            }
        }
        if let Some(i) = fits {
            return Ok(i);
        }
        let capacity = len.max(MIN_CAPACITY).next_power_of_two();
        if self.buffers.len() < MAX_BUFFERS {
            self.buffers.push(Buffer::new(capacity)?);
            return Ok(self.buffers.len() - 1);
        }
        let i = match free_but_small {
            Some(i) => i,
            None => {
                let i = (0..self.buffers.len()).min_by_key(|&i| self.buffers[i].capacity).unwrap_or(0);
                // SAFETY: a live event of the bound context.
                drv("cuEventSynchronize", unsafe { sys::cuEventSynchronize(self.buffers[i].done).result() })?;
                i
            }
        };
        if self.buffers[i].capacity < len {
            let old = std::mem::replace(&mut self.buffers[i], Buffer::new(capacity)?);
            old.free()?;
        }
        Ok(i)
    }
}

impl Buffer {
    /// A page-locked allocation of `capacity` bytes and its event (context bound).
    fn new(capacity: usize) -> Result<Self, FastError> {
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: the context is bound (the caller's `with_gpu`); `ptr` receives an allocation of `capacity` bytes.
        drv("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(&mut ptr, capacity, sys::CU_MEMHOSTALLOC_PORTABLE).result()
        })?;
        let mut done: sys::CUevent = std::ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: as above; `done` receives a new event.
        if let Err(e) = drv("cuEventCreate", unsafe { sys::cuEventCreate(&mut done, flags).result() }) {
            // SAFETY: `ptr` was just allocated by `cuMemHostAlloc` and nothing else references it.
            let _ = unsafe { sys::cuMemFreeHost(ptr) };
            return Err(e);
        }
        Ok(Buffer { ptr: ptr.cast::<u8>(), capacity, done })
    }

    /// Frees the buffer and its event; its last copy has completed (the caller waited for `done`).
    fn free(self) -> Result<(), FastError> {
        // SAFETY: `ptr` came from `cuMemHostAlloc`, no copy reads it any more, and it is freed once, here.
        drv("cuMemFreeHost", unsafe { sys::cuMemFreeHost(self.ptr.cast::<c_void>()).result() })?;
        // SAFETY: `done` is a live event, destroyed once, here.
        drv("cuEventDestroy", unsafe { sys::cuEventDestroy_v2(self.done).result() })
    }
}
