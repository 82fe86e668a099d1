//! The fused elementwise kernels of `kernels/elementwise.cu`: adaLN (LayerNorm + modulation), gated residual,
//! QK-RMSNorm + RoPE, SiLU-gated product.

use std::ffi::c_void;

use burn::tensor::DType;

use super::{
    error::{require, FastError},
    gpu::Gpu,
    kernels,
    registry::with_gpu,
    tensor::{dense, dims, empty_like_device, inner_contiguous, is_bf16, is_dense, ptr, strides, Prim},
};

/// The module name of `kernels/elementwise.cu` (its kernels are compiled once per device under it; `rotary.rs`
/// launches from it too).
pub(super) const MODULE: &str = "elementwise";
const MAX_RUNS: usize = 8;
const ROW_THREADS: u32 = 128;
/// Widest row of the row kernels (`ROW_THREADS` threads × 8 vectors × 8 elements).
const MAX_DIM: usize = 128 * 8 * 8;

/// `Runs` of `elementwise.cu`: token runs and the modulation row each uses.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Runs {
    n: i32,
    end: [i32; MAX_RUNS],
    row: [i32; MAX_RUNS],
}

assert_layout!(Runs: size 68, align 4 { n @ 0, end @ 4, row @ 36 });

fn runs_of(runs: &[(usize, usize)], tokens: usize, rows: usize) -> Result<Runs, FastError> {
    let mut r = Runs::default();
    let runs: Vec<(usize, usize)> = runs.iter().copied().filter(|&(len, _)| len > 0).collect();
    if runs.is_empty() {
        r.n = 1;
        r.end[0] = tokens as i32;
        return Ok(r);
    }
    require(runs.len() <= MAX_RUNS, || format!("{} modulation runs", runs.len()))?;
    let mut end = 0usize;
    for (i, &(len, row)) in runs.iter().enumerate() {
        require(row < rows, || format!("modulation row {row} of {rows}"))?;
        end += len;
        r.end[i] = end as i32;
        r.row[i] = row as i32;
    }
    require(end == tokens, || format!("runs cover {end} tokens, the input has {tokens}"))?;
    r.n = runs.len() as i32;
    Ok(r)
}

/// A `[batch, tokens, dim]` activation whose rows are 16-byte aligned with a contiguous inner axis.
struct Rows {
    t: Prim,
    ptr: u64,
    sb: i64,
    st: i64,
}

fn rows(t: Prim, batch: usize, tokens: usize, dim: usize) -> Result<Rows, FastError> {
    require(is_bf16(&t), || format!("dtype {:?}", t.dtype))?;
    require(dims(&t) == [batch, tokens, dim], || {
        format!("shape {:?}, expected {:?}", dims(&t), [batch, tokens, dim])
    })?;
    let t = inner_contiguous(t);
    let s = strides(&t);
    require(s[2] == 1 && s[0] % 8 == 0 && s[1] % 8 == 0, || format!("strides {s:?}"))?;
    let p = ptr(&t)?;
    require(p % 16 == 0, || "rows not 16-byte aligned".into())?;
    Ok(Rows { sb: s[0] as i64, st: s[1] as i64, ptr: p, t })
}

/// A `[rows, batch, dim]` modulation tensor (a column slice of the modulation linear's output).
fn modulation(t: &Prim, batch: usize, dim: usize) -> Result<(Prim, u64, i64, i64), FastError> {
    require(is_bf16(t), || format!("dtype {:?}", t.dtype))?;
    let d = dims(t);
    require(d.len() == 3 && d[1] == batch && d[2] == dim, || format!("modulation shape {d:?}"))?;
    let t = inner_contiguous(t.clone());
    let s = strides(&t);
    require(s[2] == 1 && s[0] % 8 == 0 && s[1] % 8 == 0, || format!("modulation strides {s:?}"))?;
    let p = ptr(&t)?;
    require(p % 16 == 0, || "modulation not 16-byte aligned".into())?;
    // A single row (or batch item) may carry any stride; make it harmless.
    let (sr, sb) = (if d[0] == 1 { 0 } else { s[0] as i64 }, if d[1] == 1 { 0 } else { s[1] as i64 });
    Ok((t, p, sr, sb))
}

/// `LnModParams` of `elementwise.cu` (`ln_modulate`, `ln_modulate_3072`).
#[repr(C)]
#[derive(Clone, Copy)]
struct LnModParams {
    x: u64,
    y: u64,
    shift: u64,
    scale: u64,
    x_sb: i64,
    x_st: i64,
    sh_sr: i64,
    sh_sb: i64,
    sc_sr: i64,
    sc_sb: i64,
    s: i32,
    d: i32,
    eps: f32,
    pad: i32,
    runs: Runs,
}

assert_layout!(LnModParams: size 168, align 8 {
    x @ 0, y @ 8, shift @ 16, scale @ 24, x_sb @ 32, x_st @ 40, sh_sr @ 48, sh_sb @ 56, sc_sr @ 64, sc_sb @ 72,
    s @ 80, d @ 84, eps @ 88, pad @ 92, runs @ 96,
});

/// `Fp8Rows` of `elementwise.cu`: where the FP8 adaLN kernels write the e4m3 rows and their scales.
#[repr(C)]
#[derive(Clone, Copy)]
struct Fp8Rows {
    q: u64,
    scale: u64,
}

assert_layout!(Fp8Rows: size 16, align 8 { q @ 0, scale @ 8 });

/// See [`crate::ops::QwenBackend::layer_norm_modulate`].
pub(crate) fn layer_norm_modulate_prim(
    x: Prim,
    shift: &Prim,
    scale: &Prim,
    runs: &[(usize, usize)],
    eps: f64,
) -> Result<Prim, FastError> {
    let (out, _) = ln_modulate(x, shift, scale, runs, eps, true, false)?;
    out.ok_or_else(|| FastError::unsupported("no output"))
}

/// See [`crate::ops::QwenBackend::layer_norm_modulate_fp8`]: the bf16 output when `dense`, the e4m3 rows (u8
/// `[batch, tokens, dim]`) and their f32 scales (`[batch, tokens]`), from one kernel (sm_89+).
pub(crate) fn layer_norm_modulate_fp8_prim(
    x: Prim,
    shift: &Prim,
    scale: &Prim,
    runs: &[(usize, usize)],
    eps: f64,
    dense: bool,
) -> Result<(Option<Prim>, Prim, Prim), FastError> {
    let (out, q) = ln_modulate(x, shift, scale, runs, eps, dense, true)?;
    let (bits, scales) = q.ok_or_else(|| FastError::unsupported("no FP8 output"))?;
    Ok((out, bits, scales))
}

/// The adaLN kernels: the bf16 output when `dense`, the e4m3 rows and their scales when `fp8`.
#[allow(clippy::type_complexity)]
fn ln_modulate(
    x: Prim,
    shift: &Prim,
    scale: &Prim,
    runs: &[(usize, usize)],
    eps: f64,
    dense: bool,
    fp8: bool,
) -> Result<(Option<Prim>, Option<(Prim, Prim)>), FastError> {
    let xd = dims(&x);
    require(xd.len() == 3, || format!("shape {xd:?}"))?;
    let (batch, tokens, dim) = (xd[0], xd[1], xd[2]);
    require(dim % 8 == 0 && dim <= MAX_DIM && tokens > 0 && batch > 0, || format!("dim {dim}"))?;
    require(tokens < 65536 && batch < 65536, || "grid too large".into())?;
    let x = rows(x, batch, tokens, dim)?;
    let (sh, psh, sh_sr, sh_sb) = modulation(shift, batch, dim)?;
    let (sc, psc, sc_sr, sc_sb) = modulation(scale, batch, dim)?;
    let runs = runs_of(runs, tokens, dims(&sh)[0].min(dims(&sc)[0]))?;
    let out = dense.then(|| empty_like_device(&x.t, vec![batch, tokens, dim], DType::BF16));
    let q = fp8.then(|| {
        let bits = empty_like_device(&x.t, vec![batch, tokens, dim], DType::U8);
        (bits, empty_like_device(&x.t, vec![batch, tokens], DType::F32))
    });
    let mut p = LnModParams {
        x: x.ptr,
        y: out.as_ref().map(ptr).transpose()?.unwrap_or(0),
        shift: psh,
        scale: psc,
        x_sb: x.sb,
        x_st: x.st,
        sh_sr,
        sh_sb,
        sc_sr,
        sc_sb,
        s: tokens as i32,
        d: dim as i32,
        eps: eps as f32,
        pad: 0,
        runs,
    };
    let mut o = match &q {
        Some((bits, scales)) => Fp8Rows { q: ptr(bits)?, scale: ptr(scales)? },
        None => Fp8Rows { q: 0, scale: 0 },
    };
    require(o.q % 8 == 0, || "e4m3 rows not 8-byte aligned".into())?;
    with_gpu(x.t.device.index, |dev| {
        if fp8 {
            super::fp8::require_e4m3(dev)?;
        }
        // Rows of the DiT's width fit a kernel with a third of the registers (more blocks in flight).
        let name = match (fp8, dim <= 3072) {
            (false, true) => "ln_modulate_3072",
            (false, false) => "ln_modulate",
            (true, true) => "ln_modulate_fp8_3072",
            (true, false) => "ln_modulate_fp8",
        };
        let f = dev.function(MODULE, kernels::ELEMENTWISE, name, 0)?;
        dev.begin(&x.t)?;
        if dense {
            // SAFETY: `out` holds `batch·tokens·dim` bf16 values and lives until this function returns.
            unsafe { dev.poison(p.y, batch * tokens * dim) }?;
        }
        let mut args = [&mut p as *mut LnModParams as *mut c_void, &mut o as *mut Fp8Rows as *mut c_void];
        let args = if fp8 { &mut args[..] } else { &mut args[..1] };
        // SAFETY: an `LnModParams` by value (and for the FP8 kernels an `Fp8Rows` by value) is the kernel's
        // signature (layouts checked on both sides at compile time). It points at `x` and the modulation tensors,
        // whose shapes, 16-byte alignment and strides `rows` and `modulation` checked, whose runs `runs_of` checked
        // against their rows, at the dense output (null only for an FP8 kernel, which then writes no bf16 row) and
        // at the new e4m3 rows (`batch·tokens·dim` bytes, 8-byte aligned) and scales (`batch·tokens` f32); all are
        // held until this function returns. One block per (token, batch item) row, `dim` ≤ `MAX_DIM`.
        unsafe { dev.launch(f, (tokens as u32, batch as u32, 1), (ROW_THREADS, 1, 1), 0, args) }?;
        dev.end()
    })?;
    drop((x, sh, sc));
    Ok((out, q))
}

/// `GatedParams` of `elementwise.cu` (`gated_residual`).
#[repr(C)]
#[derive(Clone, Copy)]
struct GatedParams {
    res: u64,
    y: u64,
    gate: u64,
    out: u64,
    r_sb: i64,
    r_st: i64,
    y_sb: i64,
    y_st: i64,
    g_sr: i64,
    g_sb: i64,
    s: i32,
    d: i32,
    runs: Runs,
}

assert_layout!(GatedParams: size 160, align 8 {
    res @ 0, y @ 8, gate @ 16, out @ 24, r_sb @ 32, r_st @ 40, y_sb @ 48, y_st @ 56, g_sr @ 64, g_sb @ 72, s @ 80,
    d @ 84, runs @ 88,
});

/// See [`crate::ops::QwenBackend::gated_residual`].
pub(crate) fn gated_residual_prim(
    residual: Prim,
    y: Prim,
    gate: &Prim,
    runs: &[(usize, usize)],
) -> Result<Prim, FastError> {
    let rd = dims(&residual);
    require(rd.len() == 3, || format!("shape {rd:?}"))?;
    let (batch, tokens, dim) = (rd[0], rd[1], rd[2]);
    require(dim % 8 == 0 && tokens > 0 && batch > 0, || format!("dim {dim}"))?;
    require(tokens < 65536 && batch < 65536, || "grid too large".into())?;
    let r = rows(residual, batch, tokens, dim)?;
    let yv = rows(y, batch, tokens, dim)?;
    let (g, pg, g_sr, g_sb) = modulation(gate, batch, dim)?;
    let runs = runs_of(runs, tokens, dims(&g)[0])?;
    let out = empty_like_device(&r.t, vec![batch, tokens, dim], DType::BF16);
    let mut p = GatedParams {
        res: r.ptr,
        y: yv.ptr,
        gate: pg,
        out: ptr(&out)?,
        r_sb: r.sb,
        r_st: r.st,
        y_sb: yv.sb,
        y_st: yv.st,
        g_sr,
        g_sb,
        s: tokens as i32,
        d: dim as i32,
        runs,
    };
    with_gpu(r.t.device.index, |dev| {
        let f = dev.function(MODULE, kernels::ELEMENTWISE, "gated_residual", 0)?;
        dev.begin(&r.t)?;
        // SAFETY: `out` holds `batch·tokens·dim` bf16 values and lives until this function returns.
        unsafe { dev.poison(p.out, batch * tokens * dim) }?;
        let mut args = [&mut p as *mut GatedParams as *mut c_void];
        // SAFETY: a `GatedParams` by value is the kernel's signature (layout checked on both sides at compile time).
        // It points at the residual, `y` and the gate, whose shapes, alignment and strides `rows` and `modulation`
        // checked (runs checked by `runs_of`), and at the dense output; all are held until this function returns.
        unsafe { dev.launch(f, (tokens as u32, batch as u32, 1), (ROW_THREADS, 1, 1), 0, &mut args) }?;
        dev.end()
    })?;
    drop((r, yv, g));
    Ok(out)
}

/// `RmsRopeParams` of `elementwise.cu` (`rms_norm_rope`).
#[repr(C)]
#[derive(Clone, Copy)]
struct RmsRopeParams {
    x: u64,
    y: u64,
    w: u64,
    cos: u64,
    sin: u64,
    x_sb: i64,
    x_st: i64,
    x_sh: i64,
    y_sb: i64,
    y_st: i64,
    y_sh: i64,
    s: i32,
    h: i32,
    dh: i32,
    eps: f32,
    batch: i32,
    pad: i32,
}

assert_layout!(RmsRopeParams: size 112, align 8 {
    x @ 0, y @ 8, w @ 16, cos @ 24, sin @ 32, x_sb @ 40, x_st @ 48, x_sh @ 56, y_sb @ 64, y_st @ 72, y_sh @ 80,
    s @ 88, h @ 92, dh @ 96, eps @ 100, batch @ 104, pad @ 108,
});

/// One run of tokens of [`rms_norm_rope_cat_prim`]: input, weight, eps, cos and sin tables.
pub(crate) struct NormRopePart<'a> {
    pub x: Prim,
    pub weight: &'a Prim,
    pub eps: f64,
    pub cos: &'a Prim,
    pub sin: &'a Prim,
}

/// See [`crate::ops::QwenBackend::rms_norm_rope`].
pub(crate) fn rms_norm_rope_prim(
    x: Prim,
    weight: &Prim,
    eps: f64,
    cos: &Prim,
    sin: &Prim,
) -> Result<Prim, FastError> {
    rms_norm_rope_cat_prim(vec![NormRopePart { x, weight, eps, cos, sin }])
}

/// See [`crate::ops::QwenBackend::rms_norm_rope_cat`]: every part is normalized and rotated straight into its rows
/// of one `[batch, Σ tokens, heads, head_dim]` output.
pub(crate) fn rms_norm_rope_cat_prim(parts: Vec<NormRopePart<'_>>) -> Result<Prim, FastError> {
    require(!parts.is_empty(), || "no parts".into())?;
    let d0 = dims(&parts[0].x);
    require(d0.len() == 4, || format!("shape {d0:?}"))?;
    let (batch, heads, dh) = (d0[0], d0[2], d0[3]);
    // Each lane of a warp holds 2 (head_dim ≤ 64) or 4 (head_dim 128) consecutive elements.
    require(matches!(dh, 16 | 32 | 64 | 128), || format!("head_dim {dh}"))?;
    let per = if dh == 128 { 4 } else { 2 };
    let half = dh / 2;
    let mut total = 0usize;
    let mut prepared = Vec::with_capacity(parts.len());
    for part in parts {
        let xd = dims(&part.x);
        require(xd.len() == 4 && xd[0] == batch && xd[2] == heads && xd[3] == dh, || {
            format!("part shape {xd:?} with {d0:?}")
        })?;
        require(is_bf16(&part.x) && is_bf16(part.weight), || format!("dtype {:?}", part.x.dtype))?;
        let tokens = xd[1];
        for t in [part.cos, part.sin] {
            require(t.dtype == DType::F32 && dims(t) == [tokens, half], || {
                format!("rope table {:?} {:?}, expected f32 [{tokens}, {half}]", t.dtype, dims(t))
            })?;
        }
        require(dims(part.weight) == [dh], || format!("weight {:?}", dims(part.weight)))?;
        let x = inner_contiguous(part.x);
        let xs = strides(&x);
        require(xs[3] == 1 && xs[0..3].iter().all(|s| s % per == 0), || format!("strides {xs:?}"))?;
        let (cos, sin, w) = (dense(part.cos.clone()), dense(part.sin.clone()), dense(part.weight.clone()));
        require(is_dense(&cos) && is_dense(&sin) && is_dense(&w), || "tables not dense".into())?;
        prepared.push((x, xs, cos, sin, w, part.eps, total, tokens));
        total += tokens;
    }
    require(batch * total * heads > 0, || "empty".into())?;
    require(batch * total < i32::MAX as usize, || "grid too large".into())?;
    let out = empty_like_device(&prepared[0].0, vec![batch, total, heads, dh], DType::BF16);
    let py = ptr(&out)?;
    let mut launches = Vec::with_capacity(prepared.len());
    for (x, xs, cos, sin, w, eps, start, tokens) in &prepared {
        let px = ptr(x)?;
        require(px % (2 * per as u64) == 0, || "input misaligned".into())?;
        if *tokens == 0 {
            continue;
        }
        let params = RmsRopeParams {
            x: px,
            y: py + (start * heads * dh * 2) as u64,
            w: ptr(w)?,
            cos: ptr(cos)?,
            sin: ptr(sin)?,
            x_sb: xs[0] as i64,
            x_st: xs[1] as i64,
            x_sh: xs[2] as i64,
            y_sb: (total * heads * dh) as i64,
            y_st: (heads * dh) as i64,
            y_sh: dh as i64,
            s: *tokens as i32,
            h: heads as i32,
            dh: dh as i32,
            eps: *eps as f32,
            batch: batch as i32,
            pad: 0,
        };
        // One warp per token, four per block.
        launches.push((params, ((batch * tokens) as u64).div_ceil(4) as u32));
    }
    with_gpu(out.device.index, |dev| {
        let f = dev.function(MODULE, kernels::ELEMENTWISE, "rms_norm_rope", 0)?;
        dev.begin(&out)?;
        // SAFETY: `out` holds `batch·total·heads·head_dim` bf16 values and lives until this function returns.
        unsafe { dev.poison(py, batch * total * heads * dh) }?;
        for (params, blocks) in &mut launches {
            let mut args = [params as *mut RmsRopeParams as *mut c_void];
            // SAFETY: an `RmsRopeParams` by value is the kernel's signature (layout checked on both sides at compile
            // time). It points at one part's input (strides and alignment checked), its dense weight and f32
            // `[tokens, head_dim / 2]` tables, and at that part's rows `start..start + tokens` of the output; all
            // are held (`prepared`, `out`) until this function returns. One warp per token.
            unsafe { dev.launch(f, (*blocks, 1, 1), (128, 1, 1), 0, &mut args) }?;
        }
        dev.end()
    })?;
    drop(prepared);
    Ok(out)
}

/// See [`crate::ops::QwenBackend::silu_mul`].
pub(crate) fn silu_mul_prim(gate: Prim, up: Prim) -> Result<Prim, FastError> {
    require(is_bf16(&gate) && is_bf16(&up), || format!("dtypes {:?} / {:?}", gate.dtype, up.dtype))?;
    let d = dims(&gate);
    require(d == dims(&up) && d.len() == 3, || format!("shapes {d:?} / {:?}", dims(&up)))?;
    let n: usize = d.iter().product();
    require(n > 0 && n % 8 == 0, || format!("{n} elements"))?;
    let (g, u) = (dense(gate), dense(up));
    require(is_dense(&g) && is_dense(&u), || "inputs not dense".into())?;
    let out = empty_like_device(&g, d, DType::BF16);
    let (mut pg, mut pu, mut po, mut nn) = (ptr(&g)?, ptr(&u)?, ptr(&out)?, n as i64);
    require(pg % 16 == 0 && pu % 16 == 0 && po % 16 == 0, || "misaligned".into())?;
    let blocks = grid_stride_blocks(n / 8);
    with_gpu(g.device.index, |dev| {
        let f = dev.function(MODULE, kernels::ELEMENTWISE, "silu_mul", 0)?;
        dev.begin(&g)?;
        // SAFETY: `out` holds `n` bf16 values and lives until this function returns.
        unsafe { dev.poison(po, n) }?;
        let mut args = [
            &mut pg as *mut u64 as *mut c_void,
            &mut pu as *mut u64 as *mut c_void,
            &mut po as *mut u64 as *mut c_void,
            &mut nn as *mut i64 as *mut c_void,
        ];
        // SAFETY: the arguments match `silu_mul(const bf16*, const bf16*, bf16*, i64)` in type and order; the
        // three buffers are dense, 16-byte aligned, hold `n` bf16 values each (a multiple of 8: the kernel moves 8
        // at a time) and are held until this function returns.
        unsafe { dev.launch(f, (blocks, 1, 1), (256, 1, 1), 0, &mut args) }?;
        dev.end()
    })?;
    drop((g, u));
    Ok(out)
}

/// See [`crate::ops::QwenBackend::rms_norm`]: `x [batch, tokens, dim]` bf16, `weight [dim]` bf16.
pub(crate) fn rms_norm_prim(x: Prim, weight: &Prim, eps: f64) -> Result<Prim, FastError> {
    require(is_bf16(&x) && is_bf16(weight), || format!("dtypes {:?} / {:?}", x.dtype, weight.dtype))?;
    let d = dims(&x);
    require(d.len() == 3, || format!("input shape {d:?}"))?;
    let (rows, dim) = (d[0] * d[1], d[2]);
    require(dims(weight) == [dim], || format!("weight shape {:?} for rows of {dim}", dims(weight)))?;
    require(dim % 8 == 0 && dim <= MAX_DIM && rows > 0 && rows <= i32::MAX as usize, || {
        format!("shape {d:?}")
    })?;
    let (x, weight) = (dense(x), dense(weight.clone()));
    require(is_dense(&x) && is_dense(&weight), || "inputs not dense".into())?;
    let out = empty_like_device(&x, d, DType::BF16);
    let (mut px, mut pw, mut py) = (ptr(&x)?, ptr(&weight)?, ptr(&out)?);
    require(px % 16 == 0 && pw % 16 == 0 && py % 16 == 0, || "misaligned".into())?;
    let (mut nd, mut e) = (dim as i32, eps as f32);
    with_gpu(x.device.index, |dev| {
        let f = dev.function(MODULE, kernels::ELEMENTWISE, "rms_norm_rows", 0)?;
        dev.begin(&x)?;
        // SAFETY: `out` holds `rows·dim` bf16 values and lives until this function returns.
        unsafe { dev.poison(py, rows * dim) }?;
        let mut args = [
            &mut px as *mut u64 as *mut c_void,
            &mut pw as *mut u64 as *mut c_void,
            &mut py as *mut u64 as *mut c_void,
            &mut nd as *mut i32 as *mut c_void,
            &mut e as *mut f32 as *mut c_void,
        ];
        // SAFETY: the arguments match `rms_norm_rows(const bf16*, const bf16*, bf16*, int, float)` in type and
        // order; `x` and `out` are dense `[rows, dim]` bf16 buffers and `weight` holds `dim` bf16 values, all 16-byte
        // aligned with `dim` a multiple of 8 and at most `MAX_DIM` (the row fits the block's registers); one block
        // per row; all are held until this function returns.
        unsafe { dev.launch(f, (rows as u32, 1, 1), (ROW_THREADS, 1, 1), 0, &mut args) }?;
        dev.end()
    })?;
    drop((x, weight));
    Ok(out)
}

/// See [`crate::ops::QwenBackend::channel_rms_norm`]: `x [batch, C, h, w]` bf16, `gamma [C]` bf16.
pub(crate) fn channel_rms_norm_prim(x: Prim, gamma: &Prim, silu: bool) -> Result<Prim, FastError> {
    require(is_bf16(&x) && is_bf16(gamma), || format!("dtypes {:?} / {:?}", x.dtype, gamma.dtype))?;
    let d = dims(&x);
    require(d.len() == 4, || format!("input shape {d:?}"))?;
    let (batch, c, hw) = (d[0], d[1], d[2] * d[3]);
    require(dims(gamma) == [c], || format!("gamma shape {:?} for {c} channels", dims(gamma)))?;
    require(batch > 0 && c > 0 && hw > 0 && hw % 8 == 0, || format!("shape {d:?} (h·w a multiple of 8)"))?;
    require(batch <= 65_535 && c <= i32::MAX as usize, || format!("shape {d:?}"))?;
    let (x, gamma) = (dense(x), dense(gamma.clone()));
    require(is_dense(&x) && is_dense(&gamma), || "inputs not dense".into())?;
    let out = empty_like_device(&x, d.clone(), DType::BF16);
    let (mut px, mut pg, mut py) = (ptr(&x)?, ptr(&gamma)?, ptr(&out)?);
    require(px % 16 == 0 && py % 16 == 0, || "misaligned".into())?;
    let (mut nc, mut nhw, mut scale, mut act) = (c as i32, hw as i64, (c as f32).sqrt(), silu as i32);
    let n = batch * c * hw;
    // 32 lanes × 8 pixels per block.
    let grid = ((hw / 8).div_ceil(32) as u32, batch as u32, 1);
    with_gpu(x.device.index, |dev| {
        let f = dev.function(MODULE, kernels::ELEMENTWISE, "channel_rms_norm", 0)?;
        dev.begin(&x)?;
        // SAFETY: `out` holds `n` bf16 values and lives until this function returns.
        unsafe { dev.poison(py, n) }?;
        let mut args = [
            &mut px as *mut u64 as *mut c_void,
            &mut pg as *mut u64 as *mut c_void,
            &mut py as *mut u64 as *mut c_void,
            &mut nc as *mut i32 as *mut c_void,
            &mut nhw as *mut i64 as *mut c_void,
            &mut scale as *mut f32 as *mut c_void,
            &mut act as *mut i32 as *mut c_void,
        ];
        // SAFETY: the arguments match `channel_rms_norm(const bf16*, const bf16*, bf16*, int, i64, float, int)` in
        // type and order; `x` and `out` are dense `[batch, C, hw]` bf16 buffers, 16-byte aligned with `hw` a
        // multiple of 8 (the kernel moves 8 pixels at a time), `gamma` holds `C` bf16 values; all are held until
        // this function returns.
        unsafe { dev.launch(f, grid, (256, 1, 1), 0, &mut args) }?;
        dev.end()
    })?;
    drop((x, gamma));
    Ok(out)
}

/// Blocks of 256 threads for a grid-stride kernel over `vectors` 16-byte vectors (`silu_mul`, `bias_add_nchw`): one
/// per 256 vectors, at most 16 per SM of an H100/H200 (132 SMs).
pub(super) fn grid_stride_blocks(vectors: usize) -> u32 {
    vectors.div_ceil(256).min(132 * 16) as u32
}

/// Queues `bias_add_nchw` on `dev`'s stream: `y [.., c, hw] += bias [c]` in place, rounded to bf16 (the bias of a
/// convolution whose output `y` was queued just before, see `cuda/conv.rs`).
pub(crate) fn queue_bias_add_nchw(
    dev: &mut Gpu<'_>,
    y: u64,
    bias: u64,
    c: usize,
    hw: usize,
    total: usize,
) -> Result<(), FastError> {
    require(y % 16 == 0 && hw % 8 == 0, || format!("bias add over {hw} pixels at {y:#x}"))?;
    let f = dev.function(MODULE, kernels::ELEMENTWISE, "bias_add_nchw", 0)?;
    let (mut py, mut pb, mut nc, mut nhw, mut n) = (y, bias, c as i32, hw as i64, total as i64);
    let mut args = [
        &mut py as *mut u64 as *mut c_void,
        &mut pb as *mut u64 as *mut c_void,
        &mut nc as *mut i32 as *mut c_void,
        &mut nhw as *mut i64 as *mut c_void,
        &mut n as *mut i64 as *mut c_void,
    ];
    // SAFETY: the arguments match `bias_add_nchw(bf16*, const bf16*, int, i64, i64)` in type and order; `y` is a
    // dense, 16-byte aligned `[n, c, hw]` bf16 buffer of `total` values with `hw` a multiple of 8 (checked above; the
    // kernel moves 8 values of one channel at a time), `bias` holds `c` bf16 values; the caller holds both until the
    // launch is queued.
    unsafe { dev.launch(f, (grid_stride_blocks(total / 8), 1, 1), (256, 1, 1), 0, &mut args) }
}
