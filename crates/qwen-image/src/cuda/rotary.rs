//! The text encoder's rotate-half rotary (`rotary_half` in `kernels/elementwise.cu`): one kernel in place of the
//! portable composition's narrows, negation, concatenation, two products and a sum (and, in the vision tower, the
//! casts to f32 and back) on every query and key.

use std::ffi::c_void;

use burn::tensor::DType;

use super::{
    error::{require, FastError},
    glue::{grid_stride_blocks, MODULE},
    kernels,
    registry::with_gpu,
    tensor::{dense, dims, empty_like_device, inner_contiguous, is_bf16, is_dense, ptr, strides, Prim},
};

/// See [`crate::ops::QwenBackend::rotary_half`]: `x [batch, tokens, heads, head_dim]` bf16 (rows of a strided view
/// such as the vision tower's fused QKV are read in place), `cos`/`sin` `[tokens, head_dim]` in bf16 or f32.
pub(crate) fn rotary_half_prim(x: Prim, cos: &Prim, sin: &Prim) -> Result<Prim, FastError> {
    require(is_bf16(&x), || format!("dtype {:?}", x.dtype))?;
    let d = dims(&x);
    require(d.len() == 4, || format!("shape {d:?}"))?;
    let (batch, tokens, heads, dh) = (d[0], d[1], d[2], d[3]);
    require(dh % 16 == 0 && batch * tokens * heads > 0, || {
        format!("shape {d:?} (head_dim a multiple of 16)")
    })?;
    let f32_tables = cos.dtype == DType::F32;
    for t in [cos, sin] {
        require(t.dtype == cos.dtype && (f32_tables || is_bf16(t)), || format!("table dtype {:?}", t.dtype))?;
        require(dims(t) == [tokens, dh], || format!("table shape {:?}, expected [{tokens}, {dh}]", dims(t)))?;
    }
    let x = inner_contiguous(x);
    let xs = strides(&x);
    // Batch and tokens must merge into one row axis, heads sit `head_dim` apart; otherwise a dense copy.
    let x = if xs[0] == tokens * xs[1] && xs[2] == dh && xs[1] % 8 == 0 { x } else { dense(x) };
    let x_st = strides(&x)[1];
    let (cos, sin) = (dense(cos.clone()), dense(sin.clone()));
    require(is_dense(&cos) && is_dense(&sin), || "tables not dense".into())?;
    let out = empty_like_device(&x, d, DType::BF16);
    let (mut px, mut pc, mut ps, mut py) = (ptr(&x)?, ptr(&cos)?, ptr(&sin)?, ptr(&out)?);
    require([px, pc, ps, py].iter().all(|p| p % 16 == 0), || "misaligned".into())?;
    let rows = batch * tokens * heads;
    require(tokens <= i32::MAX as usize && heads <= i32::MAX as usize, || format!("shape {:?}", dims(&out)))?;
    let (mut nrows, mut nh, mut nt, mut nd) = (rows as i64, heads as i32, tokens as i32, dh as i32);
    let (mut st, mut f32t) = (x_st as i64, f32_tables as i32);
    let blocks = grid_stride_blocks(rows * dh / 16);
    with_gpu(x.device.index, |dev| {
        let f = dev.function(MODULE, kernels::ELEMENTWISE, "rotary_half", 0)?;
        dev.begin(&x)?;
        // SAFETY: `out` holds `rows·head_dim` bf16 values and lives until this function returns.
        unsafe { dev.poison(py, rows * dh) }?;
        let mut args = [
            &mut px as *mut u64 as *mut c_void,
            &mut pc as *mut u64 as *mut c_void,
            &mut ps as *mut u64 as *mut c_void,
            &mut py as *mut u64 as *mut c_void,
            &mut nrows as *mut i64 as *mut c_void,
            &mut nh as *mut i32 as *mut c_void,
            &mut nt as *mut i32 as *mut c_void,
            &mut nd as *mut i32 as *mut c_void,
            &mut st as *mut i64 as *mut c_void,
            &mut f32t as *mut i32 as *mut c_void,
        ];
        // SAFETY: the arguments match `rotary_half(const bf16*, const void*, const void*, bf16*, i64, int, int, int,
        // i64, int)` in type and order. `x` holds `batch·tokens` rows `x_st` apart (a multiple of 8), each of `heads`
        // runs of `head_dim` contiguous bf16 values; `cos`/`sin` are dense `[tokens, head_dim]` in f32 exactly when
        // `f32_tables`, else bf16; `out` is dense `[rows, head_dim]`. All are 16-byte aligned with `head_dim` a
        // multiple of 16 (16-byte loads of 8 bf16 or 4 f32 at every offset the kernel uses) and held until this
        // function returns.
        unsafe { dev.launch(f, (blocks, 1, 1), (256, 1, 1), 0, &mut args) }?;
        dev.end()
    })?;
    drop((x, cos, sin));
    Ok(out)
}
