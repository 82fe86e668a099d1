//! FP8 flash attention on Hopper (`kernels/flash_attention_fp8.cu`): the five passes that quantize the operands as
//! [`quant::attention`](crate::quant::attention) defines (Q per row in int8; the keys' mean; K minus it per row in
//! int8; V per column in e4m3, transposed into 32-key groups in the order the kernel's P fragments need), then the
//! warp-specialized kernel (int8 Q·Kᵀ, e4m3 P·V).

use std::ffi::c_void;

use burn::tensor::DType;

use super::{
    params::{encode_map, FlashParams, MapElement, TensorMap},
    Call, TMA_SMEM,
};
use crate::cuda::{
    error::{require, FastError},
    kernels,
    registry::with_gpu,
    tensor::{empty_like_device, ptr, Prim},
};

const MODULE: &str = "flash_attention_fp8";
/// Head dimension of the kernel (one 128-byte row of e4m3 per token and head).
const D: usize = 128;
/// Keys per tile (and the padding of the transposed V).
const TILE: usize = 128;
/// Keys per partial sum of the keys' mean ([`MEAN_BLOCK`](crate::quant::attention::MEAN_BLOCK), the kernel's).
const MEAN_BLOCK: usize = crate::quant::attention::MEAN_BLOCK;

/// `Fp8AttnParams` of `flash_attention_fp8.cu`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Fp8AttnParams {
    q8: u64,
    q_scale: u64,
    k8: u64,
    k_scale: u64,
    k_mean: u64,
    k_partial: u64,
    vt: u64,
    v_amax: u64,
    kpad: i64,
    heads: i32,
    kv_heads: i32,
    mean_blocks: i32,
    pad: i32,
}

assert_layout!(Fp8AttnParams: size 88, align 8 {
    q8 @ 0, q_scale @ 8, k8 @ 16, k_scale @ 24, k_mean @ 32, k_partial @ 40, vt @ 48, v_amax @ 56, kpad @ 64,
    heads @ 72, kv_heads @ 76, mean_blocks @ 80, pad @ 84,
});

/// `Fp8Maps` of `flash_attention_fp8.cu`.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
struct Fp8Maps {
    q: TensorMap,
    k: TensorMap,
    vt: TensorMap,
}

assert_layout!(Fp8Maps: size 384, align 64 { q @ 0, k @ 128, vt @ 256 });

/// The quantized operands of one call and their scratch, held until its launches are queued.
struct Buffers {
    q8: Prim,
    q_scale: Prim,
    k8: Prim,
    k_scale: Prim,
    k_mean: Prim,
    k_partial: Prim,
    vt: Prim,
    v_amax: Prim,
}

impl Buffers {
    /// New buffers for problem `p` (keys padded to `kpad`, `mean_blocks` partial sums per column) on `like`'s device,
    /// and the kernels' parameters pointing at them.
    fn new(
        like: &Prim,
        p: &super::Problem,
        kpad: usize,
        mean_blocks: usize,
    ) -> Result<(Self, Fp8AttnParams), FastError> {
        let new = |shape: Vec<usize>, dtype| empty_like_device(like, shape, dtype);
        let buffers = Buffers {
            q8: new(vec![p.batch, p.q_len, p.heads, D], DType::I8),
            q_scale: new(vec![p.batch, p.q_len, p.heads], DType::F32),
            k8: new(vec![p.batch, p.total, p.kv_heads, D], DType::I8),
            k_scale: new(vec![p.batch, p.kv_heads, kpad], DType::F32),
            k_mean: new(vec![p.batch, p.kv_heads, D], DType::F32),
            k_partial: new(vec![p.batch, p.kv_heads, mean_blocks, D], DType::F32),
            vt: new(vec![p.batch, p.kv_heads, D, kpad], DType::U8),
            v_amax: new(vec![p.batch, p.kv_heads, D], DType::F32),
        };
        let f = Fp8AttnParams {
            q8: ptr(&buffers.q8)?,
            q_scale: ptr(&buffers.q_scale)?,
            k8: ptr(&buffers.k8)?,
            k_scale: ptr(&buffers.k_scale)?,
            k_mean: ptr(&buffers.k_mean)?,
            k_partial: ptr(&buffers.k_partial)?,
            vt: ptr(&buffers.vt)?,
            v_amax: ptr(&buffers.v_amax)?,
            kpad: kpad as i64,
            heads: p.heads as i32,
            kv_heads: p.kv_heads as i32,
            mean_blocks: mean_blocks as i32,
            pad: 0,
        };
        Ok((buffers, f))
    }
}

impl Fp8Maps {
    /// The tensor maps of the quantized Q, K and transposed V that `f` points at, for problem `p`.
    fn new(f: &Fp8AttnParams, p: &super::Problem, kpad: usize) -> Result<Self, FastError> {
        let (b, lq, h, hk, lk) =
            (p.batch as u64, p.q_len as u64, p.heads as u64, p.kv_heads as u64, p.total as u64);
        let (row, kpad) = (D as u64, kpad as u64);
        let rows = |ptr, heads, tokens| {
            encode_map(
                ptr,
                MapElement::U8,
                [row, heads, tokens, b],
                [row, heads * row, tokens * heads * row],
                [128, 1, 128, 1],
            )
        };
        Ok(Fp8Maps {
            q: rows(f.q8, h, lq)?,
            k: rows(f.k8, hk, lk)?,
            vt: encode_map(
                f.vt,
                MapElement::U8,
                [kpad, row, hk, b],
                [kpad, row * kpad, hk * row * kpad],
                [128, 128, 1, 1],
            )?,
        })
    }
}

/// FP8 attention of bf16 `q` over at most [`MAX_SEGS`](super::MAX_SEGS) key segments (see
/// [`attend`](super::attend)); `mask` is a `[batch, total_keys]` bool primitive. Head dim 128, sm_90, not causal:
/// anything else is [`FastError::Unsupported`] (the caller falls back to the host emulation).
pub(super) fn flash_attention_fp8(
    q: Prim,
    segments: Vec<(Prim, Prim)>,
    mask: Option<Prim>,
    causal: bool,
) -> Result<Prim, FastError> {
    require(!causal, || "causal FP8 attention".into())?;
    let Call { p, qo, out, mut params, keep } = Call::new(q, segments, false)?;
    require(p.head_dim == D, || format!("FP8 attention with head_dim {}", p.head_dim))?;
    let index = qo.t.device.index;
    // sm_90: the warpgroup MMAs and TMA (and e4m3, which sm_89 already has).
    with_gpu(index, |g| {
        require(g.cc() == (9, 0), || format!("FP8 attention on compute capability {:?}", g.cc()))
    })?;
    let mask = mask.map(|m| super::key_mask(m, &p, None, &mut params)).transpose()?;
    let kpad = p.total.div_ceil(TILE) * TILE;
    let mean_blocks = p.total.div_ceil(MEAN_BLOCK);
    let (buffers, mut f) = Buffers::new(&qo.t, &p, kpad, mean_blocks)?;
    let mut maps = Fp8Maps::new(&f, &p, kpad)?;
    let rows = |n: usize| (n.div_ceil(8) as u32, 1, 1);
    with_gpu(index, |dev| {
        let quant_q = dev.function(MODULE, kernels::FLASH_FP8, "fp8_attn_quant_q", 0)?;
        let stats = dev.function(MODULE, kernels::FLASH_FP8, "fp8_attn_kv_stats", 0)?;
        let mean = dev.function(MODULE, kernels::FLASH_FP8, "fp8_attn_k_mean", 0)?;
        let quant_k = dev.function(MODULE, kernels::FLASH_FP8, "fp8_attn_quant_k", 0)?;
        let quant_vt = dev.function(MODULE, kernels::FLASH_FP8, "fp8_attn_quant_vt", 0)?;
        let main = dev.function(MODULE, kernels::FLASH_FP8, "flash_fwd_fp8_d128", TMA_SMEM)?;
        dev.begin(&qo.t)?;
        // SAFETY: `out` holds `batch·q_len·heads·128` bf16 values and lives until this function returns; the V
        // maxima buffer holds `batch·kv_heads·128` f32 words (held in `buffers`).
        unsafe {
            dev.poison(params.o, p.batch * p.q_len * p.heads * D)?;
            dev.zero_words(f.v_amax, p.batch * p.kv_heads * D)?;
        }
        let two = |params: &mut FlashParams, f: &mut Fp8AttnParams| {
            [params as *mut FlashParams as *mut c_void, f as *mut Fp8AttnParams as *mut c_void]
        };
        // SAFETY: for the five passes, `(FlashParams, Fp8AttnParams)` by value is each pass's signature, both layouts
        // checked against the C++ structs at compile time. `params` points into the query and key/value operands
        // (`qo`, `keep`: bf16, head dim contiguous, 16-byte aligned rows, shapes checked by `Call::new`), `f` into
        // the new buffers of the shapes above (held in `buffers`); all live until the launches are queued. The
        // grids cover one warp per query row / key row (8 per block), (64 keys, key head, batch) blocks for the
        // partial sums and maxima, one block per (key head, batch) for the mean and (128 keys, key head, batch)
        // tiles of the padded transposed V, as the kernels index them.
        unsafe {
            dev.launch(
                quant_q,
                rows(p.batch * p.q_len * p.heads),
                (256, 1, 1),
                0,
                &mut two(&mut params, &mut f),
            )?;
            let kv_grid = (mean_blocks as u32, p.kv_heads as u32, p.batch as u32);
            dev.launch(stats, kv_grid, (128, 1, 1), 0, &mut two(&mut params, &mut f))?;
            let head_grid = (p.kv_heads as u32, p.batch as u32, 1);
            dev.launch(mean, head_grid, (128, 1, 1), 0, &mut two(&mut params, &mut f))?;
            dev.launch(
                quant_k,
                rows(p.batch * p.total * p.kv_heads),
                (256, 1, 1),
                0,
                &mut two(&mut params, &mut f),
            )?;
            let vt_grid = ((kpad / TILE) as u32, p.kv_heads as u32, p.batch as u32);
            dev.launch(quant_vt, vt_grid, (256, 1, 1), 0, &mut two(&mut params, &mut f))?;
        }
        let mut args = [
            &mut params as *mut FlashParams as *mut c_void,
            &mut f as *mut Fp8AttnParams as *mut c_void,
            &mut maps as *mut Fp8Maps as *mut c_void,
        ];
        let grid = (p.q_len.div_ceil(128) as u32, p.heads as u32, p.batch as u32);
        // SAFETY: `(FlashParams, Fp8AttnParams, Fp8Maps)` by value is the kernel's signature (layouts checked at
        // compile time); the tensor maps describe the quantized buffers above (Q8 and K8 rows of 128 bytes, Vt rows
        // of `kpad` bytes, every stride a multiple of 16), which the passes queued before it on our stream fill;
        // `params.o` is the output and `params.mask` the call's key mask (held in `mask`), all held until the launch
        // is queued. Not causal (checked above).
        unsafe { dev.launch(main, grid, (384, 1, 1), TMA_SMEM, &mut args) }?;
        dev.end()
    })?;
    // The operands and scratch buffers stay alive until every launch reading them is queued.
    drop((qo, keep, mask, buffers));
    Ok(out)
}
