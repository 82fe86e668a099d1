//! `dense` / `dense_gelu_tanh` through cuBLASLt on burn's device memory.
//!
//! Row-major `Y[M, N] = X[M, K] · Wᵀ + b` with `W` in PyTorch's `[N, K]` layout is, in cuBLAS' column-major terms,
//! `Yᵀ (N × M, ld N) = op(W) · Xᵀ` with `transa = T` (W read as a `K × N` column-major matrix of leading dimension
//! `K`), `transb = N` (X as `K × M`, leading dimension `K`). bf16 in and out, f32 accumulation and scale; the bias
//! and GELU-tanh are cuBLASLt epilogues. A plan (descriptors, layouts, the heuristic's algorithm) is cached per shape.

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

struct Plan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    a: lt_sys::cublasLtMatrixLayout_t,
    b: lt_sys::cublasLtMatrixLayout_t,
    c: lt_sys::cublasLtMatrixLayout_t,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

/// A cuBLASLt handle, its workspace and the cached plans of one device.
pub(crate) struct Blas {
    handle: lt_sys::cublasLtHandle_t,
    workspace: sys::CUdeviceptr,
    plans: HashMap<PlanKey, Plan>,
}

fn blas_err(what: &str, e: lt::CublasError) -> FastError {
    FastError::cuda(format!("cuBLASLt {what}: {e:?}"))
}

impl Blas {
    fn new() -> Result<Self, FastError> {
        if !unsafe { lt_sys::is_culib_present() } {
            return Err(FastError::cuda(
                "libcublasLt not found (put the CUDA lib64 directory on LD_LIBRARY_PATH)",
            ));
        }
        let handle = lt::create_handle().map_err(|e| blas_err("create handle", e))?;
        let workspace = unsafe { result::malloc_sync(WORKSPACE_BYTES) }
            .map_err(|e| FastError::cuda(format!("workspace allocation: {e:?}")))?;
        Ok(Blas { handle, workspace, plans: HashMap::new() })
    }

    fn plan(&mut self, key: PlanKey) -> Result<&Plan, FastError> {
        if !self.plans.contains_key(&key) {
            let plan = self.make_plan(key)?;
            self.plans.insert(key, plan);
        }
        self.plans.get(&key).ok_or_else(|| FastError::cuda("plan cache"))
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
        let heuristic = unsafe { lt::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref) };
        unsafe { lt::destroy_matmul_pref(pref) }.ok();
        let heuristic = heuristic.map_err(e("heuristic"))?;
        Ok(Plan { desc, a, b, c, algo: heuristic.algo })
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
        let stream = dev.stream;
        let blas = dev.blas()?;
        let (handle, workspace) = (blas.handle, blas.workspace);
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
        let (alpha, beta) = (1.0f32, 0.0f32);
        unsafe {
            lt::matmul(
                handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                pw as *const c_void,
                plan.a,
                px as *const c_void,
                plan.b,
                py as *const c_void,
                plan.c,
                py as *mut c_void,
                plan.c,
                &plan.algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream as lt_sys::cudaStream_t,
            )
            .map_err(|e| blas_err("matmul", e))?;
        }
        dev.end()
    })?;
    drop((x, weight, bias));
    Ok(out)
}
