//! FP8 on the GPU (`QwenBackend::quantize_fp8` and `dense_fp8`, see docs/fp8.md): rows quantized to e4m3 by a
//! kernel (`kernels/fp8.cu`), and cuBLASLt FP8 GEMMs with one f32 scale per output feature (the weight's) and per
//! token (the activation's) — `CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F`, cuBLASLt ≥ 12.9 on Hopper — bf16 out,
//! bias and GELU in the epilogue. The layouts are `cuda/gemm.rs`'s (`transa = T`, `transb = N`), with e4m3 inputs.
//!
//! `tests/gpu_fast_ops.rs` (`fp8_*`) checks it against the portable emulation. An activation read by several FP8
//! layers is quantized once ([`crate::nn::LinearInput`]), by the adaLN kernel where it produces it
//! (`glue::layer_norm_modulate_fp8_prim`); [`dense_fp8_quantized_prim`] takes it quantized.

use std::ffi::c_void;

use burn::tensor::DType;
use cudarc::cublaslt::sys as lt_sys;

use super::{
    error::{require, FastError},
    gemm::{dense_bias, set_pointer, Call, Epilogue, ShapeKey},
    gpu::Gpu,
    kernels,
    registry::with_gpu,
    tensor::{dense, dims, empty_like_device, is_bf16, ptr, Prim},
};

const MODULE: &str = "fp8";
const THREADS: u32 = 128;
/// The first cuBLASLt with outer-vector (per-row / per-column) FP8 scales.
const MIN_CUBLASLT: usize = 120_900;

/// `Fp8RowsParams` of `fp8.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Fp8RowsParams {
    x: u64,
    q: u64,
    scale: u64,
    x_sr: i64,
    rows: i32,
    k: i32,
}

assert_layout!(Fp8RowsParams: size 40, align 8 { x @ 0, q @ 8, scale @ 16, x_sr @ 24, rows @ 32, k @ 36 });

/// The e4m3 conversion instruction of every e4m3 kernel (`fp8.cu`, and the FP8 adaLN of `elementwise.cu`) exists
/// from sm_89 on.
pub(super) fn require_e4m3(dev: &Gpu) -> Result<(), FastError> {
    require(dev.cc() >= (8, 9), || format!("compute capability {:?} has no e4m3 conversion", dev.cc()))
}

/// Quantizes the rows of a bf16 `[…, K]` tensor: its e4m3 bits (u8, same shape) and one f32 scale per row (shape
/// without the last axis). Needs an even `K` and an sm_89+ GPU (the conversion instruction).
pub(crate) fn quantize_rows_prim(x: Prim) -> Result<(Prim, Prim), FastError> {
    require(is_bf16(&x), || format!("dtype {:?}", x.dtype))?;
    let shape = dims(&x);
    let (lead, k) = match shape.split_last() {
        Some((&k, lead)) if !lead.is_empty() => (lead.to_vec(), k),
        _ => return Err(FastError::unsupported(format!("shape {shape:?}"))),
    };
    let rows: usize = lead.iter().product();
    require(k > 0 && k % 2 == 0 && rows > 0, || format!("shape {shape:?}"))?;
    require(rows < i32::MAX as usize && k < i32::MAX as usize, || "too large".into())?;
    let x = dense(x);
    let q = empty_like_device(&x, shape.clone(), DType::U8);
    let scale = empty_like_device(&x, lead, DType::F32);
    let mut p = Fp8RowsParams {
        x: ptr(&x)?,
        q: ptr(&q)?,
        scale: ptr(&scale)?,
        x_sr: k as i64,
        rows: rows as i32,
        k: k as i32,
    };
    require(p.q % 2 == 0, || "bits not 2-byte aligned".into())?;
    // 16-byte loads and 8-byte stores where the rows allow them (every DiT and text-encoder width).
    let vectors = k % 8 == 0 && p.x % 16 == 0 && p.q % 8 == 0;
    let name = if vectors { "fp8_quantize_rows_v8" } else { "fp8_quantize_rows" };
    with_gpu(x.device.index, |dev| {
        require_e4m3(dev)?;
        let f = dev.function(MODULE, kernels::FP8, name, 0)?;
        dev.begin(&x)?;
        let mut args = [&mut p as *mut Fp8RowsParams as *mut c_void];
        // SAFETY: an `Fp8RowsParams` by value is the kernel's signature (layout checked on both sides at compile
        // time). `x` is dense bf16 `[rows, k]` (row stride `k`), `q` a new dense u8 buffer of the same shape (2-byte
        // aligned, `k` even: the kernel writes byte pairs; for the `_v8` kernel `k` is a multiple of 8, `x` 16-byte
        // and `q` 8-byte aligned), `scale` a new f32 buffer of `rows` values; all are held until this function
        // returns. One block per row.
        unsafe { dev.launch(f, (rows as u32, 1, 1), (THREADS, 1, 1), 0, &mut args) }?;
        dev.end()
    })?;
    drop(x);
    Ok((q, scale))
}

/// `Fp8DequantParams` of `fp8.cu`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Fp8DequantParams {
    q: u64,
    scale: u64,
    y: u64,
    n8: i64,
    k: i32,
    pad: i32,
}

assert_layout!(Fp8DequantParams: size 40, align 8 { q @ 0, scale @ 8, y @ 16, n8 @ 24, k @ 32 });

/// e4m3 rows back to bf16: `q` (u8 `[…, K]`) times one f32 scale per row (`scale`, the shape without the last
/// axis), each product rounded once (`QwenBackend::dequantize_activation_fp8`). Needs `K` a multiple of 8.
pub(crate) fn dequantize_rows_prim(q: Prim, scale: Prim) -> Result<Prim, FastError> {
    let (shape, sd) = (dims(&q), dims(&scale));
    require(q.dtype == DType::U8 && scale.dtype == DType::F32, || {
        format!("dtypes {:?} / {:?}", q.dtype, scale.dtype)
    })?;
    let (lead, k) = match shape.split_last() {
        Some((&k, lead)) if !lead.is_empty() && lead == sd.as_slice() => (lead.to_vec(), k),
        _ => return Err(FastError::unsupported(format!("bits {shape:?}, scales {sd:?}"))),
    };
    let rows: usize = lead.iter().product();
    let n8 = rows * k / 8;
    require(k > 0 && k % 8 == 0 && rows > 0, || format!("shape {shape:?}"))?;
    require(k < i32::MAX as usize && n8.div_ceil(THREADS as usize) < u32::MAX as usize, || {
        "too large".into()
    })?;
    let (q, scale) = (dense(q), dense(scale));
    let y = empty_like_device(&q, shape, DType::BF16);
    let mut p = Fp8DequantParams {
        q: ptr(&q)?,
        scale: ptr(&scale)?,
        y: ptr(&y)?,
        n8: n8 as i64,
        k: k as i32,
        pad: 0,
    };
    require(p.q % 8 == 0 && p.y % 16 == 0, || "bits or output not aligned".into())?;
    with_gpu(q.device.index, |dev| {
        let f = dev.function(MODULE, kernels::FP8, "fp8_dequantize_rows", 0)?;
        dev.begin(&q)?;
        let blocks = n8.div_ceil(THREADS as usize) as u32;
        let mut args = [&mut p as *mut Fp8DequantParams as *mut c_void];
        // SAFETY: an `Fp8DequantParams` by value is the kernel's signature (layout checked on both sides at compile
        // time). `q` is dense u8 `[rows, k]` (8-byte aligned), `scale` dense f32 `[rows]`, `y` a new dense bf16
        // buffer of `rows·k` values (16-byte aligned); `k` is a multiple of 8, so each thread's 8 values lie in one
        // row; threads past `n8` return. All are held until this function returns.
        unsafe { dev.launch(f, (blocks, 1, 1), (THREADS, 1, 1), 0, &mut args) }?;
        dev.end()
    })?;
    drop((q, scale));
    Ok(y)
}

/// `x [batch, tokens, K] (bf16) · W[N, K]ᵀ` with W as e4m3 `bits` (u8 `[N, K]`) and f32 `scales` (`[N]`), per-token
/// e4m3 activations, `+ bias[N]` (bf16) and GELU-tanh in the epilogue; returns bf16 `[batch, tokens, N]`.
pub(crate) fn dense_fp8_prim(
    x: Prim,
    bits: Prim,
    scales: Prim,
    bias: Option<Prim>,
    gelu: bool,
) -> Result<Prim, FastError> {
    require(is_bf16(&x), || format!("dtype {:?}", x.dtype))?;
    // Checked before the quantization, so that an unfit GEMM falls back without a wasted kernel.
    check_gemm(&dims(&x), &bits, &scales)?;
    let (qx, sx) = quantize_rows_prim(x)?;
    dense_fp8_quantized_prim(qx, sx, bits, scales, bias, gelu)
}

/// The e4m3 GEMM shapes and dtypes: `x [batch, tokens, K]` against `bits` (u8 `[N, K]`) and f32 `scales` (`[N]`),
/// with cuBLASLt's FP8 alignment; returns `(m, k, n)`.
fn check_gemm(xd: &[usize], bits: &Prim, scales: &Prim) -> Result<(usize, usize, usize), FastError> {
    let (wd, sd) = (dims(bits), dims(scales));
    require(bits.dtype == DType::U8 && scales.dtype == DType::F32, || {
        format!("dtypes {:?} / {:?}", bits.dtype, scales.dtype)
    })?;
    require(xd.len() == 3 && wd.len() == 2 && xd[2] == wd[1] && sd == [wd[0]], || {
        format!("shapes {xd:?} · {wd:?}ᵀ, scales {sd:?}")
    })?;
    let (m, k, n) = (xd[0] * xd[1], xd[2], wd[0]);
    // cuBLASLt's FP8 GEMMs need 16-byte aligned leading dimensions: K bytes of e4m3, N bf16 outputs.
    require(m > 0 && crate::quant::fits_fp8_gemm([n, k]), || format!("GEMM {m}×{n}×{k}"))?;
    Ok((m, k, n))
}

/// [`dense_fp8_prim`] from an activation quantized already: `qx` (u8 `[batch, tokens, K]`) and its f32 per-token
/// scales `sx` (`[batch, tokens]`); returns bf16 `[batch, tokens, N]`.
pub(crate) fn dense_fp8_quantized_prim(
    qx: Prim,
    sx: Prim,
    bits: Prim,
    scales: Prim,
    bias: Option<Prim>,
    gelu: bool,
) -> Result<Prim, FastError> {
    let xd = dims(&qx);
    let (m, k, n) = check_gemm(&xd, &bits, &scales)?;
    require(qx.dtype == DType::U8 && sx.dtype == DType::F32 && dims(&sx) == xd[..2], || {
        format!("activation {:?} {xd:?}, scales {:?} {:?}", qx.dtype, sx.dtype, dims(&sx))
    })?;
    let bias = bias.map(|b| dense_bias(b, n)).transpose()?;
    // SAFETY: only reads the version of the loaded cuBLASLt library.
    let version = unsafe { lt_sys::cublasLtGetVersion() };
    require(version >= MIN_CUBLASLT, || {
        format!("cuBLASLt {version} has no outer-vector FP8 scales (12.9+)")
    })?;
    let (bits, scales, qx, sx) = (dense(bits), dense(scales), dense(qx), dense(sx));
    let out = empty_like_device(&qx, vec![xd[0], xd[1], n], DType::BF16);
    let (pw, psw, pq, psx, py) = (ptr(&bits)?, ptr(&scales)?, ptr(&qx)?, ptr(&sx)?, ptr(&out)?);
    let pb = bias.as_ref().map(ptr).transpose()?;
    let epilogue = Epilogue::of(pb.is_some(), gelu);
    with_gpu(qx.device.index, |dev| {
        let key = ShapeKey {
            m: m as u64,
            n: n as u64,
            k: k as u64,
            lda: k as i64,
            ldb: k as i64,
            epilogue,
            fp8: true,
            fast_accum: dev.config().fp8_fast_accum,
        };
        dev.begin(&qx)?;
        // SAFETY: `out` holds `m·n` bf16 values and lives until this function returns.
        unsafe { dev.poison(py, m * n) }?;
        let call = Call { w: pw, x: pq, y: py, stream: dev.stream() };
        let mode = dev.config().gemm_autotune;
        let blas = dev.blas()?;
        let desc = blas.matmul_for(key, mode)?.desc;
        use lt_sys::cublasLtMatmulDescAttributes_t::*;
        set_pointer(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, psw)?;
        set_pointer(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, psx)?;
        if let Some(pb) = pb {
            set_pointer(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, pb)?;
        }
        blas.matmul(key, call, mode)?;
        dev.end()
    })?;
    // The inputs stay alive until the GEMM is queued (burn's allocator then reuses them only after it).
    drop((bits, scales, qx, sx, bias));
    Ok(out)
}
