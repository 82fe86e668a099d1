//! `attend` / `attend_blocks` through our flash-attention kernel (`kernels/flash_attention.cu`).

use std::{
    ffi::c_void,
    sync::atomic::{AtomicU8, Ordering},
};

use burn::tensor::{DType, Int, Tensor, TensorData};

use super::{
    device::with_device,
    error::{require, FastError},
    kernels,
    tensor::{dims, empty_like_device, inner_contiguous, is_bf16, ptr, strides, Prim},
    CudaBackend,
};

/// Segments the kernel addresses in place (more are concatenated first).
pub(crate) const MAX_SEGS: usize = 4;
const BM: usize = 128;
const BN: usize = 64;
const THREADS: u32 = 256;
const MODULE: &str = "flash_attention";
const MODULE_WGMMA: &str = "flash_attention_wgmma";
/// Keys per tile of the wgmma kernel.
const BN_WGMMA: usize = 128;

/// Which flash-attention kernel serves head dimension 128 on Hopper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashKernel {
    /// The warpgroup-MMA kernel on sm_90 (`flash_fwd_wgmma_d128`), the mma.sync kernel elsewhere (the default).
    Auto,
    /// Always the mma.sync (FlashAttention-2 style) kernel.
    Mma,
}

static KERNEL: AtomicU8 = AtomicU8::new(0xff);

/// The flash kernel choice: [`set_flash_kernel`], else `QWEN_FLASH=mma`, else [`FlashKernel::Auto`].
pub fn flash_kernel() -> FlashKernel {
    match KERNEL.load(Ordering::Relaxed) {
        0 => FlashKernel::Auto,
        1 => FlashKernel::Mma,
        _ => {
            let k = if std::env::var("QWEN_FLASH").as_deref() == Ok("mma") {
                FlashKernel::Mma
            } else {
                FlashKernel::Auto
            };
            set_flash_kernel(k);
            k
        }
    }
}

/// Chooses the flash kernel (tests and benchmarks run both).
pub fn set_flash_kernel(k: FlashKernel) {
    KERNEL.store(if k == FlashKernel::Mma { 1 } else { 0 }, Ordering::Relaxed);
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct VtParams {
    vt: u64,
    kpad: i64,
    kv_heads: i32,
    pad: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct KvSeg {
    k: u64,
    v: u64,
    k_sb: i64,
    k_st: i64,
    k_sh: i64,
    v_sb: i64,
    v_st: i64,
    v_sh: i64,
    start: i32,
    len: i32,
}

impl KvSeg {
    /// The segment of logical keys `start..start + len`, read from the key and value operands in place.
    fn new(k: &Operand, v: &Operand, start: usize, len: usize) -> Self {
        KvSeg {
            k: k.ptr,
            v: v.ptr,
            k_sb: k.sb,
            k_st: k.st,
            k_sh: k.sh,
            v_sb: v.sb,
            v_st: v.st,
            v_sh: v.sh,
            start: start as i32,
            len: len as i32,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FlashParams {
    q: u64,
    o: u64,
    mask: u64,
    mask_tile_full: u64,
    cu_seqlens: u64,
    q_sb: i64,
    q_st: i64,
    q_sh: i64,
    o_sb: i64,
    o_st: i64,
    o_sh: i64,
    mask_sb: i64,
    seg: [KvSeg; MAX_SEGS],
    n_segs: i32,
    total_keys: i32,
    q_len: i32,
    kv_group: i32,
    causal: i32,
    n_blocks: i32,
    scale_log2: f32,
    n_mask_tiles: i32,
}

fn kernel_name(head_dim: usize) -> Option<&'static str> {
    Some(match head_dim {
        128 => "flash_fwd_d128",
        80 => "flash_fwd_d80",
        64 => "flash_fwd_d64",
        32 => "flash_fwd_d32",
        16 => "flash_fwd_d16",
        _ => return None,
    })
}

/// Dynamic shared memory of the kernel for `head_dim` (Q tile + one K and one V tile, rows padded by 8).
fn smem_bytes(head_dim: usize) -> u32 {
    ((BM + 2 * BN) * (head_dim + 8) * 2) as u32
}

/// A `[batch, tokens, heads, head_dim]` operand: its inner axis made contiguous, pointer and strides.
struct Operand {
    t: Prim,
    ptr: u64,
    sb: i64,
    st: i64,
    sh: i64,
}

fn operand(t: Prim) -> Result<Operand, FastError> {
    require(is_bf16(&t), || format!("dtype {:?}", t.dtype))?;
    let t = inner_contiguous(t);
    let s = strides(&t);
    require(s.len() == 4 && (s[3] == 1 || dims(&t)[3] == 1), || "operand layout".into())?;
    // cp.async moves 16 bytes: every row must start 16-byte aligned.
    require(s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0, || format!("strides {s:?} not multiples of 8"))?;
    let p = ptr(&t)?;
    require(p % 16 == 0, || "operand not 16-byte aligned".into())?;
    Ok(Operand { ptr: p, sb: s[0] as i64, st: s[1] as i64, sh: s[2] as i64, t })
}

/// Flash attention over key segments; see [`crate::ops::QwenBackend::attend`].
///
/// `segments` are `(key, value)` primitives; `mask` is a `[batch, total_keys]` bool primitive (`true` = attend).
pub(crate) fn attend_prim(
    q: Prim,
    segments: Vec<(Prim, Prim)>,
    mask: Option<Prim>,
    causal: bool,
) -> Result<Prim, FastError> {
    let qd = dims(&q);
    require(qd.len() == 4, || format!("query shape {qd:?}"))?;
    let (batch, q_len, heads, head_dim) = (qd[0], qd[1], qd[2], qd[3]);
    let name = kernel_name(head_dim).ok_or_else(|| FastError::unsupported(format!("head_dim {head_dim}")))?;
    require(!segments.is_empty() && segments.len() <= MAX_SEGS, || format!("{} segments", segments.len()))?;
    let kv_heads = dims(&segments[0].0)[2];
    require(kv_heads > 0 && heads % kv_heads == 0, || format!("{heads} heads over {kv_heads} kv heads"))?;
    let mut total = 0usize;
    for (k, v) in &segments {
        let (kd, vd) = (dims(k), dims(v));
        require(
            kd == vd && kd.len() == 4 && kd[0] == batch && kd[2] == kv_heads && kd[3] == head_dim,
            || format!("segment shapes {kd:?} / {vd:?} for query {qd:?}"),
        )?;
        total += kd[1];
    }
    require(q_len > 0 && total > 0, || "empty attention".into())?;
    require(!causal || q_len == total, || format!("causal with {q_len} queries over {total} keys"))?;
    require(total < i32::MAX as usize && q_len < i32::MAX as usize, || "too long".into())?;

    let qo = operand(q)?;
    let out = empty_like_device(&qo.t, vec![batch, q_len, heads, head_dim], DType::BF16);
    let po = ptr(&out)?;
    let mut params = FlashParams {
        q: qo.ptr,
        o: po,
        q_sb: qo.sb,
        q_st: qo.st,
        q_sh: qo.sh,
        o_sb: (q_len * heads * head_dim) as i64,
        o_st: (heads * head_dim) as i64,
        o_sh: head_dim as i64,
        n_segs: segments.len() as i32,
        total_keys: total as i32,
        q_len: q_len as i32,
        kv_group: (heads / kv_heads) as i32,
        causal: i32::from(causal),
        n_blocks: batch as i32,
        scale_log2: std::f32::consts::LOG2_E / (head_dim as f32).sqrt(),
        ..Default::default()
    };
    let mut keep = Vec::with_capacity(2 * segments.len());
    let mut start = 0usize;
    for (i, (k, v)) in segments.into_iter().enumerate() {
        let (ko, vo) = (operand(k)?, operand(v)?);
        let len = dims(&ko.t)[1];
        params.seg[i] = KvSeg::new(&ko, &vo, start, len);
        start += len;
        keep.push(ko.t);
        keep.push(vo.t);
    }
    let wgmma = head_dim == 128
        && flash_kernel() == FlashKernel::Auto
        && with_device(qo.t.device.index, |d| Ok(d.cc == (9, 0)))?;
    let tile = if wgmma { BN_WGMMA } else { BN };
    let n_tiles = total.div_ceil(tile);
    let mut mask_keep = None;
    if let Some(m) = mask {
        let md = dims(&m);
        require(md == [batch, total], || format!("key mask {md:?}, expected [{batch}, {total}]"))?;
        require(matches!(m.dtype, DType::Bool(_) | DType::U8), || format!("mask dtype {:?}", m.dtype))?;
        require(m.dtype.size() == 1, || "mask elements must be bytes".into())?;
        let m = inner_contiguous(m);
        let tiles = empty_like_device(&m, vec![batch, n_tiles], DType::U8);
        params.mask = ptr(&m)?;
        params.mask_sb = strides(&m)[0] as i64;
        params.mask_tile_full = ptr(&tiles)?;
        params.n_mask_tiles = n_tiles as i32;
        mask_keep = Some((m, tiles));
    }
    // The wgmma kernel reads V transposed: Vt[b, kv_head, d, key], keys padded with zeros to whole tiles.
    let mut vt_keep = None;
    let mut vtp = VtParams::default();
    if wgmma {
        let kpad = total.div_ceil(BN_WGMMA) * BN_WGMMA;
        let vt = empty_like_device(&qo.t, vec![batch, kv_heads, head_dim, kpad], DType::BF16);
        vtp = VtParams { vt: ptr(&vt)?, kpad: kpad as i64, kv_heads: kv_heads as i32, pad: 0 };
        vt_keep = Some(vt);
    }

    let grid = (q_len.div_ceil(BM) as u32, heads as u32, batch as u32);
    let (module, source, smem) = if wgmma {
        (MODULE_WGMMA, kernels::FLASH_WGMMA, (5 * 128 * 256 + 1024) as u32)
    } else {
        (MODULE, kernels::FLASH_ATTENTION, smem_bytes(head_dim))
    };
    let name = if wgmma { "flash_fwd_wgmma_d128" } else { name };
    with_device(qo.t.device.index, |dev| {
        let f = dev.function(module, source, name)?;
        dev.set_smem((module, name), f, smem)?;
        let mask_fn = match mask_keep {
            Some(_) => Some(dev.function(MODULE, kernels::FLASH_ATTENTION, "flash_mask_tiles")?),
            None => None,
        };
        let vt_fn = if wgmma {
            Some(dev.function(MODULE_WGMMA, kernels::FLASH_WGMMA, "flash_vt_transpose")?)
        } else {
            None
        };
        dev.begin(&qo.t)?;
        dev.poison(po, batch * q_len * heads * head_dim)?;
        if let Some(mf) = mask_fn {
            let (mut m, mut sb, mut tk, mut nt, mut b, mut tl, mut o) = (
                params.mask,
                params.mask_sb,
                params.total_keys,
                params.n_mask_tiles,
                batch as i32,
                tile as i32,
                params.mask_tile_full,
            );
            let warps = (batch * n_tiles) as u32;
            let mut args = [
                &mut m as *mut u64 as *mut c_void,
                &mut sb as *mut i64 as *mut c_void,
                &mut tk as *mut i32 as *mut c_void,
                &mut nt as *mut i32 as *mut c_void,
                &mut b as *mut i32 as *mut c_void,
                &mut tl as *mut i32 as *mut c_void,
                &mut o as *mut u64 as *mut c_void,
            ];
            unsafe { dev.launch(mf, (warps.div_ceil(8), 1, 1), (256, 1, 1), 0, &mut args)? };
        }
        if let Some(tf) = vt_fn {
            let mut args =
                [&mut params as *mut FlashParams as *mut c_void, &mut vtp as *mut VtParams as *mut c_void];
            let tgrid = ((vtp.kpad / 64) as u32, kv_heads as u32, batch as u32);
            unsafe { dev.launch(tf, tgrid, (256, 1, 1), 0, &mut args)? };
            let mut args =
                [&mut params as *mut FlashParams as *mut c_void, &mut vtp as *mut VtParams as *mut c_void];
            unsafe { dev.launch(f, grid, (THREADS, 1, 1), smem, &mut args)? };
        } else {
            let mut args = [&mut params as *mut FlashParams as *mut c_void];
            unsafe { dev.launch(f, grid, (THREADS, 1, 1), smem, &mut args)? };
        }
        dev.end()
    })?;
    drop((qo, keep, mask_keep, vt_keep));
    Ok(out)
}

/// Block-diagonal flash attention; see [`crate::ops::QwenBackend::attend_blocks`].
pub(crate) fn attend_blocks_prim(q: Prim, k: Prim, v: Prim, cu_seqlens: &[usize]) -> Result<Prim, FastError> {
    let qd = dims(&q);
    require(qd.len() == 4 && qd[0] == 1 && dims(&k) == qd && dims(&v) == qd, || format!("shapes {qd:?}"))?;
    let (tokens, heads, head_dim) = (qd[1], qd[2], qd[3]);
    let name = kernel_name(head_dim).ok_or_else(|| FastError::unsupported(format!("head_dim {head_dim}")))?;
    require(
        cu_seqlens.len() >= 2
            && cu_seqlens[0] == 0
            && *cu_seqlens.last().unwrap_or(&0) == tokens
            && cu_seqlens.windows(2).all(|w| w[1] >= w[0]),
        || format!("cu_seqlens {cu_seqlens:?} for {tokens} tokens"),
    )?;
    require(tokens < i32::MAX as usize, || "too long".into())?;
    let n_blocks = cu_seqlens.len() - 1;
    let max_len = cu_seqlens.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    require(max_len > 0, || "empty blocks".into())?;

    let (qo, ko, vo) = (operand(q)?, operand(k)?, operand(v)?);
    let device = qo.t.device.clone();
    let cu: Vec<i32> = cu_seqlens.iter().map(|&c| c as i32).collect();
    let cu = Tensor::<CudaBackend, 1, Int>::from_data(TensorData::new(cu, [n_blocks + 1]), &device);
    let cu = cu.into_primitive();
    require(cu.dtype == DType::I32, || format!("cu_seqlens dtype {:?}", cu.dtype))?;
    let out = empty_like_device(&qo.t, vec![1, tokens, heads, head_dim], DType::BF16);
    let mut params = FlashParams {
        q: qo.ptr,
        o: ptr(&out)?,
        cu_seqlens: ptr(&cu)?,
        q_sb: qo.sb,
        q_st: qo.st,
        q_sh: qo.sh,
        o_sb: (tokens * heads * head_dim) as i64,
        o_st: (heads * head_dim) as i64,
        o_sh: head_dim as i64,
        n_segs: 1,
        total_keys: tokens as i32,
        q_len: tokens as i32,
        kv_group: 1,
        causal: 0,
        n_blocks: n_blocks as i32,
        scale_log2: std::f32::consts::LOG2_E / (head_dim as f32).sqrt(),
        ..Default::default()
    };
    params.seg[0] = KvSeg::new(&ko, &vo, 0, tokens);
    let grid = (max_len.div_ceil(BM) as u32, heads as u32, n_blocks as u32);
    let smem = smem_bytes(head_dim);
    with_device(device.index, |dev| {
        let f = dev.function(MODULE, kernels::FLASH_ATTENTION, name)?;
        dev.set_smem((MODULE, name), f, smem)?;
        dev.begin(&qo.t)?;
        dev.poison(params.o, tokens * heads * head_dim)?;
        let mut args = [&mut params as *mut FlashParams as *mut c_void];
        unsafe { dev.launch(f, grid, (THREADS, 1, 1), smem, &mut args)? };
        dev.end()
    })?;
    drop((qo, ko, vo, cu));
    Ok(out)
}
