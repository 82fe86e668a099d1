//! `conv2d_nchw` (the VAE's 3×3, 1×1 and stride-2 convolutions) through cuDNN on burn's device memory.
//!
//! NCHW bf16 in and out, f32 accumulation (`CUDNN_DATA_FLOAT` compute, tensor-op math): what PyTorch's
//! `F.conv2d` runs on bf16 CUDA tensors. The bias is added afterwards (by the caller, in bf16), as PyTorch adds it
//! after cuDNN's convolution, so both round the convolution to bf16 before adding the bias
//! (<https://github.com/pytorch/pytorch/blob/v2.5.0/aten/src/ATen/native/Convolution.cpp#L1517-L1525>).
//!
//! **Algorithm.** Per shape, the descriptors and the algorithm are prepared once. With
//! [`GemmAutotune::On`] / [`GemmAutotune::Verbose`] (the default) the first call of a shape times cuDNN's
//! candidates on the call's own buffers (`cudnnFindConvolutionForwardAlgorithmEx`, PyTorch's
//! `torch.backends.cudnn.benchmark = True`); with [`GemmAutotune::Off`] it takes the heuristic's first algorithm
//! that fits the workspace (`cudnnGetConvolutionForwardAlgorithm_v7`, PyTorch's default).
//!
//! **Workspace.** The chosen algorithm's bytes, or for the first call of a shape the most any candidate needs; never
//! more than [`WORKSPACE_MAX`] (algorithms that need more are not considered). Where it lives follows burn's
//! allocation mode, by measurement (H100, session 29, docs/memory.md):
//! - pooled (the default): taken from burn's pool for each call and handed back after it, as PyTorch takes it from
//!   its caching allocator. Between the VAE's convolutions its pages hold the DiT's activations. A buffer of its own
//!   (1.07 GB, a first call's size, kept for the process) raised the pooled FP8 edit's driver peak by 0.97 GiB
//!   (34 403 against 33 411 MiB);
//! - exact allocation (`--exact-allocation`, `--low-memory`; [`super::registry::allocate_exactly`]): a buffer of the
//!   cuDNN state's own on our stream, grown to the largest need and freed by [`Dnn::release_workspace`] (from
//!   `release_unused_memory`, after each such stage). Exact allocations from the pool keep each differently sized
//!   request until the stage ends: the `--low-memory` edit peaked at 22 321 MiB that way against 18 609 MiB with the
//!   buffer.
//!
//! On NCHW bf16 tensors cuDNN's
//! tensor-core algorithms convert the input and output to NHWC in their workspace: at the VAE's 1024² stage the
//! input and output alone are 0.2–0.4 GB each (96 and 192 channels), and under the former 256 MiB cap the
//! heuristic fell back to a CUDA-core kernel 20× slower (`implicit_convolve_sgemm`, 7.6 ms per 96→96 convolution on
//! an H200).
//!
//! **Run time.** cuDNN 9 (`libcudnn.so.9` and its sub-libraries, e.g. from the `nvidia-cudnn-cu12` wheel PyTorch
//! installs, or the `libcudnn9-cuda-12`/`-13` package) must be on the loader path. Without it the first call fails
//! with a clear error, the `conv` kind is switched off (logged, and shown by the fast-path report) and the
//! convolutions take the im2col + cuBLASLt path ([`crate::ops::lowered::conv2d`]).

use std::{
    collections::{hash_map::Entry, HashMap},
    ffi::c_void,
    mem::MaybeUninit,
};

use burn::tensor::DType;
use cudarc::cudnn::{result as dnn, sys as dnn_sys};

use super::{
    config::GemmAutotune,
    error::{require, FastError},
    glue,
    gpu::Gpu,
    registry::with_gpu,
    tensor::{dense, dims, empty_like_device, is_bf16, ptr, Prim},
};

/// The largest workspace a convolution algorithm may use.
pub(crate) const WORKSPACE_MAX: usize = 1 << 30;

/// Algorithms asked of cuDNN per shape (heuristic or timed).
const CANDIDATES: usize = 8;

/// The oldest cuDNN whose API matches cudarc's bindings (9.0.0).
const MIN_VERSION: usize = 9_00_00;

/// One convolution shape: input `[n, c, h, w]`, `o` filters of `k × k`, stride and zero padding on every side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConvKey {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl ConvKey {
    /// Output height and width.
    fn out_hw(&self) -> (usize, usize) {
        let out = |len: usize| (len + 2 * self.pad - self.k) / self.stride + 1;
        (out(self.h), out(self.w))
    }
}

/// The descriptors of one shape and its algorithm (chosen at the first call).
struct ConvPlan {
    x: dnn_sys::cudnnTensorDescriptor_t,
    w: dnn_sys::cudnnFilterDescriptor_t,
    conv: dnn_sys::cudnnConvolutionDescriptor_t,
    y: dnn_sys::cudnnTensorDescriptor_t,
    /// The algorithm and its workspace bytes; `None` until the first call chooses it.
    algo: Option<(dnn_sys::cudnnConvolutionFwdAlgo_t, usize)>,
}

/// Device addresses of one call.
#[derive(Clone, Copy)]
struct Buffers {
    x: u64,
    w: u64,
    y: u64,
}

/// A device's cuDNN state: the handle (bound to our stream) and the prepared shapes. Like the cuBLASLt state it
/// lives as long as the device state, i.e. until the process exits (descriptors are never destroyed: one set per
/// shape).
pub(crate) struct Dnn {
    handle: dnn_sys::cudnnHandle_t,
    plans: HashMap<ConvKey, ConvPlan>,
    /// The workspace buffer (stream-ordered on our stream), 0 bytes until a call needs one.
    workspace: Workspace,
}

/// A workspace for one call: device address and bytes (0 and 0 for none, the default).
#[derive(Clone, Copy, Default)]
struct Workspace {
    ptr: u64,
    bytes: usize,
}

fn dnn_err(what: &str, e: dnn::CudnnError) -> FastError {
    FastError::cuda(format!("cuDNN {what}: {e:?}"))
}

impl Dnn {
    fn new(stream: cudarc::driver::sys::CUstream) -> Result<Self, FastError> {
        // SAFETY: only checks whether libcudnn could be loaded.
        if !unsafe { dnn_sys::is_culib_present() } {
            return Err(FastError::cuda(
                "libcudnn (cuDNN 9) not found: put its lib directory on LD_LIBRARY_PATH (e.g. the nvidia/cudnn/lib \
                 folder of PyTorch's site-packages); the convolutions use the im2col GEMM path instead",
            ));
        }
        let version = dnn::get_version();
        if version < MIN_VERSION {
            return Err(FastError::cuda(format!("cuDNN {version} is older than 9.0")));
        }
        let handle = dnn::create_handle().map_err(|e| dnn_err("create handle", e))?;
        // SAFETY: `handle` was just created; `stream` is the device state's stream, which outlives the handle (both
        // live until the process exits). The two stream types are the same driver object (`CUstream_st`).
        unsafe { dnn::set_stream(handle, stream.cast()) }.map_err(|e| dnn_err("set stream", e))?;
        Ok(Dnn { handle, plans: HashMap::new(), workspace: Workspace::default() })
    }

    /// The descriptors of `key`, made on first use.
    fn plan_for(&mut self, key: ConvKey) -> Result<&mut ConvPlan, FastError> {
        Ok(match self.plans.entry(key) {
            Entry::Occupied(plan) => plan.into_mut(),
            Entry::Vacant(slot) => slot.insert(make_plan(key)?),
        })
    }

    /// The workspace bytes the next call of `key` needs: its algorithm's once chosen; before the first call the
    /// most any of the heuristic's candidates needs when `mode` times them, else the heuristic's first choice's.
    fn workspace_for(&mut self, key: ConvKey, mode: GemmAutotune) -> Result<usize, FastError> {
        let handle = self.handle;
        let plan = self.plan_for(key)?;
        if let Some((_, bytes)) = plan.algo {
            return Ok(bytes);
        }
        let heuristic = heuristic_candidates(handle, plan)?;
        Ok(match mode {
            GemmAutotune::Off => heuristic.first().map_or(0, |c| c.1),
            _ => heuristic.iter().map(|c| c.1).max().unwrap_or(0),
        })
    }

    /// A workspace of at least `bytes` on `stream` (our stream, the one every call runs on): the buffer as it is
    /// when large enough, else a larger one in its place (the old one freed in stream order, after the calls
    /// already queued that use it).
    fn workspace(
        &mut self,
        bytes: usize,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<Workspace, FastError> {
        if bytes <= self.workspace.bytes {
            return Ok(self.workspace);
        }
        self.release_workspace(stream)?;
        // SAFETY: a plain stream-ordered allocation on our stream of the current context; only cuDNN calls queued
        // on that stream use it, and it is freed in that stream's order ([`Dnn::release_workspace`]).
        let ptr = unsafe { cudarc::driver::result::malloc_async(stream, bytes) }
            .map_err(|e| FastError::cuda(format!("cuDNN workspace of {bytes} bytes: {e:?}")))?;
        self.workspace = Workspace { ptr, bytes };
        Ok(self.workspace)
    }

    /// Frees the workspace buffer in `stream`'s order (after the calls queued that use it); the next call that
    /// needs one allocates it again.
    pub(crate) fn release_workspace(
        &mut self,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<(), FastError> {
        if self.workspace.bytes == 0 {
            return Ok(());
        }
        let ptr = std::mem::take(&mut self.workspace).ptr;
        // SAFETY: `ptr` came from `malloc_async` on this stream and is freed once (the record is cleared first);
        // every call that reads it was queued on this stream before the free.
        unsafe { cudarc::driver::result::free_async(ptr, stream) }
            .map_err(|e| FastError::cuda(format!("freeing the cuDNN workspace: {e:?}")))
    }

    /// Chooses the algorithm of `key` (timing the candidates on `buf` when `mode` autotunes).
    fn choose(
        &mut self,
        key: ConvKey,
        buf: Buffers,
        ws: Workspace,
        mode: GemmAutotune,
    ) -> Result<(dnn_sys::cudnnConvolutionFwdAlgo_t, usize), FastError> {
        let handle = self.handle;
        let heuristic = {
            let plan = self.plan_for(key)?;
            heuristic_candidates(handle, plan)?
        };
        let first = *heuristic.first().ok_or_else(|| {
            FastError::cuda(format!(
                "cuDNN has no algorithm within {WORKSPACE_MAX} bytes of workspace for {key:?}"
            ))
        })?;
        if mode == GemmAutotune::Off {
            return Ok(first);
        }
        // `ws` holds what the heuristic's candidates need ([`Dnn::workspace_for`]), so the timing sees them all.
        let (ws_ptr, ws_bytes) = (ws.ptr, ws.bytes);
        let plan = self.plan_for(key)?;
        let mut perf = [blank_perf(); CANDIDATES];
        let mut found = 0;
        // SAFETY: the descriptors are live and describe the buffers: `buf.x`/`buf.w` hold the input and the filters,
        // `buf.y` the output (overwritten by each timed run; the real run follows), `ws_ptr` `ws_bytes` of workspace;
        // `perf` has room for `CANDIDATES` results. The call blocks until the timings are done.
        unsafe {
            dnn_sys::cudnnFindConvolutionForwardAlgorithmEx(
                handle,
                plan.x,
                buf.x as *const c_void,
                plan.w,
                buf.w as *const c_void,
                plan.conv,
                plan.y,
                buf.y as *mut c_void,
                CANDIDATES as i32,
                &mut found,
                perf.as_mut_ptr(),
                ws_ptr as *mut c_void,
                ws_bytes,
            )
            .result()
            .map_err(|e| dnn_err("find algorithm", e))?;
        }
        let timed: Vec<_> = perf[..found.clamp(0, CANDIDATES as i32) as usize]
            .iter()
            .filter(|p| p.status == dnn_sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= ws_bytes)
            .collect();
        if mode == GemmAutotune::Verbose {
            let runs: Vec<String> = timed.iter().map(|p| format!("{:?} {:.3} ms", p.algo, p.time)).collect();
            log::info!("qwen-image: convolution {key:?}: [{}]", runs.join(", "));
        }
        Ok(timed.first().map(|p| (p.algo, p.memory)).filter(|p| p.1 <= ws_bytes).unwrap_or(first))
    }

    /// Runs the convolution of `key` on `buf` with the workspace `ws` (at least [`Dnn::workspace_for`]'s bytes),
    /// choosing its algorithm at the first call.
    fn run(
        &mut self,
        key: ConvKey,
        buf: Buffers,
        ws: Workspace,
        mode: GemmAutotune,
    ) -> Result<(), FastError> {
        let algo = match self.plan_for(key)?.algo {
            Some(algo) => algo,
            None => {
                let algo = self.choose(key, buf, ws, mode)?;
                self.plan_for(key)?.algo = Some(algo);
                algo
            }
        };
        require(algo.1 <= ws.bytes, || format!("workspace of {} bytes for {} ({key:?})", ws.bytes, algo.1))?;
        let handle = self.handle;
        let plan = self.plan_for(key)?;
        let (one, zero) = (1f32, 0f32);
        // SAFETY: as in `choose`; alpha and beta are f32 (the compute type) read during the call; the workspace
        // holds at least the algorithm's `algo.1` bytes (checked above).
        unsafe {
            dnn::convolution_forward(
                handle,
                (&one as *const f32).cast(),
                plan.x,
                buf.x as *const c_void,
                plan.w,
                buf.w as *const c_void,
                plan.conv,
                algo.0,
                ws.ptr as *mut c_void,
                ws.bytes,
                (&zero as *const f32).cast(),
                plan.y,
                buf.y as *mut c_void,
            )
        }
        .map_err(|e| dnn_err("convolution forward", e))
    }
}

/// A zeroed perf record (plain data: every field is an integer, a float or a C enum whose 0 is valid).
fn blank_perf() -> dnn_sys::cudnnConvolutionFwdAlgoPerf_t {
    // SAFETY: `cudnnConvolutionFwdAlgoPerf_t` is a C struct of integers, floats and enums, all valid at 0.
    unsafe { MaybeUninit::zeroed().assume_init() }
}

/// The heuristic's successful algorithms that fit [`WORKSPACE_MAX`], best first, with their workspace bytes.
fn heuristic_candidates(
    handle: dnn_sys::cudnnHandle_t,
    plan: &ConvPlan,
) -> Result<Vec<(dnn_sys::cudnnConvolutionFwdAlgo_t, usize)>, FastError> {
    let mut perf = [blank_perf(); CANDIDATES];
    let mut found = 0;
    // SAFETY: the handle and descriptors are live; `perf` has room for `CANDIDATES` results.
    unsafe {
        dnn::get_convolution_forward_algorithm(
            handle,
            plan.x,
            plan.w,
            plan.conv,
            plan.y,
            CANDIDATES as i32,
            &mut found,
            perf.as_mut_ptr(),
        )
    }
    .map_err(|e| dnn_err("algorithm heuristic", e))?;
    Ok(perf[..found.clamp(0, CANDIDATES as i32) as usize]
        .iter()
        .filter(|p| p.status == dnn_sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && p.memory <= WORKSPACE_MAX)
        .map(|p| (p.algo, p.memory))
        .collect())
}

/// The descriptors of `key`: NCHW bf16 tensors, KCRS bf16 filters, cross-correlation with f32 compute and tensor
/// cores. cuDNN's own output size is checked against ours.
fn make_plan(key: ConvKey) -> Result<ConvPlan, FastError> {
    use dnn_sys::{cudnnDataType_t::*, cudnnTensorFormat_t::CUDNN_TENSOR_NCHW};
    let int =
        |v: usize| i32::try_from(v).map_err(|_| FastError::unsupported(format!("{v} exceeds cuDNN's int")));
    let (ho, wo) = key.out_hw();
    let e = |what: &'static str| move |err| dnn_err(what, err);
    let x = dnn::create_tensor_descriptor().map_err(e("tensor descriptor"))?;
    let y = dnn::create_tensor_descriptor().map_err(e("tensor descriptor"))?;
    let w = dnn::create_filter_descriptor().map_err(e("filter descriptor"))?;
    let conv = dnn::create_convolution_descriptor().map_err(e("convolution descriptor"))?;
    let (n, c, h, wd, o, k) = (int(key.n)?, int(key.c)?, int(key.h)?, int(key.w)?, int(key.o)?, int(key.k)?);
    let (stride, pad) = (int(key.stride)?, int(key.pad)?);
    // SAFETY: each descriptor was just created and is set once here; the arguments are plain values.
    unsafe {
        dnn::set_tensor4d_descriptor(x, CUDNN_TENSOR_NCHW, CUDNN_DATA_BFLOAT16, [n, c, h, wd])
            .map_err(e("input descriptor"))?;
        dnn::set_filter4d_descriptor(w, CUDNN_DATA_BFLOAT16, CUDNN_TENSOR_NCHW, [o, c, k, k])
            .map_err(e("filter descriptor"))?;
        dnn::set_convolution2d_descriptor(
            conv,
            pad,
            pad,
            stride,
            stride,
            1,
            1,
            dnn_sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            CUDNN_DATA_FLOAT,
        )
        .map_err(e("convolution descriptor"))?;
        dnn::set_convolution_math_type(conv, dnn_sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)
            .map_err(e("math type"))?;
        dnn::set_tensor4d_descriptor(y, CUDNN_TENSOR_NCHW, CUDNN_DATA_BFLOAT16, [n, o, int(ho)?, int(wo)?])
            .map_err(e("output descriptor"))?;
    }
    let mut out = [0i32; 4];
    // SAFETY: the descriptors are live; `out` has room for the four dimensions.
    unsafe {
        dnn_sys::cudnnGetConvolution2dForwardOutputDim(
            conv,
            x,
            w,
            &mut out[0],
            &mut out[1],
            &mut out[2],
            &mut out[3],
        )
        .result()
        .map_err(e("output size"))?;
    }
    let want = [n, o, int(ho)?, int(wo)?];
    if out != want {
        return Err(FastError::cuda(format!("cuDNN computes output {out:?} for {key:?}, expected {want:?}")));
    }
    Ok(ConvPlan { x, w, conv, y, algo: None })
}

impl Gpu<'_> {
    /// The device's cuDNN state, created on first use.
    fn dnn(&mut self) -> Result<&mut Dnn, FastError> {
        let stream = self.stream();
        let state = self.state();
        if state.dnn.is_none() {
            state.dnn = Some(Dnn::new(stream)?);
        }
        state.dnn.as_mut().ok_or_else(|| FastError::cuda("cuDNN state"))
    }
}

/// `x [n, c, h, w] ⋆ weight [o, c, k, k]` (stride `stride`, zero padding `pad` on every side) through cuDNN,
/// `[n, o, h', w']` in bf16, and `+ bias [o]` when `h'·w'` is a multiple of 8 (then the second value is `true`): the
/// bias is added to the bf16 convolution by one kernel in place, as PyTorch adds it after cuDNN's convolution.
pub(crate) fn conv2d_prim(
    x: Prim,
    weight: Prim,
    bias: Prim,
    stride: usize,
    pad: usize,
) -> Result<(Prim, bool), FastError> {
    require(is_bf16(&x) && is_bf16(&weight), || format!("dtypes {:?} / {:?}", x.dtype, weight.dtype))?;
    require(is_bf16(&bias) && dims(&bias) == [dims(&weight)[0]], || {
        format!("bias {:?} {:?} for filters {:?}", bias.dtype, dims(&bias), dims(&weight))
    })?;
    let (xd, wd) = (dims(&x), dims(&weight));
    require(xd.len() == 4 && wd.len() == 4 && xd[1] == wd[1] && wd[2] == wd[3], || {
        format!("shapes {xd:?} ⋆ {wd:?}")
    })?;
    let key = ConvKey { n: xd[0], c: xd[1], h: xd[2], w: xd[3], o: wd[0], k: wd[2], stride, pad };
    require(
        stride > 0
            && key.k > 0
            && key.h + 2 * pad >= key.k
            && key.w + 2 * pad >= key.k
            && xd.iter().all(|&d| d > 0),
        || format!("convolution {key:?} has an empty output"),
    )?;
    let (ho, wo) = key.out_hw();
    let with_bias = (ho * wo) % 8 == 0;
    let (x, weight, bias) = (dense(x), dense(weight), dense(bias));
    let out = empty_like_device(&x, vec![key.n, key.o, ho, wo], DType::BF16);
    let buf = Buffers { x: ptr(&x)?, w: ptr(&weight)?, y: ptr(&out)? };
    let pb = ptr(&bias)?;
    // cuDNN missing or the shape unsupported: an error before anything is queued (the caller falls back).
    let (bytes, own_buffer) = with_gpu(x.device.index, |dev| {
        let mode = dev.config().gemm_autotune;
        let bytes = dev.dnn()?.workspace_for(key, mode)?;
        Ok((bytes, dev.state().exact_allocation))
    })?;
    // Pooled: from burn's pool, like `out` (bf16 elements: 2 bytes each).
    let pooled =
        (bytes > 0 && !own_buffer).then(|| empty_like_device(&x, vec![bytes.div_ceil(2)], DType::BF16));
    let pooled_ws = Workspace { ptr: pooled.as_ref().map(ptr).transpose()?.unwrap_or(0), bytes };
    with_gpu(x.device.index, |dev| {
        let (mode, stream) = (dev.config().gemm_autotune, dev.stream());
        dev.begin(&x)?;
        // SAFETY: `out` holds `n·o·h'·w'` bf16 values and lives until this function returns.
        unsafe { dev.poison(buf.y, key.n * key.o * ho * wo) }?;
        let dnn = dev.dnn()?;
        let ws = if own_buffer { dnn.workspace(bytes, stream)? } else { pooled_ws };
        dnn.run(key, buf, ws, mode)?;
        if with_bias {
            glue::queue_bias_add_nchw(dev, buf.y, pb, key.o, ho * wo, key.n * key.o * ho * wo)?;
        }
        dev.end()
    })?;
    // The inputs, the bias and a pooled workspace stay alive until the convolution is queued (burn's allocator then
    // reuses them only after it).
    drop((x, weight, bias, pooled));
    Ok((out, with_bias))
}
