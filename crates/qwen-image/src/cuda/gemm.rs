//! `dense` / `dense_gelu_tanh` through cuBLASLt on burn's device memory.
//!
//! Row-major `Y[M, N] = X[M, K] · Wᵀ + b` with `W` in PyTorch's `[N, K]` layout is, in cuBLAS' column-major terms,
//! `Yᵀ (N × M, ld N) = op(W) · Xᵀ` with `transa = T` (W read as a `K × N` column-major matrix of leading dimension
//! `K`), `transb = N` (X as `K × M`, leading dimension `K`). bf16 in and out, f32 accumulation and scale; the bias
//! and GELU-tanh are cuBLASLt epilogues. A prepared matmul (descriptors, layouts, the algorithm) is cached per shape.
//!
//! **Autotuning.** cuBLASLt's heuristic picks one algorithm from the shape alone, and on the H200 its pick for some
//! DiT shapes (the MLP's GELU-epilogue GEMM above all) runs 10–15 % below the best. For GEMMs of at least
//! [`AUTOTUNE_MIN_FLOP`], the first call of a shape times the heuristic's top [`CANDIDATES`] algorithms on the call's
//! own buffers (CUDA events on our stream, one warm-up and [`TIMED_REPS`] runs each) and keeps the fastest for the
//! rest of the process, as PyTorch's `cudnn.benchmark` does. Results are the same GEMM up to f32 accumulation order.
//! [`GemmAutotune::Off`] (`QWEN_GEMM_AUTOTUNE=0`) keeps the heuristic's first choice (reproducible algorithm
//! selection across processes); [`GemmAutotune::Verbose`] logs every autotuned shape's candidate timings
//! (`log::info!`).
//!
//! The cuBLASLt handle, its workspace, the prepared matmuls (descriptors and layouts) and the timing events live as
//! long as the device state, i.e. until the process exits: one handle and workspace per device, one matmul per GEMM
//! shape.

use std::{collections::HashMap, ffi::c_void, mem::size_of};

use burn::tensor::DType;
use cudarc::{
    cublaslt::{result as lt, sys as lt_sys},
    driver::{result, sys},
};

use super::{
    config::GemmAutotune,
    error::{require, FastError},
    gpu::Gpu,
    registry::with_gpu,
    tensor::{dense, dims, empty_like_device, is_bf16, is_dense, ptr, strides, Prim},
};

/// cuBLASLt workspace (NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// Algorithms asked of the heuristic (and timed) per autotuned shape. On the H200 the heuristic offers at most 8
/// for the DiT's shapes even when asked for more.
const CANDIDATES: usize = 8;

/// GEMMs below this many FLOPs keep the heuristic's choice: timing them would cost more than it could save.
const AUTOTUNE_MIN_FLOP: f64 = 2e10;

/// Timed runs per candidate algorithm (after one warm-up run).
const TIMED_REPS: usize = 3;

/// The fused epilogue of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Epilogue {
    /// `X·Wᵀ`.
    None,
    /// `X·Wᵀ + b`.
    Bias,
    /// `gelu_tanh(X·Wᵀ)`.
    Gelu,
    /// `gelu_tanh(X·Wᵀ + b)`.
    GeluBias,
}

impl Epilogue {
    /// The epilogue with or without a bias and a GELU.
    pub(super) fn of(bias: bool, gelu: bool) -> Self {
        match (bias, gelu) {
            (false, false) => Epilogue::None,
            (true, false) => Epilogue::Bias,
            (false, true) => Epilogue::Gelu,
            (true, true) => Epilogue::GeluBias,
        }
    }

    fn lt(self) -> lt_sys::cublasLtEpilogue_t {
        use lt_sys::cublasLtEpilogue_t::*;
        match self {
            Epilogue::None => CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => CUBLASLT_EPILOGUE_BIAS,
            Epilogue::Gelu => CUBLASLT_EPILOGUE_GELU,
            Epilogue::GeluBias => CUBLASLT_EPILOGUE_GELU_BIAS,
        }
    }

    fn has_bias(self) -> bool {
        matches!(self, Epilogue::Bias | Epilogue::GeluBias)
    }
}

/// A GEMM shape: `Y[M, N] = X[M, K] · W[N, K]ᵀ` with leading dimensions, the epilogue, whether the inputs are
/// e4m3 with outer-vector scales (`cuda/fp8.rs`) instead of bf16, and for those whether cuBLASLt's fast
/// accumulation is on ([`FastPathConfig::fp8_fast_accum`](super::FastPathConfig::fp8_fast_accum)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ShapeKey {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub lda: i64,
    pub ldb: i64,
    pub epilogue: Epilogue,
    pub fp8: bool,
    pub fast_accum: bool,
}

impl ShapeKey {
    fn flop(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// A cuBLASLt matmul prepared for one shape: descriptors, layouts and algorithms.
pub(super) struct Matmul {
    /// The descriptor, whose per-call pointers (bias, FP8 scales) the caller sets before each run.
    pub desc: lt_sys::cublasLtMatmulDesc_t,
    a: lt_sys::cublasLtMatrixLayout_t,
    b: lt_sys::cublasLtMatrixLayout_t,
    c: lt_sys::cublasLtMatrixLayout_t,
    /// The heuristic's algorithms, best guess first.
    candidates: Vec<lt_sys::cublasLtMatmulAlgo_t>,
    /// The algorithm in use: `candidates[0]` until the shape is autotuned.
    algo: lt_sys::cublasLtMatmulAlgo_t,
    /// Whether `algo` is final (autotuned, or not worth autotuning).
    settled: bool,
}

/// A cuBLASLt handle, its workspace and the prepared matmuls of one device.
pub(crate) struct Blas {
    handle: lt_sys::cublasLtHandle_t,
    workspace: sys::CUdeviceptr,
    matmuls: HashMap<ShapeKey, Matmul>,
    /// Timing events for autotuning (created on first use).
    timer: Option<(sys::CUevent, sys::CUevent)>,
}

pub(super) fn blas_err(what: &str, e: lt::CublasError) -> FastError {
    FastError::cuda(format!("cuBLASLt {what}: {e:?}"))
}

/// Sets the device pointer `p` as the descriptor attribute `attr` (a per-call pointer: bias, FP8 scales).
pub(super) fn set_pointer(
    desc: lt_sys::cublasLtMatmulDesc_t,
    attr: lt_sys::cublasLtMatmulDescAttributes_t,
    p: u64,
) -> Result<(), FastError> {
    // SAFETY: `desc` is a live descriptor; the pointer is passed by pointer with its size and copied by cuBLASLt.
    // A descriptor is only used by GEMMs on our stream, each setting its own pointers first.
    unsafe { lt::set_matmul_desc_attribute(desc, attr, &p as *const u64 as *const c_void, size_of::<u64>()) }
        .map_err(|e| blas_err("pointer attribute", e))
}

/// The pointers and stream of one GEMM call.
#[derive(Clone, Copy)]
pub(super) struct Call {
    pub w: u64,
    pub x: u64,
    pub y: u64,
    pub stream: sys::CUstream,
}

impl Blas {
    /// Runs the GEMM of `m` with `algo`.
    fn run(&self, m: &Matmul, algo: &lt_sys::cublasLtMatmulAlgo_t, call: Call) -> Result<(), FastError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the handle, descriptor and layouts are live (never destroyed) and describe `Y[N×M] = op(W)·X`
        // over the buffers of `call`, which the caller holds until the GEMM is queued (`dense_prim` checked their
        // dtypes, shapes and leading dimensions when building the key); alpha and beta are f32 as the descriptor's
        // scale type says and are read before the call returns; the workspace has `WORKSPACE_BYTES` bytes and is
        // only used on our stream, so GEMMs never overlap on it.
        unsafe {
            lt::matmul(
                self.handle,
                m.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                call.w as *const c_void,
                m.a,
                call.x as *const c_void,
                m.b,
                call.y as *const c_void,
                m.c,
                call.y as *mut c_void,
                m.c,
                algo,
                self.workspace as *mut c_void,
                WORKSPACE_BYTES,
                call.stream as lt_sys::cudaStream_t,
            )
            .map_err(|e| blas_err("matmul", e))
        }
    }

    /// Times every candidate of `key`'s matmul on this call's buffers and keeps the fastest. A candidate that fails
    /// to launch is skipped; if all fail, the heuristic's choice stays.
    fn autotune(&mut self, key: ShapeKey, call: Call, mode: GemmAutotune) -> Result<(), FastError> {
        let (start, stop) = match self.timer {
            Some(t) => t,
            None => {
                let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
                let ev = |what| {
                    result::event::create(flags).map_err(|e| FastError::cuda(format!("{what}: {e:?}")))
                };
                // Never destroyed, like the rest of the device state.
                let t = (ev("timing event")?, ev("timing event")?);
                self.timer = Some(t);
                t
            }
        };
        let m = self.matmuls.get(&key).ok_or_else(|| FastError::cuda("matmul cache"))?;
        // Milliseconds for TIMED_REPS runs of each candidate after a warm-up run; NaN for one that failed.
        let time = |algo| -> Result<f32, FastError> {
            let e = |err| FastError::cuda(format!("timing event: {err:?}"));
            self.run(m, algo, call)?;
            // SAFETY: `start` and `stop` are live events of the current context, recorded on our (live) stream;
            // `stop` is waited for before the elapsed time between the two is read.
            unsafe {
                result::event::record(start, call.stream).map_err(e)?;
                for _ in 0..TIMED_REPS {
                    self.run(m, algo, call)?;
                }
                result::event::record(stop, call.stream).map_err(e)?;
                result::event::synchronize(stop).map_err(e)?;
                result::event::elapsed(start, stop).map_err(e)
            }
        };
        let timings: Vec<f32> = m.candidates.iter().map(|algo| time(algo).unwrap_or(f32::NAN)).collect();
        if mode == GemmAutotune::Verbose {
            let per_run: Vec<String> =
                timings.iter().map(|ms| format!("{:.3}", ms / TIMED_REPS as f32)).collect();
            log::info!(
                "qwen-image: GEMM {}x{}x{} {:?}: ms per run of the heuristic's top {}: [{}]",
                key.m,
                key.n,
                key.k,
                key.epilogue,
                timings.len(),
                per_run.join(", ")
            );
        }
        let fastest = (0..timings.len())
            .filter(|&i| timings[i].is_finite())
            .min_by(|&i, &j| timings[i].total_cmp(&timings[j]));
        let m = self.matmuls.get_mut(&key).ok_or_else(|| FastError::cuda("matmul cache"))?;
        if let Some(i) = fastest {
            m.algo = m.candidates[i];
        }
        m.settled = true;
        Ok(())
    }

    fn new() -> Result<Self, FastError> {
        // SAFETY: only checks whether libcublasLt could be loaded.
        if !unsafe { lt_sys::is_culib_present() } {
            return Err(FastError::cuda(
                "libcublasLt not found (put the CUDA lib64 directory on LD_LIBRARY_PATH)",
            ));
        }
        // The handle and the workspace are never freed (see the module docs).
        let handle = lt::create_handle().map_err(|e| blas_err("create handle", e))?;
        // SAFETY: a plain device allocation in the current context; it is only handed to cuBLASLt as its workspace
        // of `WORKSPACE_BYTES` bytes.
        let workspace = unsafe { result::malloc_sync(WORKSPACE_BYTES) }
            .map_err(|e| FastError::cuda(format!("workspace allocation: {e:?}")))?;
        Ok(Blas { handle, workspace, matmuls: HashMap::new(), timer: None })
    }

    /// The matmul of `key`, made on first use (with the candidates `mode` asks for).
    pub(super) fn matmul_for(&mut self, key: ShapeKey, mode: GemmAutotune) -> Result<&Matmul, FastError> {
        if !self.matmuls.contains_key(&key) {
            let m = self.make_matmul(key, mode)?;
            self.matmuls.insert(key, m);
        }
        self.matmuls.get(&key).ok_or_else(|| FastError::cuda("matmul cache"))
    }

    /// Runs the GEMM of `key` on `call` (autotuning the shape first if it is not settled).
    pub(super) fn matmul(&mut self, key: ShapeKey, call: Call, mode: GemmAutotune) -> Result<(), FastError> {
        if !self.matmul_for(key, mode)?.settled {
            self.autotune(key, call, mode)?;
        }
        let m = self.matmuls.get(&key).ok_or_else(|| FastError::cuda("matmul cache"))?;
        self.run(m, &m.algo, call)
    }

    /// The descriptors, layouts and candidate algorithms of `key`. They are never destroyed (one set per shape;
    /// if a step fails, those made before it leak, once, as the GEMM kind is then switched off).
    fn make_matmul(&self, key: ShapeKey, mode: GemmAutotune) -> Result<Matmul, FastError> {
        use lt_sys::{cublasComputeType_t::CUBLAS_COMPUTE_32F, cudaDataType_t::*};
        let e = |what: &'static str| move |err| blas_err(what, err);
        // A = W stored K x N (col-major, ld = lda), used transposed; B = X stored K x M (ld = ldb); C = D = Y, N x M.
        let input = if key.fp8 { CUDA_R_8F_E4M3 } else { CUDA_R_16BF };
        let a = lt::create_matrix_layout(input, key.k, key.n, key.lda).map_err(e("layout A"))?;
        let b = lt::create_matrix_layout(input, key.k, key.m, key.ldb).map_err(e("layout B"))?;
        let c = lt::create_matrix_layout(CUDA_R_16BF, key.n, key.m, key.n as i64).map_err(e("layout C"))?;
        let desc = lt::create_matmul_desc(CUBLAS_COMPUTE_32F, CUDA_R_32F).map_err(e("matmul desc"))?;
        // Sets a descriptor attribute from a value of `size` bytes at `value`.
        let set = |attr, value: *const c_void, size: usize| {
            // SAFETY: `desc` is live; every call below passes a pointer to a local of the attribute's type, with
            // its size, which cuBLASLt copies before returning.
            unsafe { lt::set_matmul_desc_attribute(desc, attr, value, size).map_err(e("desc attribute")) }
        };
        use lt_sys::cublasLtMatmulDescAttributes_t::*;
        let trans_a: i32 = 1;
        let trans_b: i32 = 0;
        set(CUBLASLT_MATMUL_DESC_TRANSA, &trans_a as *const i32 as *const c_void, size_of::<i32>())?;
        set(CUBLASLT_MATMUL_DESC_TRANSB, &trans_b as *const i32 as *const c_void, size_of::<i32>())?;
        let epi = key.epilogue.lt();
        set(
            CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epi as *const _ as *const c_void,
            size_of::<lt_sys::cublasLtEpilogue_t>(),
        )?;
        if key.epilogue.has_bias() {
            let bias_type = CUDA_R_16BF;
            set(
                CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                &bias_type as *const _ as *const c_void,
                size_of::<lt_sys::cudaDataType_t>(),
            )?;
            // A placeholder pointer for the heuristic; the real one is set per call.
            let p: u64 = self.workspace;
            set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p as *const u64 as *const c_void, size_of::<u64>())?;
        }
        if key.fp8 {
            // One f32 scale per row of op(A) (= per output feature: the weight's) and per column of op(B) (= per
            // token: the activation's). Placeholder pointers for the heuristic; the real ones are set per call.
            let mode = lt_sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
            let size = size_of::<lt_sys::cublasLtMatmulMatrixScale_t>();
            set(CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode as *const _ as *const c_void, size)?;
            set(CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode as *const _ as *const c_void, size)?;
            set_pointer(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, self.workspace)?;
            set_pointer(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, self.workspace)?;
            // An `int8_t` flag.
            let fast: i8 = key.fast_accum.into();
            set(CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast as *const i8 as *const c_void, size_of::<i8>())?;
        }
        let pref = lt::create_matmul_pref().map_err(e("preference"))?;
        let ws = WORKSPACE_BYTES;
        // SAFETY: `pref` is live; the attribute is a `usize` passed by pointer with its size, copied by cuBLASLt.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const c_void,
                size_of::<usize>(),
            )
            .map_err(e("preference attribute"))?;
        }
        let tuned = mode != GemmAutotune::Off && key.flop() >= AUTOTUNE_MIN_FLOP;
        let wanted = if tuned { CANDIDATES } else { 1 };
        // SAFETY: the heuristic result is a plain C struct for which all-zero bytes are a valid value.
        let blank = unsafe { std::mem::zeroed::<lt_sys::cublasLtMatmulHeuristicResult_t>() };
        let mut results = vec![blank; wanted];
        let mut found = 0i32;
        // SAFETY: the handle, descriptor, layouts and preference are live; `results` has room for the `wanted`
        // results asked for and `found` receives how many were written.
        let status = unsafe {
            lt_sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc,
                a,
                b,
                c,
                c,
                pref,
                wanted as i32,
                results.as_mut_ptr(),
                &mut found,
            )
        };
        // SAFETY: `pref` is live and not used after this.
        unsafe { lt::destroy_matmul_pref(pref) }.ok();
        status.result().map_err(e("heuristic"))?;
        let candidates: Vec<_> = results
            .iter()
            .take(found.max(0) as usize)
            .filter(|r| r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        let algo = *candidates.first().ok_or_else(|| {
            FastError::cuda(format!("cuBLASLt has no algorithm for {}×{}×{}", key.m, key.n, key.k))
        })?;
        let settled = candidates.len() < 2;
        Ok(Matmul { desc, a, b, c, candidates, algo, settled })
    }
}

impl Gpu<'_> {
    /// The device's cuBLASLt state, created on first use.
    pub(super) fn blas(&mut self) -> Result<&mut Blas, FastError> {
        let state = self.state();
        if state.blas.is_none() {
            state.blas = Some(Blas::new()?);
        }
        state.blas.as_mut().ok_or_else(|| FastError::cuda("cuBLASLt state"))
    }
}

/// A GEMM's bias: bf16 `[n]`, dense.
pub(super) fn dense_bias(b: Prim, n: usize) -> Result<Prim, FastError> {
    require(is_bf16(&b) && dims(&b) == [n], || format!("bias {:?} {:?}", b.dtype, dims(&b)))?;
    Ok(dense(b))
}

/// `x [batch, tokens, K] · weight[N, K]ᵀ (+ bias[N]) (→ gelu_tanh)` on cuBLASLt; returns `[batch, tokens, N]`.
pub(crate) fn dense_prim(x: Prim, weight: Prim, bias: Option<Prim>, gelu: bool) -> Result<Prim, FastError> {
    require(is_bf16(&x) && is_bf16(&weight), || format!("dtypes {:?} / {:?}", x.dtype, weight.dtype))?;
    let xd = dims(&x);
    let wd = dims(&weight);
    require(xd.len() == 3 && wd.len() == 2 && xd[2] == wd[1], || format!("shapes {xd:?} · {wd:?}ᵀ"))?;
    let (m, k, n) = (xd[0] * xd[1], xd[2], wd[0]);
    require(m > 0 && k > 0 && n > 0, || "empty GEMM".into())?;
    let x = dense(x);
    require(is_dense(&x), || "input is not dense".into())?;
    // The weight may have padded rows (a pitched allocation) but its inner axis must be contiguous.
    let ws = strides(&weight);
    let weight = if ws[1] == 1 && ws[0] >= k { weight } else { dense(weight) };
    let lda = strides(&weight)[0].max(k) as i64;
    let bias = bias.map(|b| dense_bias(b, n)).transpose()?;
    let epilogue = Epilogue::of(bias.is_some(), gelu);
    let out = empty_like_device(&x, vec![xd[0], xd[1], n], DType::BF16);
    let (px, pw, py) = (ptr(&x)?, ptr(&weight)?, ptr(&out)?);
    let pb = bias.as_ref().map(ptr).transpose()?;
    let key = ShapeKey {
        m: m as u64,
        n: n as u64,
        k: k as u64,
        lda,
        ldb: k as i64,
        epilogue,
        fp8: false,
        fast_accum: false,
    };
    with_gpu(x.device.index, |dev| {
        dev.begin(&x)?;
        // SAFETY: `out` holds `m·n` bf16 values and lives until this function returns.
        unsafe { dev.poison(py, m * n) }?;
        let call = Call { w: pw, x: px, y: py, stream: dev.stream() };
        let mode = dev.config().gemm_autotune;
        let blas = dev.blas()?;
        let matmul = blas.matmul_for(key, mode)?;
        if let Some(pb) = pb {
            set_pointer(
                matmul.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                pb,
            )?;
        }
        blas.matmul(key, call, mode)?;
        dev.end()
    })?;
    // The inputs stay alive until the GEMM is queued (burn's allocator then reuses them only after it).
    drop((x, weight, bias));
    Ok(out)
}
