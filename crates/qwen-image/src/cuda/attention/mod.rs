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
const MODULE_TMA: &str = "flash_attention_tma";
/// Keys per tile of the wgmma kernel.
const BN_WGMMA: usize = 128;

/// Which flash-attention kernel serves head dimension 128 on Hopper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashKernel {
    /// On sm_90 the warp-specialized TMA kernel (`flash_fwd_tma_d128`), the mma.sync kernel elsewhere (the default).
    Auto,
    /// On sm_90 the TMA kernel without intra-warpgroup overlap (`flash_fwd_tma_d128_serial`), for comparison.
    TmaSerial,
    /// On sm_90 the earlier warpgroup-MMA kernel that loads with `cp.async` (`flash_fwd_wgmma_d128`).
    Wgmma,
    /// Always the mma.sync (FlashAttention-2 style) kernel.
    Mma,
}

impl FlashKernel {
    const ALL: [FlashKernel; 4] =
        [FlashKernel::Auto, FlashKernel::TmaSerial, FlashKernel::Wgmma, FlashKernel::Mma];

    /// Parses `QWEN_FLASH` values: `auto`/`tma`, `tma-serial`, `wgmma`, `mma`.
    pub fn parse(s: &str) -> Option<FlashKernel> {
        Some(match s {
            "auto" | "tma" => FlashKernel::Auto,
            "tma-serial" => FlashKernel::TmaSerial,
            "wgmma" => FlashKernel::Wgmma,
            "mma" => FlashKernel::Mma,
            _ => return None,
        })
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            FlashKernel::Auto => "tma",
            FlashKernel::TmaSerial => "tma-serial",
            FlashKernel::Wgmma => "wgmma",
            FlashKernel::Mma => "mma.sync",
        }
    }
}

static KERNEL: AtomicU8 = AtomicU8::new(0xff);

/// The flash kernel choice: [`set_flash_kernel`], else `QWEN_FLASH` (see [`FlashKernel::parse`]), else
/// [`FlashKernel::Auto`].
pub fn flash_kernel() -> FlashKernel {
    match KERNEL.load(Ordering::Relaxed) {
        i if (i as usize) < FlashKernel::ALL.len() => FlashKernel::ALL[i as usize],
        _ => {
            let k = std::env::var("QWEN_FLASH")
                .ok()
                .and_then(|s| FlashKernel::parse(&s))
                .unwrap_or(FlashKernel::Auto);
            set_flash_kernel(k);
            k
        }
    }
}

/// Chooses the flash kernel (tests and benchmarks run each).
pub fn set_flash_kernel(k: FlashKernel) {
    let i = FlashKernel::ALL.iter().position(|&x| x == k).unwrap_or(0);
    KERNEL.store(i as u8, Ordering::Relaxed);
}

/// The driver's opaque tensor map, laid out as the kernels' `TensorMap` (128 bytes, 64-byte aligned).
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
struct TensorMap([u64; 16]);

/// The TMA kernel's tensor maps (`TmaMaps` in `flash_attention_tma.cu`).
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
struct TmaMaps {
    q: TensorMap,
    k: [TensorMap; MAX_SEGS],
    v: [TensorMap; MAX_SEGS],
}

/// Dynamic shared memory of the TMA kernel: the most a block may have (its alignment slack, Q, the K and V rings
/// and the barriers take 161 KiB with two stages, 225 KiB with three).
const TMA_SMEM: u32 = 227 * 1024;

/// A tensor map over a `[batch, tokens, heads, 128]` operand: boxes of 64 head-dim columns x 1 head x 128 tokens,
/// 128-byte swizzle, rows past the end read as zeros.
fn tensor_map(o: &Operand, dims: &[usize]) -> Result<TensorMap, FastError> {
    use cudarc::driver::sys;
    let gdim: [u64; 4] = [dims[3] as u64, dims[2] as u64, dims[1] as u64, dims[0] as u64];
    let gstride: [u64; 3] = [2 * o.sh as u64, 2 * o.st as u64, 2 * o.sb as u64];
    let bx: [u32; 4] = [64, 1, 128, 1];
    let es: [u32; 4] = [1; 4];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            4,
            o.ptr as *mut c_void,
            gdim.as_ptr(),
            gstride.as_ptr(),
            bx.as_ptr(),
            es.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(FastError::unsupported(format!(
            "tensor map for dims {dims:?} strides {gstride:?}: {r:?}"
        )));
    }
    Ok(TensorMap(unsafe { map.assume_init() }.opaque))
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

/// The mma.sync kernel for `head_dim`, if one is compiled.
pub(crate) fn kernel_name(head_dim: usize) -> Option<&'static str> {
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
        total_keys: total as i32,
        q_len: q_len as i32,
        kv_group: (heads / kv_heads) as i32,
        causal: i32::from(causal),
        n_blocks: batch as i32,
        scale_log2: std::f32::consts::LOG2_E / (head_dim as f32).sqrt(),
        ..Default::default()
    };
    // Empty segments hold no keys (and cannot have a tensor map).
    let segments: Vec<(Prim, Prim)> = segments.into_iter().filter(|(k, _)| dims(k)[1] > 0).collect();
    params.n_segs = segments.len() as i32;
    let mut keep = Vec::with_capacity(segments.len());
    let mut start = 0usize;
    for (i, (k, v)) in segments.into_iter().enumerate() {
        let (ko, vo) = (operand(k)?, operand(v)?);
        let len = dims(&ko.t)[1];
        params.seg[i] = KvSeg::new(&ko, &vo, start, len);
        start += len;
        keep.push((ko, vo));
    }
    let hopper = head_dim == 128 && with_device(qo.t.device.index, |d| Ok(d.cc == (9, 0)))?;
    let choice = flash_kernel();
    // The TMA kernel needs a tensor map per operand; a layout the copy engine cannot describe falls back to the
    // cp.async wgmma kernel.
    let all_maps = || -> Result<TmaMaps, FastError> {
        let mut maps = TmaMaps { q: tensor_map(&qo, &qd)?, ..Default::default() };
        for (i, (ko, vo)) in keep.iter().enumerate() {
            maps.k[i] = tensor_map(ko, &dims(&ko.t))?;
            maps.v[i] = tensor_map(vo, &dims(&vo.t))?;
        }
        Ok(maps)
    };
    let mut tma_maps = if hopper && matches!(choice, FlashKernel::Auto | FlashKernel::TmaSerial) {
        all_maps().ok()
    } else {
        None
    };
    let wgmma = hopper && tma_maps.is_none() && choice != FlashKernel::Mma;
    let tile = if wgmma { BN_WGMMA } else { BN };
    let n_tiles = total.div_ceil(tile);
    let mut mask_keep = None;
    if let Some(m) = mask {
        let md = dims(&m);
        require(md == [batch, total], || format!("key mask {md:?}, expected [{batch}, {total}]"))?;
        require(matches!(m.dtype, DType::Bool(_) | DType::U8), || format!("mask dtype {:?}", m.dtype))?;
        require(m.dtype.size() == 1, || "mask elements must be bytes".into())?;
        let m = inner_contiguous(m);
        params.mask = ptr(&m)?;
        params.mask_sb = strides(&m)[0] as i64;
        // The TMA kernel reads the mask per element on the tiles it masks; the others skip fully attended tiles
        // with a per-tile summary.
        let tiles = if tma_maps.is_none() {
            let tiles = empty_like_device(&m, vec![batch, n_tiles], DType::U8);
            params.mask_tile_full = ptr(&tiles)?;
            params.n_mask_tiles = n_tiles as i32;
            Some(tiles)
        } else {
            None
        };
        mask_keep = Some((m, tiles));
    }
    // The cp.async wgmma kernel reads V transposed: Vt[b, kv_head, d, key], keys padded with zeros to whole tiles.
    let mut vt_keep = None;
    let mut vtp = VtParams::default();
    if wgmma {
        let kpad = total.div_ceil(BN_WGMMA) * BN_WGMMA;
        let vt = empty_like_device(&qo.t, vec![batch, kv_heads, head_dim, kpad], DType::BF16);
        vtp = VtParams { vt: ptr(&vt)?, kpad: kpad as i64, kv_heads: kv_heads as i32, pad: 0 };
        vt_keep = Some(vt);
    }

    let grid = (q_len.div_ceil(BM) as u32, heads as u32, batch as u32);
    let (module, source, smem, name, threads) = match (&tma_maps, wgmma) {
        (Some(_), _) => {
            let name = if choice == FlashKernel::TmaSerial {
                "flash_fwd_tma_d128_serial"
            } else {
                "flash_fwd_tma_d128"
            };
            (MODULE_TMA, kernels::FLASH_TMA, TMA_SMEM, name, 384)
        }
        (None, true) => (
            MODULE_WGMMA,
            kernels::FLASH_WGMMA,
            (5 * 128 * 256 + 1024) as u32,
            "flash_fwd_wgmma_d128",
            THREADS,
        ),
        (None, false) => (MODULE, kernels::FLASH_ATTENTION, smem_bytes(head_dim), name, THREADS),
    };
    with_device(qo.t.device.index, |dev| {
        let f = dev.function(module, source, name)?;
        dev.set_smem((module, name), f, smem)?;
        let mask_fn = match &mask_keep {
            Some((_, Some(_))) => Some(dev.function(MODULE, kernels::FLASH_ATTENTION, "flash_mask_tiles")?),
            _ => None,
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
        if let Some(maps) = tma_maps.as_mut() {
            let mut args =
                [&mut params as *mut FlashParams as *mut c_void, maps as *mut TmaMaps as *mut c_void];
            unsafe { dev.launch(f, grid, (threads, 1, 1), smem, &mut args)? };
        } else if let Some(tf) = vt_fn {
            let mut args =
                [&mut params as *mut FlashParams as *mut c_void, &mut vtp as *mut VtParams as *mut c_void];
            let tgrid = ((vtp.kpad / 64) as u32, kv_heads as u32, batch as u32);
            unsafe { dev.launch(tf, tgrid, (256, 1, 1), 0, &mut args)? };
            let mut args =
                [&mut params as *mut FlashParams as *mut c_void, &mut vtp as *mut VtParams as *mut c_void];
            unsafe { dev.launch(f, grid, (threads, 1, 1), smem, &mut args)? };
        } else {
            let mut args = [&mut params as *mut FlashParams as *mut c_void];
            unsafe { dev.launch(f, grid, (threads, 1, 1), smem, &mut args)? };
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
