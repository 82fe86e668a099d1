//! Block-diagonal attention ([`QwenBackend::attend_blocks`](crate::ops::QwenBackend::attend_blocks)): the vision
//! tower's windows and whole images, at its head dim of 80.
//!
//! - Long blocks (whole images, [`MIN_TMA_BLOCK`] tokens or more, at most [`MAX_TMA_BLOCKS`] of them) on Hopper: one
//!   call of the TMA kernel per block, with Q, K and V zero-padded to head dim 128 and the softmax scale of the real
//!   head dim. The padded columns add zeros to every logit and give output columns that are dropped. At 1024² (5476
//!   patches, 16 heads) the mma.sync kernel ran at 121 TFLOP/s (1.271 ms per block on an H100, `dit_bench
//!   --vision-only`), the TMA kernel at head dim 128 at ≈ 600.
//! - Anything else (the windows: ≤ 64 patches each): the mma.sync kernel of the head dim, all blocks in one launch.

use std::f32::consts::LOG2_E;

use burn::tensor::{DType, Int, Tensor, TensorData};

use super::{
    flash_attention_scaled, launch_mma, mma_kernel, mma_smem, FlashParams, KvSeg, Operand, B, BM, MODULE,
};
use crate::cuda::{
    config::FlashKernel,
    error::{require, FastError},
    kernels,
    registry::with_gpu,
    tensor::{dims, empty_like_device, prim, ptr, wrap, Prim},
};

/// The head dim of the TMA kernel.
const TMA_HEAD_DIM: usize = 128;
/// Tokens a block needs for the padded TMA path: below, the padding and the per-block launches cost more than the
/// mma.sync kernel's slower MMAs save.
const MIN_TMA_BLOCK: usize = 1024;
/// Blocks the padded TMA path takes (one launch each).
const MAX_TMA_BLOCKS: usize = 8;

/// Block-diagonal flash attention; see [`QwenBackend::attend_blocks`](crate::ops::QwenBackend::attend_blocks).
pub(crate) fn attend_blocks_prim(q: Prim, k: Prim, v: Prim, cu_seqlens: &[usize]) -> Result<Prim, FastError> {
    let qd = dims(&q);
    require(qd.len() == 4 && qd[0] == 1 && dims(&k) == qd && dims(&v) == qd, || format!("shapes {qd:?}"))?;
    let (tokens, heads, head_dim) = (qd[1], qd[2], qd[3]);
    let name = mma_kernel(head_dim).ok_or_else(|| FastError::unsupported(format!("head_dim {head_dim}")))?;
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
    if head_dim < TMA_HEAD_DIM && padded_tma_fits(&q, cu_seqlens)? {
        return padded_tma(q, k, v, cu_seqlens);
    }

    let (qo, ko, vo) = (Operand::new(q)?, Operand::new(k)?, Operand::new(v)?);
    let device = qo.t.device.clone();
    let cu: Vec<i32> = cu_seqlens.iter().map(|&c| c as i32).collect();
    let cu = Tensor::<B, 1, Int>::from_data(TensorData::new(cu, [n_blocks + 1]), &device);
    let cu = cu.into_primitive();
    require(cu.dtype == DType::I32, || format!("cu_seqlens dtype {:?}", cu.dtype))?;
    let out = empty_like_device(&qo.t, vec![1, tokens, heads, head_dim], DType::BF16);
    let po = ptr(&out)?;
    let mut params = FlashParams {
        cu_seqlens: ptr(&cu)?,
        n_segs: 1,
        total_keys: tokens as i32,
        kv_group: 1,
        causal: 0,
        n_blocks: n_blocks as i32,
        ..FlashParams::new(&qo, po, tokens, heads, head_dim)
    };
    params.seg[0] = KvSeg::new(&ko, &vo, 0, tokens);
    let grid = (max_len.div_ceil(BM) as u32, heads as u32, n_blocks as u32);
    let smem = mma_smem(head_dim);
    with_gpu(device.index, |dev| {
        let f = dev.function(MODULE, kernels::FLASH_ATTENTION, name, smem)?;
        dev.begin(&qo.t)?;
        // SAFETY: `out` holds `tokens·heads·head_dim` bf16 values and lives until this function returns.
        unsafe { dev.poison(params.o, tokens * heads * head_dim) }?;
        launch_mma(dev, f, &mut params, grid, smem)?;
        dev.end()
    })?;
    drop((qo, ko, vo, cu));
    Ok(out)
}

/// Whether the blocks take the padded TMA path: few long blocks, on sm_90 with the TMA kernel chosen.
fn padded_tma_fits(q: &Prim, cu_seqlens: &[usize]) -> Result<bool, FastError> {
    let n_blocks = cu_seqlens.len() - 1;
    let long = cu_seqlens.windows(2).all(|w| w[1] - w[0] >= MIN_TMA_BLOCK);
    if n_blocks > MAX_TMA_BLOCKS || !long {
        return Ok(false);
    }
    with_gpu(q.device.index, |g| {
        Ok(g.cc() == (9, 0) && matches!(g.config().flash_kernel, FlashKernel::Auto | FlashKernel::TmaSerial))
    })
}

/// Each block through the TMA kernel with Q, K and V zero-padded to [`TMA_HEAD_DIM`] (see the module docs); the
/// output `[1, tokens, heads, head_dim]`.
fn padded_tma(q: Prim, k: Prim, v: Prim, cu_seqlens: &[usize]) -> Result<Prim, FastError> {
    let (q, k, v) = (wrap::<4>(q), wrap::<4>(k), wrap::<4>(v));
    let [_, _, heads, head_dim] = q.dims();
    let scale = LOG2_E / (head_dim as f32).sqrt();
    let mut outs = Vec::with_capacity(cu_seqlens.len() - 1);
    for w in cu_seqlens.windows(2) {
        let (start, len) = (w[0], w[1] - w[0]);
        // One block of zero columns, appended to Q, K and V alike.
        let zeros = Tensor::<B, 4>::zeros([1, len, heads, TMA_HEAD_DIM - head_dim], (&q.device(), q.dtype()));
        let pad =
            |t: &Tensor<B, 4>| prim(Tensor::cat(vec![t.clone().narrow(1, start, len), zeros.clone()], 3));
        let segments = vec![(pad(&k), pad(&v))];
        let out = flash_attention_scaled(pad(&q), segments, None, false, Some(scale))?;
        outs.push(wrap::<4>(out).narrow(3, 0, head_dim));
    }
    Ok(prim(match outs.len() {
        1 => outs.remove(0),
        _ => Tensor::cat(outs, 1),
    }))
}
