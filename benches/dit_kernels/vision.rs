//! The vision tower's kernels at Edit v1's 1024² shape (a 74×74-patch image: 5476 patches of 1280 features, 16 heads
//! of 80; 1369 merged tokens): every GEMM of a block (and the MLP's with its 3420-wide intermediate padded to 3424
//! and 3456, rows of 16-byte multiples), the patch embedding and the merger's GEMMs, both attentions (windows of 8×8
//! patches in the tower's permuted order, and the whole image) and the block's glue kernels. Their sum per block,
//! times 32 blocks, is the tower's GPU-time estimate to set against `pipeline_bench`'s vision time.

use burn::tensor::DType;
use qwen_image::{
    ops::QwenBackend,
    text_encoder::{window::WindowLayout, GridThw},
};
use serde_json::{json, Value};

use super::{randn, time_ms};
use crate::common::G;

/// Patches at Edit v1 1024² (74 × 74).
const PATCHES: usize = 74 * 74;
/// The tower's width.
const DIM: usize = 1280;
/// Attention heads.
const HEADS: usize = 16;
/// Head width.
const HEAD_DIM: usize = 80;
/// The MLP's intermediate width.
const INTER: usize = 3420;

/// One timed GEMM `m × k → n` (+ bias): its median ms and TFLOP/s.
fn gemm(reps: usize, what: &str, m: usize, k: usize, n: usize, bias: bool) -> (f64, Value) {
    let x = randn([1, m, k], 1.0);
    let w = randn([n, k], 1.0 / (k as f64).sqrt());
    let b = bias.then(|| randn([n], 0.1));
    let ms = time_ms(reps, 20, || drop(G::dense(x.clone(), &w, b.as_ref())));
    let tf = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
    println!("vision gemm {what:28} {m:5} x {k:5} -> {n:5}: {ms:7.3} ms  {tf:6.1} TFLOP/s");
    (ms, json!({"what": what, "m": m, "k": k, "n": n, "bias": bias, "ms": ms, "tflops": tf}))
}

/// The vision tower's kernels; see the module docs.
pub fn vision_kernels(reps: usize) -> Value {
    println!("\n== vision tower kernels (bf16, {PATCHES} patches) ==");
    let mut rows = Vec::new();
    let mut block_ms = 0.0;
    // (what, k, n, counted in the block estimate)
    let shapes: &[(&str, usize, usize, bool)] = &[
        ("qkv", DIM, 3 * DIM, true),
        ("proj", DIM, DIM, true),
        ("gate/up (3420)", DIM, INTER, true),
        ("gate/up (3420)", DIM, INTER, true),
        ("down (3420)", INTER, DIM, true),
        ("gate/up padded to 3424", DIM, 3424, false),
        ("down padded to 3424", 3424, DIM, false),
        ("gate/up padded to 3456", DIM, 3456, false),
        ("down padded to 3456", 3456, DIM, false),
    ];
    for &(what, k, n, counted) in shapes {
        let (ms, row) = gemm(reps, what, PATCHES, k, n, true);
        if counted {
            block_ms += ms;
        }
        rows.push(row);
    }
    let (embed_ms, row) = gemm(reps, "patch embed", PATCHES, 1176, DIM, false);
    rows.push(row);
    let merged = PATCHES / 4;
    let (fc1_ms, row) = gemm(reps, "merger fc1", merged, 4 * DIM, 4 * DIM, true);
    rows.push(row);
    let (fc2_ms, row) = gemm(reps, "merger fc2", merged, 4 * DIM, 3584, true);
    rows.push(row);

    // Attention: the query/key/value as the block reads them (rotated q, k; v a view into the fused QKV).
    let qkv = randn([1, PATCHES, 3, HEADS, HEAD_DIM], 1.0);
    let part = |i: usize| qkv.clone().narrow(2, i, 1).reshape([1, PATCHES, HEADS, HEAD_DIM]);
    let table = || randn([PATCHES, HEAD_DIM], 1.0).cast(DType::F32);
    let (cos, sin) = (table(), table());
    let rotary_ms = time_ms(reps, 20, || drop(G::rotary_half(part(0), &cos, &sin)));
    block_ms += 2.0 * rotary_ms;
    let (q, k, v) = (part(0), part(1), part(2));
    let layout = WindowLayout::new(&[GridThw { t: 1, h: 74, w: 74 }], 2, 4);
    let flop = |blocks: &[usize]| {
        blocks.windows(2).map(|w| 4.0 * ((w[1] - w[0]).pow(2) * HEADS * HEAD_DIM) as f64).sum::<f64>()
    };
    let mut attention = |what: &str, blocks: &[usize]| {
        let ms = time_ms(reps, 10, || drop(G::attend_blocks(q.clone(), k.clone(), v.clone(), blocks)));
        let tf = flop(blocks) / (ms * 1e-3) / 1e12;
        println!("vision attention {what:23} ({:3} blocks): {ms:7.3} ms  {tf:6.1} TFLOP/s", blocks.len() - 1);
        rows.push(json!({"what": what, "blocks": blocks.len() - 1, "ms": ms, "tflops": tf}));
        ms
    };
    let window_ms = attention("windows", &layout.cu_window_seqlens);
    let full_ms = attention("whole image", &layout.cu_seqlens);

    // Glue: the two RMS norms, the gated product, the two residual sums.
    let x = randn([1, PATCHES, DIM], 1.0);
    let gamma = randn([DIM], 1.0);
    let norm_ms = time_ms(reps, 20, || drop(G::rms_norm(x.clone(), &gamma, 1e-6)));
    let (gate, up) = (randn([1, PATCHES, INTER], 1.0), randn([1, PATCHES, INTER], 1.0));
    let silu_ms = time_ms(reps, 20, || drop(G::silu_mul(gate.clone(), up.clone())));
    let add_ms = time_ms(reps, 20, || drop(x.clone() + x.clone()));
    block_ms += 2.0 * norm_ms + silu_ms + 2.0 * add_ms;
    println!(
        "vision glue: rms norm {norm_ms:.3} ms, rotary {rotary_ms:.3} ms, silu·up {silu_ms:.3} ms, residual add \
         {add_ms:.3} ms"
    );
    // 32 blocks: 4 attend over the whole image, 28 over windows; plus the patch embedding and the merger.
    let tower_ms = 32.0 * block_ms + 28.0 * window_ms + 4.0 * full_ms + embed_ms + fc1_ms + fc2_ms;
    println!("vision block without attention {block_ms:.3} ms; the tower's kernels summed {tower_ms:.1} ms");
    json!({"kernels": rows, "block_without_attention_ms": block_ms, "tower_sum_ms": tower_ms,
        "rms_norm_ms": norm_ms, "rotary_ms": rotary_ms, "silu_mul_ms": silu_ms, "add_ms": add_ms})
}
