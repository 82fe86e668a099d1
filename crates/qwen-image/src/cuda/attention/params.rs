//! What the flash-attention kernels are given: the `#[repr(C)]` mirrors of their parameter structs
//! (`kernels/flash_params.cuh`, `flash_attention_wgmma.cu`, `flash_attention_tma.cu`), each with its layout checked
//! at compile time against the same numbers as the C++ side, the TMA tensor maps, and the operands they point into.

use std::ffi::c_void;

use cudarc::driver::sys;

use super::MAX_SEGS;
use crate::cuda::{
    error::{require, FastError},
    tensor::{dims, inner_contiguous, is_bf16, ptr, strides, Prim},
};

/// A `[batch, tokens, heads, head_dim]` operand: its inner axis made contiguous, pointer and element strides.
pub(super) struct Operand {
    /// The tensor, held until the kernels reading it are queued.
    pub t: Prim,
    pub ptr: u64,
    pub sb: i64,
    pub st: i64,
    pub sh: i64,
}

impl Operand {
    /// Checks and prepares `t`: bf16, head dim contiguous, every row 16-byte aligned (cp.async moves 16 bytes).
    pub fn new(t: Prim) -> Result<Operand, FastError> {
        require(is_bf16(&t), || format!("dtype {:?}", t.dtype))?;
        let t = inner_contiguous(t);
        let s = strides(&t);
        require(s.len() == 4 && (s[3] == 1 || dims(&t)[3] == 1), || "operand layout".into())?;
        require(s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0, || {
            format!("strides {s:?} not multiples of 8")
        })?;
        let p = ptr(&t)?;
        require(p % 16 == 0, || "operand not 16-byte aligned".into())?;
        Ok(Operand { ptr: p, sb: s[0] as i64, st: s[1] as i64, sh: s[2] as i64, t })
    }
}

/// `KvSeg` of `flash_params.cuh`: one key/value segment read in place.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct KvSeg {
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

assert_layout!(KvSeg: size 72, align 8 {
    k @ 0, v @ 8, k_sb @ 16, k_st @ 24, k_sh @ 32, v_sb @ 40, v_st @ 48, v_sh @ 56, start @ 64, len @ 68,
});

impl KvSeg {
    /// The segment of logical keys `start..start + len`, read from the key and value operands in place.
    pub fn new(k: &Operand, v: &Operand, start: usize, len: usize) -> Self {
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

/// `FlashParams` of `flash_params.cuh`: one filling serves every flash kernel.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct FlashParams {
    pub q: u64,
    pub o: u64,
    pub mask: u64,
    pub mask_tile_full: u64,
    pub cu_seqlens: u64,
    pub q_sb: i64,
    pub q_st: i64,
    pub q_sh: i64,
    pub o_sb: i64,
    pub o_st: i64,
    pub o_sh: i64,
    pub mask_sb: i64,
    pub seg: [KvSeg; MAX_SEGS],
    pub n_segs: i32,
    pub total_keys: i32,
    pub q_len: i32,
    pub kv_group: i32,
    pub causal: i32,
    pub n_blocks: i32,
    pub scale_log2: f32,
    pub n_mask_tiles: i32,
}

assert_layout!(FlashParams: size 416, align 8 {
    q @ 0, o @ 8, mask @ 16, mask_tile_full @ 24, cu_seqlens @ 32, q_sb @ 40, q_st @ 48, q_sh @ 56, o_sb @ 64,
    o_st @ 72, o_sh @ 80, mask_sb @ 88, seg @ 96, n_segs @ 384, total_keys @ 388, q_len @ 392, kv_group @ 396,
    causal @ 400, n_blocks @ 404, scale_log2 @ 408, n_mask_tiles @ 412,
});

impl FlashParams {
    /// The query `q` and a dense `[batch, q_len, heads, head_dim]` output at `o`, with the softmax scale of
    /// `head_dim`; the keys, mask and launch shape are the caller's to fill.
    pub fn new(q: &Operand, o: u64, q_len: usize, heads: usize, head_dim: usize) -> Self {
        FlashParams {
            q: q.ptr,
            o,
            q_sb: q.sb,
            q_st: q.st,
            q_sh: q.sh,
            o_sb: (q_len * heads * head_dim) as i64,
            o_st: (heads * head_dim) as i64,
            o_sh: head_dim as i64,
            q_len: q_len as i32,
            scale_log2: std::f32::consts::LOG2_E / (head_dim as f32).sqrt(),
            ..Default::default()
        }
    }
}

/// `VtParams` of `flash_attention_wgmma.cu`: the transposed, zero-padded copy of V the cp.async kernel reads.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct VtParams {
    pub vt: u64,
    pub kpad: i64,
    pub kv_heads: i32,
    pub pad: i32,
}

assert_layout!(VtParams: size 24, align 8 { vt @ 0, kpad @ 8, kv_heads @ 16, pad @ 20 });

/// The driver's opaque tensor map, laid out as the kernels' `TensorMap` (128 bytes, 64-byte aligned).
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
pub(super) struct TensorMap([u64; 16]);

assert_layout!(TensorMap: size 128, align 64 {});
// The driver's `CUtensorMap` is copied into it whole.
const _: () = assert!(size_of::<sys::CUtensorMap>() == size_of::<TensorMap>());

/// `TmaMaps` of `flash_attention_tma.cu`: the tensor maps of one call.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
pub(super) struct TmaMaps {
    pub q: TensorMap,
    pub k: [TensorMap; MAX_SEGS],
    pub v: [TensorMap; MAX_SEGS],
}

assert_layout!(TmaMaps: size 1152, align 64 { q @ 0, k @ 128, v @ 640 });

/// A tensor map over the `[batch, tokens, heads, 128]` operand `o` of dimensions `dims`: boxes of 64 head-dim
/// columns x 1 head x 128 tokens, 128-byte swizzle, rows past the end read as zeros. A layout the copy engine
/// cannot describe is [`FastError::Unsupported`].
pub(super) fn tensor_map(o: &Operand, dims: &[usize]) -> Result<TensorMap, FastError> {
    require(dims.len() == 4, || format!("tensor map for dims {dims:?}"))?;
    let gdim: [u64; 4] = [dims[3] as u64, dims[2] as u64, dims[1] as u64, dims[0] as u64];
    let gstride: [u64; 3] = [2 * o.sh as u64, 2 * o.st as u64, 2 * o.sb as u64];
    encode_map(o.ptr, MapElement::Bf16, gdim, gstride, [64, 1, 128, 1])
}

/// The element type of a tensor map.
#[derive(Clone, Copy, Debug)]
pub(super) enum MapElement {
    /// bf16 values.
    Bf16,
    /// Bytes (e4m3 bits).
    U8,
}

/// A 4-dimensional tensor map at `ptr`: dimensions innermost first (`gdim`), byte strides of the outer three
/// (`gstride`), box sizes `bx` (the inner one 128 bytes at most: 128-byte swizzle), elements past the end read as
/// zeros. A layout the copy engine cannot describe is [`FastError::Unsupported`].
pub(super) fn encode_map(
    ptr: u64,
    element: MapElement,
    gdim: [u64; 4],
    gstride: [u64; 3],
    bx: [u32; 4],
) -> Result<TensorMap, FastError> {
    let es: [u32; 4] = [1; 4];
    let dtype = match element {
        MapElement::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        MapElement::U8 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
    };
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array pointer refers to a local of the length the 4-dimensional encoding reads (4 dims, 3
    // strides, 4 box sizes, 4 element strides); `map` is writable storage for one `CUtensorMap`. The global address
    // is only recorded (not dereferenced) by the encoding.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            dtype,
            4,
            ptr as *mut c_void,
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
            "tensor map for dims {gdim:?} strides {gstride:?} box {bx:?}: {r:?}"
        )));
    }
    // SAFETY: the map was zero-initialized (a valid bit pattern for the plain `[u64; 16]` it holds) and then
    // filled by a successful encoding.
    Ok(TensorMap(unsafe { map.assume_init() }.opaque))
}
