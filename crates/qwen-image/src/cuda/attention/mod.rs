//! `attend` / `attend_blocks` through our flash-attention kernels (`kernels/flash_attention*.cu`); [`attend`] is
//! the single entry point and documents the dispatch.

mod blocks;
mod fp8;
mod params;

use std::ffi::c_void;

use burn::tensor::{DType, Tensor};
use cudarc::driver::sys;

pub(crate) use blocks::attend_blocks_prim;
use params::{tensor_map, FlashParams, KvSeg, Operand, TmaMaps, VtParams};

use super::{
    config::FlashKernel,
    error::{require, FastError},
    fast_or,
    gpu::Gpu,
    kernels,
    registry::{enabled, with_gpu, Kind},
    tensor::{dims, empty_like_device, inner_contiguous, prim, prim_bool, ptr, strides, wrap, Prim},
    CudaBackend,
};
use crate::ops::{lowered, portable, AttentionOptions, KvSegment};

/// Segments the kernels address in place (more are concatenated first).
pub(crate) const MAX_SEGS: usize = 4;
/// Queries per block of every flash kernel.
const BM: usize = 128;
/// Keys per tile of the mma.sync kernel (and of the TMA kernel's mask summary, which it does not use).
const BN: usize = 64;
/// Keys per tile of the wgmma kernel.
const BN_WGMMA: usize = 128;
const THREADS: u32 = 256;
const MODULE: &str = "flash_attention";
const MODULE_WGMMA: &str = "flash_attention_wgmma";
const MODULE_TMA: &str = "flash_attention_tma";
/// Dynamic shared memory of the TMA kernel: the most a block may have (its alignment slack, Q, the K and V rings
/// and the barriers take 161 KiB with two stages, 225 KiB with three).
const TMA_SMEM: u32 = 227 * 1024;
/// Dynamic shared memory of the wgmma kernel: Q, two K and two V tiles of 128 × 128 bf16, 1 KiB alignment slack.
const WGMMA_SMEM: u32 = 5 * 128 * 256 + 1024;

type B = CudaBackend;

/// Attention of `query` over the key/value `segments` for [`CudaBackend`]
/// ([`QwenBackend::attend`](crate::ops::QwenBackend::attend)). Dispatch, first match wins:
///
/// 1. A head dimension no flash kernel covers (the VAE's single 384-wide head), without key mask and not causal,
///    with the `gemm` kind on: [`lowered::attention`], two cuBLASLt GEMMs and a softmax per head (burn's attention
///    autotunes for minutes per shape, and can panic, burn#5187).
/// 2. The `attention` kind off on this device, or inputs the flash kernels do not cover (dtype, layout, shapes,
///    mask): [`portable::attention`] (booked as a fallback; a CUDA error also switches the kind off).
/// 3. Flash attention. More than [`MAX_SEGS`] segments: the tail is concatenated into the last one; empty
///    segments are dropped. The kernel:
///    - head dim 128 on sm_90 with [`FlashKernel::Auto`] or [`FlashKernel::TmaSerial`], when every operand can be
///      described by a TMA tensor map: the warp-specialized TMA kernel (`flash_fwd_tma_d128`, or
///      `flash_fwd_tma_d128_serial`), which reads a key mask per element on the tiles it masks;
///    - else head dim 128 on sm_90 unless [`FlashKernel::Mma`]: the cp.async warpgroup-MMA kernel
///      (`flash_fwd_wgmma_d128`), after `flash_vt_transpose` copies V transposed into a zero-padded buffer;
///    - else the mma.sync kernel of the head dim (`flash_fwd_d{16,32,64,80,128}`).
///
///    With a key mask, the last two first run `flash_mask_tiles`, a per-tile summary with which they skip the
///    masking of fully attended tiles.
///
///    With [`AttentionOptions::fp8`]: the FP8 kernel (`flash_fwd_fp8_d128`, [`fp8`]) for head dim 128 on sm_90
///    without causality; anything else computes the host emulation ([`portable::attention`]).
pub(crate) fn attend(
    query: Tensor<B, 4>,
    segments: &[KvSegment<B>],
    options: &AttentionOptions<B>,
) -> Tensor<B, 4> {
    let device = query.device();
    let head_dim = query.dims()[3];
    if mma_kernel(head_dim).is_none()
        && !options.fp8
        && options.key_mask.is_none()
        && !options.causal
        && enabled(device.index, Kind::Gemm)
    {
        return lowered::attention(query, segments);
    }
    let flash = |query: &Tensor<B, 4>| {
        let (segs, mask) = (kernel_segments(segments), options.key_mask.clone().map(prim_bool));
        match options.fp8 {
            true => fp8::flash_attention_fp8(prim(query.clone()), segs, mask, options.causal),
            false => flash_attention(prim(query.clone()), segs, mask, options.causal),
        }
        .map(wrap)
    };
    fast_or(&device, Kind::Attention, query, flash, |query| portable::attention(query, segments, options))
}

/// The segments as the kernels take them: at most [`MAX_SEGS`], the tail concatenated into the last one.
fn kernel_segments(segments: &[KvSegment<B>]) -> Vec<(Prim, Prim)> {
    let mut segs: Vec<(Prim, Prim)> =
        segments.iter().map(|s| (prim(s.key.clone()), prim(s.value.clone()))).collect();
    if segs.len() > MAX_SEGS {
        let cut = MAX_SEGS - 1;
        let k = Tensor::cat(segments[cut..].iter().map(|s| s.key.clone()).collect(), 1);
        let v = Tensor::cat(segments[cut..].iter().map(|s| s.value.clone()).collect(), 1);
        segs.truncate(cut);
        segs.push((prim(k), prim(v)));
    }
    segs
}

/// The mma.sync kernel for `head_dim`, if one is compiled.
fn mma_kernel(head_dim: usize) -> Option<&'static str> {
    Some(match head_dim {
        128 => "flash_fwd_d128",
        80 => "flash_fwd_d80",
        64 => "flash_fwd_d64",
        32 => "flash_fwd_d32",
        16 => "flash_fwd_d16",
        _ => return None,
    })
}

/// Dynamic shared memory of the mma.sync kernel for `head_dim` (Q tile + one K and one V tile, rows padded by 8).
fn mma_smem(head_dim: usize) -> u32 {
    ((BM + 2 * BN) * (head_dim + 8) * 2) as u32
}

/// The shape of one attention call, checked.
struct Problem {
    batch: usize,
    q_len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Keys of all segments.
    total: usize,
}

impl Problem {
    fn check(q: &Prim, segments: &[(Prim, Prim)], causal: bool) -> Result<Problem, FastError> {
        let qd = dims(q);
        require(qd.len() == 4, || format!("query shape {qd:?}"))?;
        let (batch, q_len, heads, head_dim) = (qd[0], qd[1], qd[2], qd[3]);
        require(mma_kernel(head_dim).is_some(), || format!("head_dim {head_dim}"))?;
        require(!segments.is_empty() && segments.len() <= MAX_SEGS, || {
            format!("{} segments", segments.len())
        })?;
        let kv_heads = dims(&segments[0].0)[2];
        require(kv_heads > 0 && heads % kv_heads == 0, || format!("{heads} heads over {kv_heads} kv heads"))?;
        let mut total = 0usize;
        for (k, v) in segments {
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
        Ok(Problem { batch, q_len, heads, kv_heads, head_dim, total })
    }
}

/// The flash kernel that serves a call.
enum Flash {
    /// The warp-specialized TMA kernel (Hopper, head dim 128), with the call's tensor maps.
    Tma { maps: Box<TmaMaps>, serial: bool },
    /// The cp.async warpgroup-MMA kernel (Hopper, head dim 128).
    Wgmma,
    /// The mma.sync kernel of the head dim.
    Mma,
}

impl Flash {
    /// The kernel for `p` on device `index` (see [`attend`]); `maps` makes the TMA kernel's tensor maps.
    fn choose(
        index: usize,
        p: &Problem,
        maps: impl FnOnce() -> Result<TmaMaps, FastError>,
    ) -> Result<Flash, FastError> {
        let hopper_choice = if p.head_dim == 128 {
            with_gpu(index, |g| Ok((g.cc() == (9, 0)).then_some(g.config().flash_kernel)))?
        } else {
            None
        };
        Ok(match hopper_choice {
            Some(choice @ (FlashKernel::Auto | FlashKernel::TmaSerial)) => match maps() {
                Ok(maps) => Flash::Tma { maps: Box::new(maps), serial: choice == FlashKernel::TmaSerial },
                Err(e) => {
                    log::debug!("qwen-image: TMA attention unavailable ({e}), using the cp.async kernel");
                    Flash::Wgmma
                }
            },
            Some(FlashKernel::Wgmma) => Flash::Wgmma,
            Some(FlashKernel::Mma) | None => Flash::Mma,
        })
    }

    /// Keys per tile (of the key-mask summary).
    fn tile(&self) -> usize {
        if matches!(self, Flash::Wgmma) {
            BN_WGMMA
        } else {
            BN
        }
    }

    /// (module, source, kernel, dynamic shared memory, threads per block) for head dim `head_dim`.
    fn entry(
        &self,
        head_dim: usize,
    ) -> Result<(&'static str, &'static str, &'static str, u32, u32), FastError> {
        Ok(match self {
            Flash::Tma { serial: true, .. } => {
                (MODULE_TMA, kernels::FLASH_TMA, "flash_fwd_tma_d128_serial", TMA_SMEM, 384)
            }
            Flash::Tma { serial: false, .. } => {
                (MODULE_TMA, kernels::FLASH_TMA, "flash_fwd_tma_d128", TMA_SMEM, 384)
            }
            Flash::Wgmma => (MODULE_WGMMA, kernels::FLASH_WGMMA, "flash_fwd_wgmma_d128", WGMMA_SMEM, THREADS),
            Flash::Mma => {
                let name = mma_kernel(head_dim)
                    .ok_or_else(|| FastError::unsupported(format!("head_dim {head_dim}")))?;
                (MODULE, kernels::FLASH_ATTENTION, name, mma_smem(head_dim), THREADS)
            }
        })
    }
}

/// The key mask's buffers: the mask (made inner-contiguous) and, for the kernels that use it, its per-tile summary.
struct MaskBuffers {
    _mask: Prim,
    tiles: Option<(Prim, usize)>,
}

/// Points `params` at the `[batch, total]` byte mask `m` and, for kernels that skip fully attended tiles
/// (`summary_tile`: their keys per tile), at a new per-tile summary (filled by `flash_mask_tiles`). The TMA kernels
/// read the mask per element on the tiles they mask.
fn key_mask(
    m: Prim,
    p: &Problem,
    summary_tile: Option<usize>,
    params: &mut FlashParams,
) -> Result<MaskBuffers, FastError> {
    let md = dims(&m);
    require(md == [p.batch, p.total], || format!("key mask {md:?}, expected [{}, {}]", p.batch, p.total))?;
    require(matches!(m.dtype, DType::Bool(_) | DType::U8), || format!("mask dtype {:?}", m.dtype))?;
    require(m.dtype.size() == 1, || "mask elements must be bytes".into())?;
    let m = inner_contiguous(m);
    params.mask = ptr(&m)?;
    params.mask_sb = strides(&m)[0] as i64;
    let tiles = match summary_tile {
        None => None,
        Some(tile) => {
            let n_tiles = p.total.div_ceil(tile);
            let tiles = empty_like_device(&m, vec![p.batch, n_tiles], DType::U8);
            params.mask_tile_full = ptr(&tiles)?;
            params.n_mask_tiles = n_tiles as i32;
            Some((tiles, n_tiles))
        }
    };
    Ok(MaskBuffers { _mask: m, tiles })
}

/// Flash attention over at most [`MAX_SEGS`] key segments (see [`attend`]). `segments` are `(key, value)`
/// primitives; `mask` is a `[batch, total_keys]` bool primitive (`true` = attend).
fn flash_attention(
    q: Prim,
    segments: Vec<(Prim, Prim)>,
    mask: Option<Prim>,
    causal: bool,
) -> Result<Prim, FastError> {
    flash_attention_scaled(q, segments, mask, causal, None)
}

/// [`flash_attention`] with the softmax's scale (`log2(e)/√d` folded in) given instead of the head dim's: for
/// operands zero-padded to a wider head ([`blocks`]).
fn flash_attention_scaled(
    q: Prim,
    segments: Vec<(Prim, Prim)>,
    mask: Option<Prim>,
    causal: bool,
    scale_log2: Option<f32>,
) -> Result<Prim, FastError> {
    let Call { p, qo, out, mut params, keep } = Call::new(q, segments, causal)?;
    if let Some(scale) = scale_log2 {
        params.scale_log2 = scale;
    }
    let po = params.o;
    let index = qo.t.device.index;
    let mut kernel = Flash::choose(index, &p, || {
        let mut maps = TmaMaps { q: tensor_map(&qo, &dims(&qo.t))?, ..Default::default() };
        for (i, (ko, vo)) in keep.iter().enumerate() {
            maps.k[i] = tensor_map(ko, &dims(&ko.t))?;
            maps.v[i] = tensor_map(vo, &dims(&vo.t))?;
        }
        Ok(maps)
    })?;
    let summary_tile = (!matches!(kernel, Flash::Tma { .. })).then(|| kernel.tile());
    let mask = mask.map(|m| key_mask(m, &p, summary_tile, &mut params)).transpose()?;
    // The cp.async wgmma kernel reads V transposed: Vt[b, kv_head, d, key], keys padded with zeros to whole tiles.
    let mut vt = None;
    if matches!(kernel, Flash::Wgmma) {
        let kpad = p.total.div_ceil(BN_WGMMA) * BN_WGMMA;
        let buffer = empty_like_device(&qo.t, vec![p.batch, p.kv_heads, p.head_dim, kpad], DType::BF16);
        let vtp = VtParams { vt: ptr(&buffer)?, kpad: kpad as i64, kv_heads: p.kv_heads as i32, pad: 0 };
        vt = Some((buffer, vtp));
    }
    let (module, source, name, smem, threads) = kernel.entry(p.head_dim)?;
    let grid = (p.q_len.div_ceil(BM) as u32, p.heads as u32, p.batch as u32);
    with_gpu(index, |dev| {
        let f = dev.function(module, source, name, smem)?;
        let mask_tiles = match mask.as_ref().and_then(|m| m.tiles.as_ref()) {
            Some((_, n_tiles)) => {
                Some((dev.function(MODULE, kernels::FLASH_ATTENTION, "flash_mask_tiles", 0)?, *n_tiles))
            }
            None => None,
        };
        let transpose = match &vt {
            Some(_) => Some(dev.function(MODULE_WGMMA, kernels::FLASH_WGMMA, "flash_vt_transpose", 0)?),
            None => None,
        };
        dev.begin(&qo.t)?;
        // SAFETY: `out` holds `batch·q_len·heads·head_dim` bf16 values and lives until this function returns.
        unsafe { dev.poison(po, p.batch * p.q_len * p.heads * p.head_dim) }?;
        if let Some((mf, n_tiles)) = mask_tiles {
            launch_mask_tiles(dev, mf, &params, p.batch, n_tiles, kernel.tile())?;
        }
        match (&mut kernel, &mut vt, transpose) {
            (Flash::Tma { maps, .. }, _, _) => launch_tma(dev, f, &mut params, maps, grid, threads, smem),
            (Flash::Wgmma, Some((_, vtp)), Some(tf)) => {
                launch_wgmma(dev, (tf, f), &mut params, vtp, grid, (p.kv_heads, p.batch), smem)
            }
            (Flash::Mma, _, _) => launch_mma(dev, f, &mut params, grid, smem),
            (Flash::Wgmma, _, _) => Err(FastError::cuda("wgmma attention without its V buffer")),
        }?;
        dev.end()
    })?;
    // The inputs and scratch buffers stay alive until every launch reading them is queued (burn's allocator then
    // reuses them only for work ordered after ours).
    drop((qo, keep, mask, vt));
    Ok(out)
}

/// One call's checked shape, operands, output and kernel parameters (keys, segments, launch shape filled; the
/// mask is the kernel's to add).
struct Call {
    p: Problem,
    qo: Operand,
    /// The bf16 output `[batch, q_len, heads, head_dim]` (`params.o`).
    out: Prim,
    params: FlashParams,
    /// The key/value operands `params.seg` points into.
    keep: Vec<(Operand, Operand)>,
}

impl Call {
    fn new(q: Prim, segments: Vec<(Prim, Prim)>, causal: bool) -> Result<Call, FastError> {
        let p = Problem::check(&q, &segments, causal)?;
        let qo = Operand::new(q)?;
        let out = empty_like_device(&qo.t, vec![p.batch, p.q_len, p.heads, p.head_dim], DType::BF16);
        let mut params = FlashParams {
            total_keys: p.total as i32,
            kv_group: (p.heads / p.kv_heads) as i32,
            causal: i32::from(causal),
            n_blocks: p.batch as i32,
            ..FlashParams::new(&qo, ptr(&out)?, p.q_len, p.heads, p.head_dim)
        };
        let keep = fill_segments(&mut params, segments)?;
        Ok(Call { p, qo, out, params, keep })
    }
}

/// Points `params.seg` at the non-empty `segments` (empty ones hold no keys and cannot have a tensor map), each
/// with its first logical key; returns their operands, which the caller holds until its launches are queued.
fn fill_segments(
    params: &mut FlashParams,
    segments: Vec<(Prim, Prim)>,
) -> Result<Vec<(Operand, Operand)>, FastError> {
    let segments: Vec<(Prim, Prim)> = segments.into_iter().filter(|(k, _)| dims(k)[1] > 0).collect();
    params.n_segs = segments.len() as i32;
    let mut keep = Vec::with_capacity(segments.len());
    let mut start = 0usize;
    for (i, (k, v)) in segments.into_iter().enumerate() {
        let (ko, vo) = (Operand::new(k)?, Operand::new(v)?);
        let len = dims(&ko.t)[1];
        params.seg[i] = KvSeg::new(&ko, &vo, start, len);
        start += len;
        keep.push((ko, vo));
    }
    Ok(keep)
}

/// `flash_mask_tiles`: the per-tile summary of the key mask `params.mask` into `params.mask_tile_full`.
fn launch_mask_tiles(
    dev: &Gpu<'_>,
    f: sys::CUfunction,
    params: &FlashParams,
    batch: usize,
    n_tiles: usize,
    tile: usize,
) -> Result<(), FastError> {
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
    // SAFETY: the arguments match `flash_mask_tiles(const u8*, i64, int, int, int, int, u8*)` in type and order;
    // the mask (`[batch, total_keys]` bytes, row stride `mask_sb`) and the `[batch, n_tiles]` summary are buffers
    // the caller holds (`MaskBuffers`) until the launch is queued; one warp per (row, tile).
    unsafe { dev.launch(f, (warps.div_ceil(8), 1, 1), (256, 1, 1), 0, &mut args) }
}

/// The TMA kernel `f` (`flash_fwd_tma_d128[_serial]`).
fn launch_tma(
    dev: &Gpu<'_>,
    f: sys::CUfunction,
    params: &mut FlashParams,
    maps: &mut TmaMaps,
    grid: (u32, u32, u32),
    threads: u32,
    smem: u32,
) -> Result<(), FastError> {
    let mut args = [params as *mut FlashParams as *mut c_void, maps as *mut TmaMaps as *mut c_void];
    // SAFETY: `(FlashParams, TmaMaps)` by value is the kernel's signature, with both layouts checked against the
    // C++ structs at compile time; the tensor maps and `params` point into the query, key/value segments and the
    // output, which the caller holds until the launch is queued, with the shapes `Problem::check` verified.
    unsafe { dev.launch(f, grid, (threads, 1, 1), smem, &mut args) }
}

/// The V transpose and the cp.async wgmma kernel: `(transpose, main)`; `(kv_heads, batch)` size the transpose.
fn launch_wgmma(
    dev: &Gpu<'_>,
    (transpose, main): (sys::CUfunction, sys::CUfunction),
    params: &mut FlashParams,
    vtp: &mut VtParams,
    grid: (u32, u32, u32),
    (kv_heads, batch): (usize, usize),
    smem: u32,
) -> Result<(), FastError> {
    let mut args = [params as *mut FlashParams as *mut c_void, vtp as *mut VtParams as *mut c_void];
    let tgrid = ((vtp.kpad / 64) as u32, kv_heads as u32, batch as u32);
    // SAFETY: `(FlashParams, VtParams)` by value is the signature of both kernels, with both layouts checked
    // against the C++ structs at compile time; `vtp.vt` is a `[batch, kv_heads, 128, kpad]` buffer and `params`
    // points into the inputs and the output, all held by the caller until the launches are queued. The transpose
    // runs first on our stream, so the main kernel reads a complete Vt.
    unsafe { dev.launch(transpose, tgrid, (256, 1, 1), 0, &mut args) }?;
    let mut args = [params as *mut FlashParams as *mut c_void, vtp as *mut VtParams as *mut c_void];
    // SAFETY: as above.
    unsafe { dev.launch(main, grid, (THREADS, 1, 1), smem, &mut args) }
}

/// The mma.sync kernel `f` of the head dim.
fn launch_mma(
    dev: &Gpu<'_>,
    f: sys::CUfunction,
    params: &mut FlashParams,
    grid: (u32, u32, u32),
    smem: u32,
) -> Result<(), FastError> {
    let mut args = [params as *mut FlashParams as *mut c_void];
    // SAFETY: a `FlashParams` by value is the kernel's signature, its layout checked against the C++ struct at
    // compile time; it points into the query, key/value segments, output (and mask summary), held by the caller
    // until the launch is queued, with the shapes `Problem::check` verified.
    unsafe { dev.launch(f, grid, (THREADS, 1, 1), smem, &mut args) }
}
