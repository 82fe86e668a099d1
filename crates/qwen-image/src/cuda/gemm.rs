//! `dense` / `dense_gelu_tanh` through cuBLASLt on burn's device memory.
//!
//! Row-major `Y[M, N] = X[M, K] · Wᵀ + b` with `W` in PyTorch's `[N, K]` layout is, in cuBLAS' column-major terms,
//! `Yᵀ (N × M, ld N) = op(W) · Xᵀ` with `transa = T` (W read as a `K × N` column-major matrix of leading dimension
//! `K`), `transb = N` (X as `K × M`, leading dimension `K`). bf16 in and out, f32 accumulation and scale; the bias
//! and GELU-tanh are cuBLASLt epilogues. A plan (descriptors, layouts, the algorithm) is cached per shape.
//!
//! **Autotuning.** cuBLASLt's heuristic picks one algorithm from the shape alone, and on the H200 its pick for some
//! DiT shapes (the MLP's GELU-epilogue GEMM above all) runs 10–15 % below the best. For GEMMs of at least
//! [`AUTOTUNE_MIN_FLOP`], the first call of a shape times the heuristic's top [`CANDIDATES`] algorithms on the call's
//! own buffers (CUDA events on our stream, one warm-up and [`TIMED_REPS`] runs each) and keeps the fastest for the
//! rest of the process, as PyTorch's `cudnn.benchmark` does. Results are the same GEMM up to f32 accumulation order.
//! `QWEN_GEMM_AUTOTUNE=0` keeps the heuristic's first choice (reproducible algorithm selection across processes);
//! `QWEN_GEMM_AUTOTUNE=verbose` prints every autotuned shape's candidate timings to stderr.

use std::{collections::HashMap, ffi::c_void, mem::size_of};

use burn::tensor::DType;
use cudarc::{
    cublaslt::{result as lt, sys as lt_sys},
    driver::{result, sys},
};

use super::{
    device::{with_device, Device},
    error::{require, FastError},
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

/// Whether shapes are autotuned (`QWEN_GEMM_AUTOTUNE=0` turns it off).
fn autotune_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !matches!(std::env::var("QWEN_GEMM_AUTOTUNE").as_deref(), Ok("0") | Ok("off")))
}

/// Whether each autotuned shape's timings are printed to stderr (`QWEN_GEMM_AUTOTUNE=verbose`).
fn autotune_verbose() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("QWEN_GEMM_AUTOTUNE").as_deref() == Ok("verbose"))
}

/// The fused epilogue of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Epilogue {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    m: u64,
    n: u64,
    k: u64,
    lda: i64,
    ldb: i64,
    epilogue: Epilogue,
}

impl PlanKey {
    fn flop(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

struct Plan {
    desc: lt_sys::cublasLtMatmulDesc_t,
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

/// A cuBLASLt handle, its workspace and the cached plans of one device.
pub(crate) struct Blas {
    handle: lt_sys::cublasLtHandle_t,
    workspace: sys::CUdeviceptr,
    plans: HashMap<PlanKey, Plan>,
    /// Timing events for autotuning (created on first use).
    timer: Option<(sys::CUevent, sys::CUevent)>,
}

fn blas_err(what: &str, e: lt::CublasError) -> FastError {
    FastError::cuda(format!("cuBLASLt {what}: {e:?}"))
}

/// The pointers and stream of one GEMM call.
#[derive(Clone, Copy)]
struct Call {
    w: u64,
    x: u64,
    y: u64,
    stream: sys::CUstream,
}

impl Blas {
    /// Runs the GEMM of `plan` with `algo`.
    fn run(&self, plan: &Plan, algo: &lt_sys::cublasLtMatmulAlgo_t, call: Call) -> Result<(), FastError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                call.w as *const c_void,
                plan.a,
                call.x as *const c_void,
                plan.b,
                call.y as *const c_void,
                plan.c,
                call.y as *mut c_void,
                plan.c,
                algo,
                self.workspace as *mut c_void,
                WORKSPACE_BYTES,
                call.stream as lt_sys::cudaStream_t,
            )
            .map_err(|e| blas_err("matmul", e))
        }
    }

    /// Times every candidate of `key`'s plan on this call's buffers and keeps the fastest. A candidate that fails
    /// to launch is skipped; if all fail, the heuristic's choice stays.
    fn autotune(&mut self, key: PlanKey, call: Call) -> Result<(), FastError> {
        let (start, stop) = match self.timer {
            Some(t) => t,
            None => {
                let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
                let ev = |what| {
                    result::event::create(flags).map_err(|e| FastError::cuda(format!("{what}: {e:?}")))
                };
                let t = (ev("timing event")?, ev("timing event")?);
                self.timer = Some(t);
                t
            }
        };
        let plan = self.plans.get(&key).ok_or_else(|| FastError::cuda("plan cache"))?;
        // Milliseconds for TIMED_REPS runs of each candidate after a warm-up run; NaN for one that failed.
        let time = |algo| -> Result<f32, FastError> {
            let e = |err| FastError::cuda(format!("timing event: {err:?}"));
            self.run(plan, algo, call)?;
            unsafe { result::event::record(start, call.stream) }.map_err(e)?;
            for _ in 0..TIMED_REPS {
                self.run(plan, algo, call)?;
            }
            unsafe { result::event::record(stop, call.stream) }.map_err(e)?;
            unsafe { result::event::synchronize(stop) }.map_err(e)?;
            unsafe { result::event::elapsed(start, stop) }.map_err(e)
        };
        let timings: Vec<f32> = plan.candidates.iter().map(|algo| time(algo).unwrap_or(f32::NAN)).collect();
        if autotune_verbose() {
            let per_run: Vec<String> =
                timings.iter().map(|ms| format!("{:.3}", ms / TIMED_REPS as f32)).collect();
            eprintln!(
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
        let plan = self.plans.get_mut(&key).ok_or_else(|| FastError::cuda("plan cache"))?;
        if let Some(i) = fastest {
            plan.algo = plan.candidates[i];
        }
        plan.settled = true;
        Ok(())
    }

    fn new() -> Result<Self, FastError> {
        if !unsafe { lt_sys::is_culib_present() } {
            return Err(FastError::cuda(
                "libcublasLt not found (put the CUDA lib64 directory on LD_LIBRARY_PATH)",
            ));
        }
        let handle = lt::create_handle().map_err(|e| blas_err("create handle", e))?;
        let workspace = unsafe { result::malloc_sync(WORKSPACE_BYTES) }
            .map_err(|e| FastError::cuda(format!("workspace allocation: {e:?}")))?;
        Ok(Blas { handle, workspace, plans: HashMap::new(), timer: None })
    }

    /// The plan of `key`, made on first use.
    fn plan(&mut self, key: PlanKey) -> Result<&Plan, FastError> {
        if !self.plans.contains_key(&key) {
            let plan = self.make_plan(key)?;
            self.plans.insert(key, plan);
        }
        self.plans.get(&key).ok_or_else(|| FastError::cuda("plan cache"))
    }

    /// Runs the GEMM of `key` on `call` (autotuning the shape first if it is not settled).
    fn matmul(&mut self, key: PlanKey, call: Call) -> Result<(), FastError> {
        if !self.plan(key)?.settled {
            self.autotune(key, call)?;
        }
        let plan = self.plans.get(&key).ok_or_else(|| FastError::cuda("plan cache"))?;
        self.run(plan, &plan.algo, call)
    }

    fn make_plan(&self, key: PlanKey) -> Result<Plan, FastError> {
        use lt_sys::{cublasComputeType_t::CUBLAS_COMPUTE_32F, cudaDataType_t::*};
        let e = |what: &'static str| move |err| blas_err(what, err);
        // A = W stored K x N (col-major, ld = lda), used transposed; B = X stored K x M (ld = ldb); C = D = Y, N x M.
        let a = lt::create_matrix_layout(CUDA_R_16BF, key.k, key.n, key.lda).map_err(e("layout A"))?;
        let b = lt::create_matrix_layout(CUDA_R_16BF, key.k, key.m, key.ldb).map_err(e("layout B"))?;
        let c = lt::create_matrix_layout(CUDA_R_16BF, key.n, key.m, key.n as i64).map_err(e("layout C"))?;
        let desc = lt::create_matmul_desc(CUBLAS_COMPUTE_32F, CUDA_R_32F).map_err(e("matmul desc"))?;
        let set = |attr, value: *const c_void, size: usize| unsafe {
            lt::set_matmul_desc_attribute(desc, attr, value, size).map_err(e("desc attribute"))
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
        let pref = lt::create_matmul_pref().map_err(e("preference"))?;
        let ws = WORKSPACE_BYTES;
        unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const c_void,
                size_of::<usize>(),
            )
            .map_err(e("preference attribute"))?;
        }
        let wanted = if autotune_enabled() && key.flop() >= AUTOTUNE_MIN_FLOP { CANDIDATES } else { 1 };
        let mut results =
            vec![unsafe { std::mem::zeroed::<lt_sys::cublasLtMatmulHeuristicResult_t>() }; wanted];
        let mut found = 0i32;
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
        Ok(Plan { desc, a, b, c, candidates, algo, settled })
    }
}

impl Device {
    fn blas(&mut self) -> Result<&mut Blas, FastError> {
        if self.blas.is_none() {
            self.blas = Some(Blas::new()?);
        }
        self.blas.as_mut().ok_or_else(|| FastError::cuda("cuBLASLt state"))
    }
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
    let bias = match bias {
        Some(b) => {
            require(is_bf16(&b) && dims(&b) == [n], || format!("bias {:?} {:?}", b.dtype, dims(&b)))?;
            Some(dense(b))
        }
        None => None,
    };
    let epilogue = match (bias.is_some(), gelu) {
        (false, false) => Epilogue::None,
        (true, false) => Epilogue::Bias,
        (false, true) => Epilogue::Gelu,
        (true, true) => Epilogue::GeluBias,
    };
    let out = empty_like_device(&x, vec![xd[0], xd[1], n], DType::BF16);
    let (px, pw, py) = (ptr(&x)?, ptr(&weight)?, ptr(&out)?);
    let pb = bias.as_ref().map(ptr).transpose()?;
    let key = PlanKey { m: m as u64, n: n as u64, k: k as u64, lda, ldb: k as i64, epilogue };
    with_device(x.device.index, |dev| {
        dev.begin(&x)?;
        dev.poison(py, m * n)?;
        let call = Call { w: pw, x: px, y: py, stream: dev.stream };
        let blas = dev.blas()?;
        let plan = blas.plan(key)?;
        if let Some(pb) = pb {
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &pb as *const u64 as *const c_void,
                    size_of::<u64>(),
                )
                .map_err(|e| blas_err("bias pointer", e))?;
            }
        }
        blas.matmul(key, call)?;
        dev.end()
    })?;
    drop((x, weight, bias));
    Ok(out)
}
