//! `dit_bench`'s kernel section: the block's GEMMs in bf16 and FP8, every flash-attention kernel (and FP8 attention)
//! on the DiT's, the language model's and the vision tower's shapes, the cost of ordering our stream against burn's,
//! and the fused FP8 adaLN; the vision tower's kernels in [`vision`].

pub mod vision;

use qwen_image::{
    cuda::{self, FastOps, FlashKernel, OrderingMode},
    ops::{AttentionOptions, KvSegment, QwenBackend},
    tensor_io::{rel_l2, to_f32_vec},
};
use serde_json::{json, Value};

use super::{configure, randn, time_ms, D};
use crate::common::{dev, G};

/// (what, queries, key segment lengths, heads, kv heads, head dim, causal)
type AttnCase = (&'static str, usize, &'static [usize], usize, usize, usize, bool);

/// Runs the kernel section, each part's results under its name in `out`.
pub fn kernels(reps: usize, attention_only: bool, out: &mut Vec<(String, Value)>) {
    if !attention_only {
        out.push(("vision".into(), vision::vision_kernels(reps)));
    }
    println!("\n== kernels (bf16) ==");
    out.push(("gemm".into(), gemm_kernels(reps, attention_only)));
    out.push(("attention".into(), attention_kernels(reps)));
    if !attention_only {
        out.push(("ordering".into(), ordering_costs()));
        out.push(("adaln_fp8".into(), adaln_fp8_costs(reps)));
    }
}

/// The image stream's adaLN + Q/K/V projections in FP8 at the full and reuse lengths: as before issue 13's fusion
/// (the bf16 adaLN output quantized again by each of the three GEMMs) and as the DiT now runs them (the adaLN kernel
/// quantizes its output once, the GEMMs read it).
fn adaln_fp8_costs(reps: usize) -> Value {
    let mut rows = Vec::new();
    for m in [9591, 5495] {
        let x = randn([1, m, D], 1.0);
        let (shift, scale) = (randn([1, 1, D], 0.5), randn([1, 1, D], 0.5));
        let ws: Vec<_> = (0..3).map(|_| G::quantize_fp8(randn([D, D], 1.0 / (D as f64).sqrt()))).collect();
        let b = randn([D], 0.1);
        let ln = || G::layer_norm_modulate(x.clone(), &shift, &scale, &[], 1e-6);
        let ln_ms = time_ms(reps, 20, || drop(ln()));
        let fused_ms = time_ms(reps, 20, || {
            drop(G::layer_norm_modulate_fp8(x.clone(), &shift, &scale, &[], 1e-6, false))
        });
        let before = time_ms(reps, 20, || {
            let y = ln();
            ws.iter().for_each(|w| drop(G::dense_fp8(y.clone(), w, Some(&b))));
        });
        let after = time_ms(reps, 20, || {
            let (_, q) = G::layer_norm_modulate_fp8(x.clone(), &shift, &scale, &[], 1e-6, false);
            ws.iter().for_each(|w| drop(G::dense_fp8_quantized(&q, w, Some(&b), false)));
        });
        println!(
            "adaLN + fp8 q/k/v {m:5} rows: adaLN {ln_ms:.3} ms, adaLN+e4m3 {fused_ms:.3} ms; \
             adaLN + 3 GEMMs quantizing each {before:.3} ms -> quantized once by the adaLN {after:.3} ms"
        );
        rows.push(json!({"m": m, "adaln_ms": ln_ms, "adaln_fp8_ms": fused_ms, "qkv_separate_ms": before,
            "qkv_fused_ms": after}));
    }
    Value::Array(rows)
}

/// The DiT's GEMM shapes (with and without the GELU epilogue) and burn's own matmul on one of them, for reference;
/// none with `attention_only`.
fn gemm_kernels(reps: usize, attention_only: bool) -> Value {
    let mut gemms = Vec::new();
    let gemm_rows: &[usize] = if attention_only { &[] } else { &[9591, 5495, 8428] };
    for &m in gemm_rows {
        for &(k, n, gelu) in &[(D, D, false), (D, 4 * D, true), (4 * D, D, false)] {
            let x = randn([1, m, k], 1.0);
            let w = randn([n, k], 1.0 / (k as f64).sqrt());
            let b = randn([n], 0.1);
            let ms = time_ms(reps, 20, || {
                let y = if gelu {
                    G::dense_gelu_tanh(x.clone(), &w, Some(&b))
                } else {
                    G::dense(x.clone(), &w, Some(&b))
                };
                drop(y);
            });
            let tf = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
            // The same layer with an FP8 weight (`--quantize fp8`): activation quantization + FP8 GEMM, without and
            // with cuBLASLt's fast accumulation (`QWEN_FP8_FAST_ACCUM`), and how far the fast one's output moves.
            let w8 = G::quantize_fp8(w.clone());
            let fp8 = || {
                if gelu {
                    G::dense_fp8_gelu_tanh(x.clone(), &w8, Some(&b))
                } else {
                    G::dense_fp8(x.clone(), &w8, Some(&b))
                }
            };
            // Promoted sums (`QWEN_FP8_FAST_ACCUM=0`) first, then fast accumulation (the default); the
            // configuration is left as the process started.
            let default_fast = cuda::config(&dev()).fp8_fast_accum;
            configure(|c| c.fp8_fast_accum = false).expect("configuration");
            let ms8 = time_ms(reps, 20, || drop(fp8()));
            let exact = to_f32_vec(fp8());
            configure(|c| c.fp8_fast_accum = true).expect("configuration");
            let ms8_fast = time_ms(reps, 20, || drop(fp8()));
            let fast_err = rel_l2(&to_f32_vec(fp8()), &exact);
            configure(|c| c.fp8_fast_accum = default_fast).expect("configuration");
            let tf8 = 2.0 * (m * n * k) as f64 / (ms8 * 1e-3) / 1e12;
            // Of which the activations' quantization (the same row kernel as for weights).
            let quant = time_ms(reps, 20, || drop(G::quantize_fp8(x.clone().reshape([m, k]))));
            println!(
                "gemm {m:5} x {k:5} -> {n:5}{}: {ms:7.3} ms  {tf:6.1} TFLOP/s; fp8 {ms8:7.3} ms  {tf8:6.1} TFLOP/s \
                 (quantizing x: {quant:.3} ms; fast accumulation {ms8_fast:.3} ms, rel L2 {fast_err:.1e})",
                if gelu { " +gelu" } else { "" }
            );
            gemms.push(json!({"m": m, "k": k, "n": n, "gelu": gelu, "ms": ms, "tflops": tf, "fp8_ms": ms8,
                "fp8_tflops": tf8, "fp8_quantize_x_ms": quant, "fp8_fast_accum_ms": ms8_fast,
                "fp8_fast_accum_rel_l2": fast_err}));
        }
    }
    // burn's own matmul on one block shape, for reference.
    if !attention_only {
        let x = randn([1, 9591, D], 1.0);
        let w = randn([4 * D, D], 1.0 / (D as f64).sqrt());
        configure(|c| c.ops.gemm = false).expect("configuration");
        let ms = time_ms(reps, 5, || drop(G::dense(x.clone(), &w, None)));
        configure(|c| c.ops = FastOps::ALL).expect("configuration");
        let tf = 2.0 * (9591 * D * 4 * D) as f64 / (ms * 1e-3) / 1e12;
        println!("burn matmul 9591 x 3072 -> 12288: {ms:7.3} ms  {tf:6.1} TFLOP/s");
        gemms.push(json!({"m": 9591, "k": D, "n": 4 * D, "burn": true, "ms": ms, "tflops": tf}));
    }
    Value::Array(gemms)
}

/// The attention cases (DiT joint and reuse, Edit-Plus, the language model's causal GQA prefill, the vision tower)
/// under every flash kernel that takes their head dimension.
fn attention_kernels(reps: usize) -> Value {
    let mut attn = Vec::new();
    // (what, queries, key segments, heads, kv heads, head dim, causal)
    let cases: &[AttnCase] = &[
        ("Edit v1 joint (9591)", 9591, &[1399, 4096, 4096], 24, 24, 128, false),
        ("Edit v1 reuse (5495 q / 9591 k)", 5495, &[1399, 4096, 4096], 24, 24, 128, false),
        ("Edit-Plus joint (8428)", 8428, &[236, 4096, 4096], 24, 24, 128, false),
        ("LM prefill 1469, GQA 28/4, causal", 1469, &[1469], 28, 4, 128, true),
        ("vision 1369, head dim 80", 1369, &[1369], 16, 16, 80, false),
    ];
    for &(what, nq, lens, h, hk, d, causal) in cases {
        let q = randn([1, nq, h, d], 1.0);
        let segs: Vec<KvSegment<G>> = lens
            .iter()
            .map(|&n| KvSegment { key: randn([1, n, hk, d], 1.0), value: randn([1, n, hk, d], 1.0) })
            .collect();
        let opts = AttentionOptions { causal, ..Default::default() };
        let nk: usize = lens.iter().sum();
        let flop = 4.0 * (nq * nk * h * d) as f64 * if causal { 0.5 } else { 1.0 };
        let kernels: &[FlashKernel] = if d == 128 {
            &[FlashKernel::Auto, FlashKernel::TmaSerial, FlashKernel::Wgmma, FlashKernel::Mma]
        } else {
            &[FlashKernel::Auto]
        };
        for &kernel in kernels {
            configure(|c| c.flash_kernel = kernel).expect("configuration");
            let ms = time_ms(reps, 10, || drop(G::attend(q.clone(), &segs, &opts)));
            let tf = flop / (ms * 1e-3) / 1e12;
            let name = if d == 128 { kernel.name() } else { "mma.sync" };
            println!("attention {what:36} [{name:8}]: {ms:7.3} ms  {tf:6.1} TFLOP/s");
            attn.push(json!({"case": what, "kernel": name, "queries": nq, "keys": nk, "heads": h, "head_dim": d, "causal": causal, "ms": ms, "tflops": tf}));
        }
        configure(|c| c.flash_kernel = FlashKernel::Auto).expect("configuration");
        if d == 128 && !causal {
            // FP8 attention (its five quantization passes included), and its distance to the bf16 kernel's output.
            let fp8 = AttentionOptions { fp8: true, ..opts.clone() };
            let ms = time_ms(reps, 10, || drop(G::attend(q.clone(), &segs, &fp8)));
            let tf = flop / (ms * 1e-3) / 1e12;
            let err = rel_l2(
                &to_f32_vec(G::attend(q.clone(), &segs, &fp8)),
                &to_f32_vec(G::attend(q.clone(), &segs, &opts)),
            );
            println!(
                "attention {what:36} [fp8     ]: {ms:7.3} ms  {tf:6.1} TFLOP/s  (rel. L2 to bf16 {err:.2e})"
            );
            attn.push(json!({"case": what, "kernel": "fp8", "queries": nq, "keys": nk, "heads": h, "head_dim": d, "causal": causal, "ms": ms, "tflops": tf, "rel_l2_to_bf16": err}));
        }
    }
    Value::Array(attn)
}

/// Per-operation cost of the ordering: a tiny GEMM, 2000 times, in each ordering mode, and one burn elementwise op.
fn ordering_costs() -> Value {
    let mut ord = Vec::new();
    let x = randn([1, 16, 128], 1.0);
    let w = randn([128, 128], 0.1);
    for mode in [OrderingMode::ContextEvents, OrderingMode::HostSync] {
        if configure(|c| c.ordering = mode).is_err() || cuda::ordering_mode(&dev()).ok() != Some(mode) {
            continue;
        }
        let us = time_ms(3, 2000, || drop(G::dense(x.clone(), &w, None))) * 1e3;
        println!("tiny GEMM wall time per call, {mode:?}: {us:6.1} µs");
        ord.push(json!({"mode": format!("{mode:?}"), "us_per_op": us}));
    }
    configure(|c| c.ordering = OrderingMode::ContextEvents).ok();
    let burn_us = {
        let y = randn([1, 16, 128], 1.0);
        time_ms(3, 2000, || drop(y.clone() * 0.5 + 1.0)) * 1e3 / 2.0
    };
    println!("burn elementwise op wall time per call: {burn_us:6.1} µs");
    ord.push(json!({"mode": "burn elementwise", "us_per_op": burn_us}));
    Value::Array(ord)
}
