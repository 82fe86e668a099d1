//! GPU correctness of the CUDA fast path's operations (feature `cuda`; needs an NVIDIA GPU, so CI only compiles
//! it). Whole networks and weight loading on the GPU: `gpu_models.rs`; the FP8 operations: `gpu_fp8.rs`.
//!
//! Every fast operation is compared with an independent reference on random inputs of the real shapes (relative
//! L2 ≤ 2e-2 in bf16, no NaN), with outputs poisoned with NaN before each kernel runs.
//! Build here, run on the GPU host (see `docs/performance.md`):
//!
//! ```text
//! CARGO_TARGET_DIR=target/cuda cargo test --release --features cuda --test gpu_fast_ops --test gpu_models --no-run
//! LD_LIBRARY_PATH=/usr/local/cuda/lib64 <binary> --test-threads=1 --nocapture     # each of the two binaries
//! ```
#![cfg(feature = "cuda")]

mod gpu_support;

use burn::tensor::{Bool, DType, Distribution, Tensor, TensorData};
use gpu_support::{
    assert_fast, check, dev, portable_run, randn, reset_stats, set_flash_kernel, setup, try_check, ATTENTION,
    CONV, G, GEMM, GLUE,
};
use qwen_image::{
    cuda::{self, FastOps, FastPathConfig, FlashKernel},
    ops::{lowered, portable, AttentionOptions, KvSegment, NormRope, QwenBackend},
    tensor_io::{rel_l2, to_f32_vec},
    CpuBackend,
};

/// (what, batch, queries, key segment lengths, heads, kv heads, head dim, causal)
type AttnCase = (&'static str, usize, usize, &'static [usize], usize, usize, usize, bool);

// ---------------------------------------------------------------------------------------------------------------
// GEMMs

#[test]
fn gemm_matches_burn_matmul() {
    let _g = setup();
    // (tokens, in, out, gelu): the DiT's block shapes at full and reuse length, the modulation GEMV, odd sizes.
    let cases =
        [(1024, 3072, 12288, true), (2, 3072, 18432, false), (77, 3584, 3072, false), (131, 80, 24, true)];
    for (m, k, n, gelu) in cases {
        let x = randn([1, m, k], 1.0);
        let w = randn([n, k], 1.0 / (k as f64).sqrt());
        let b = randn([n], 0.5);
        let fast = if gelu {
            G::dense_gelu_tanh(x.clone(), &w, Some(&b))
        } else {
            G::dense(x.clone(), &w, Some(&b))
        };
        let want = portable_run(|| {
            if gelu {
                portable::dense_gelu_tanh(x.clone(), &w, Some(&b))
            } else {
                portable::dense(x.clone(), &w, Some(&b))
            }
        });
        check(&format!("dense{} {m}x{k} -> {n}", if gelu { "+gelu" } else { "" }), fast, want, 2e-2);
        // Without bias, and with a batch of 2.
        if m < 1000 {
            continue;
        }
        let x2 = randn([2, m.min(300), k], 1.0);
        let fast = G::dense(x2.clone(), &w, None);
        let want = portable_run(|| portable::dense(x2.clone(), &w, None));
        check(&format!("dense nobias batch 2 {}x{k} -> {n}", m.min(300)), fast, want, 2e-2);
    }
    assert_fast(GEMM, "gemm");
}

// ---------------------------------------------------------------------------------------------------------------
// Attention

/// Attention on the host in f64 accumulation (independent of burn's attention and of our kernels; threads over
/// batch × heads). Returns a bf16 tensor on the GPU for comparison.
fn reference_attention(
    q: &Tensor<G, 4>,
    segments: &[KvSegment<G>],
    mask: Option<&[bool]>,
    causal: bool,
) -> Tensor<G, 4> {
    let [b, nq, h, d] = q.dims();
    let k = Tensor::cat(segments.iter().map(|s| s.key.clone()).collect(), 1);
    let v = Tensor::cat(segments.iter().map(|s| s.value.clone()).collect(), 1);
    let (nk, hk) = (k.dims()[1], k.dims()[2]);
    let (qv, kv, vv) = (to_f32_vec(q.clone()), to_f32_vec(k), to_f32_vec(v));
    let mv: Option<Vec<bool>> = mask.map(<[bool]>::to_vec);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; b * nq * h * d];
    let jobs: Vec<(usize, usize)> = (0..b).flat_map(|bi| (0..h).map(move |hi| (bi, hi))).collect();
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get()).min(jobs.len());
    let results: Vec<Vec<(usize, usize, Vec<f32>)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (jobs, qv, kv, vv, mv) = (&jobs, &qv, &kv, &vv, &mv);
                sc.spawn(move || {
                    let mut res = Vec::new();
                    let mut sc_buf = vec![0f64; nk];
                    for &(bi, hi) in jobs.iter().skip(t).step_by(threads) {
                        let hj = hi / (h / hk);
                        let mut o = vec![0f32; nq * d];
                        for i in 0..nq {
                            let qr = &qv[((bi * nq + i) * h + hi) * d..][..d];
                            let mut mx = f64::NEG_INFINITY;
                            for j in 0..nk {
                                let ok = !(causal && j > i) && mv.as_ref().is_none_or(|m| m[bi * nk + j]);
                                sc_buf[j] = if ok {
                                    let kr = &kv[((bi * nk + j) * hk + hj) * d..][..d];
                                    qr.iter().zip(kr).map(|(a, c)| (*a as f64) * (*c as f64)).sum::<f64>()
                                        * scale
                                } else {
                                    f64::NEG_INFINITY
                                };
                                mx = mx.max(sc_buf[j]);
                            }
                            let mut acc = vec![0f64; d];
                            let mut l = 0f64;
                            for j in 0..nk {
                                if sc_buf[j] == f64::NEG_INFINITY {
                                    continue;
                                }
                                let p = (sc_buf[j] - mx).exp();
                                l += p;
                                let vr = &vv[((bi * nk + j) * hk + hj) * d..][..d];
                                for (a, x) in acc.iter_mut().zip(vr) {
                                    *a += p * (*x as f64);
                                }
                            }
                            for (e, a) in acc.iter().enumerate() {
                                o[i * d + e] = (a / l) as f32;
                            }
                        }
                        res.push((bi, hi, o));
                    }
                    res
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("reference thread")).collect()
    });
    for (bi, hi, o) in results.into_iter().flatten() {
        for i in 0..nq {
            out[((bi * nq + i) * h + hi) * d..][..d].copy_from_slice(&o[i * d..][..d]);
        }
    }
    Tensor::<G, 4>::from_data(TensorData::new(out, [b, nq, h, d]), (&dev(), DType::F32)).cast(DType::BF16)
}

/// Every flash kernel for head dim 128, the mma.sync one last.
const FLASH_KERNELS: [FlashKernel; 4] =
    [FlashKernel::Auto, FlashKernel::TmaSerial, FlashKernel::Wgmma, FlashKernel::Mma];

fn segments(b: usize, lens: &[usize], hk: usize, d: usize) -> Vec<KvSegment<G>> {
    lens.iter()
        .map(|&n| KvSegment { key: randn([b, n, hk, d], 1.0), value: randn([b, n, hk, d], 1.0) })
        .collect()
}

#[test]
fn flash_attention_matches_reference() {
    let _g = setup();
    // (what, batch, queries, key segments, heads, kv heads, head dim, causal)
    let cases: &[AttnCase] = &[
        (
            "DiT joint, Edit v1 1024² (text|target|condition)",
            1,
            9591,
            &[1399, 4096, 4096],
            24,
            24,
            128,
            false,
        ),
        ("DiT reuse step (cached condition K/V segment)", 1, 5495, &[1399, 4096, 4096], 24, 24, 128, false),
        ("LM prefill, GQA 28/4, causal", 1, 1469, &[1469], 28, 4, 128, true),
        ("causal, odd length", 1, 77, &[77], 4, 2, 128, true),
        ("vision head dim 80", 1, 1369, &[1369], 16, 16, 80, false),
        ("one query", 1, 1, &[5, 300], 8, 8, 128, false),
        ("head dim 128, batch 2, 4 odd segments, GQA 6/3", 2, 300, &[1, 127, 129, 200], 6, 3, 128, false),
        ("odd lengths, batch 2, 4 segments", 2, 129, &[1, 63, 65, 200], 6, 3, 64, false),
        ("tiny head dim 16", 2, 50, &[10, 40], 2, 2, 16, false),
        ("head dim 32, 5 segments (merged tail)", 1, 70, &[9, 9, 9, 9, 9], 2, 1, 32, false),
    ];
    let mut failures = Vec::new();
    for &(what, b, nq, lens, h, hk, d, causal) in cases {
        let q = randn([b, nq, h, d], 1.0);
        let segs = segments(b, lens, hk, d);
        let opts = AttentionOptions { causal, ..Default::default() };
        let nk: usize = lens.iter().sum();
        // Head dim 128 on Hopper: the TMA kernel (Auto) and its serial variant, the cp.async wgmma kernel and the
        // mma.sync one; other head dims: the mma.sync kernel only.
        let kernels: &[FlashKernel] = if d == 128 { &FLASH_KERNELS } else { &[FlashKernel::Auto] };
        let outs: Vec<_> = kernels
            .iter()
            .map(|&k| {
                set_flash_kernel(k);
                (k, G::attend(q.clone(), &segs, &opts))
            })
            .collect();
        set_flash_kernel(FlashKernel::Auto);
        if b * nq * nk * h > 200_000_000 {
            // The host reference would take minutes at the DiT's size: the kernels (independent code: TMA + wgmma,
            // cp.async + wgmma, mma.sync) check each other against the mma.sync one here; the host reference checks
            // each of them on the smaller cases below, which cover the same segment, tail and GQA paths.
            let mma = outs.last().expect("kernels").1.clone();
            for (k, out) in &outs[..outs.len() - 1] {
                let name = format!("attend: {what}, {} vs mma.sync", k.name());
                failures.extend(try_check(&name, out.clone(), mma.clone(), 2e-2).err());
            }
        } else {
            let want = reference_attention(&q, &segs, None, causal);
            for (k, out) in outs {
                let name = format!("attend ({}): {what}", k.name());
                failures.extend(try_check(&name, out, want.clone(), 2e-2).err());
            }
        }
    }
    assert!(failures.is_empty(), "{} failed checks:\n{}", failures.len(), failures.join("\n"));
    assert_fast(ATTENTION, "attention");
}

#[test]
fn flash_attention_key_mask_and_portable_agree() {
    let _g = setup();
    // A padded text prompt: batch 2, the second item's last 30 text keys masked out.
    let (b, txt, img, h, d) = (2, 100, 300, 4, 128);
    let q = randn([b, txt + img, h, d], 1.0);
    let segs = segments(b, &[txt, img], h, d);
    let mut m = vec![true; b * (txt + img)];
    for j in txt - 30..txt {
        m[(txt + img) + j] = false;
    }
    let mask = Tensor::<G, 2, Bool>::from_data(TensorData::new(m.clone(), [b, txt + img]), &dev());
    let opts = AttentionOptions { key_mask: Some(mask), ..Default::default() };
    let fast = G::attend(q.clone(), &segs, &opts);
    check("attend: key mask", fast.clone(), reference_attention(&q, &segs, Some(&m), false), 2e-2);
    // The masked keys matter: ignoring the mask must be far off.
    let unmasked = reference_attention(&q, &segs, None, false);
    let e = rel_l2(&to_f32_vec(fast.clone()), &to_f32_vec(unmasked));
    assert!(e > 5e-2, "the mask changed the result by only {e:.2e}");
    // (burn's own attention, the portable default, autotunes for minutes at these sizes: the reference above is
    // the independent check.)
    let want = reference_attention(&q, &segs, Some(&m), false);
    let mut failures = Vec::new();
    for k in &FLASH_KERNELS[1..] {
        set_flash_kernel(*k);
        let out = G::attend(q.clone(), &segs, &opts);
        failures.extend(
            try_check(&format!("attend: key mask, {} kernel", k.name()), out, want.clone(), 2e-2).err(),
        );
    }
    set_flash_kernel(FlashKernel::Auto);
    assert!(failures.is_empty(), "{} failed checks:\n{}", failures.len(), failures.join("\n"));
    assert_fast(ATTENTION, "attention");
}

#[test]
fn flash_attention_blocks_match_per_block_attention() {
    let _g = setup();
    // Vision-tower windows: uneven blocks, head dim 80.
    let cu = [0usize, 64, 128, 200, 201, 456, 1369];
    let (t, h, d) = (1369, 16, 80);
    let (q, k, v) = (randn([1, t, h, d], 1.0), randn([1, t, h, d], 1.0), randn([1, t, h, d], 1.0));
    let fast = G::attend_blocks(q.clone(), k.clone(), v.clone(), &cu);
    let want = portable::attention_blocks(q, k, v, &cu, |q, s, o| reference_attention(&q, s, None, o.causal));
    check("attend_blocks: vision windows, head dim 80", fast, want, 2e-2);
    // Whole images (one block; two of different lengths): on Hopper the TMA kernel with Q, K and V zero-padded to
    // head dim 128 and the softmax scale of 80. Q, K and V are narrowed views of one fused `[1, t, 3·h, d]` tensor,
    // as the vision tower passes them (read in place).
    for cu in [vec![0usize, 1369], vec![0, 1100, 2300]] {
        let t = *cu.last().unwrap();
        let qkv = randn([1, t, 3 * h, d], 1.0);
        let part = |i: usize| qkv.clone().narrow(2, i * h, h);
        let fast = G::attend_blocks(part(0), part(1), part(2), &cu);
        let want = portable::attention_blocks(part(0), part(1), part(2), &cu, |q, s, o| {
            reference_attention(&q, s, None, o.causal)
        });
        check(&format!("attend_blocks: whole images {cu:?}, head dim 80"), fast, want, 2e-2);
    }
    assert_fast(ATTENTION, "attention");
}

// ---------------------------------------------------------------------------------------------------------------
// Elementwise glue

#[test]
fn fused_glue_matches_portable() {
    let _g = setup();
    let d = 3072;
    // zero_cond_t layout: target tokens use row 0, condition tokens row 1; the modulation tensors are column
    // slices of the modulation GEMM's output, as in the DiT.
    for (tokens, runs) in [(8192, vec![(4096, 0), (4096, 1)]), (1399, vec![(1399, 0)]), (5, vec![])] {
        let params = randn([2, 6 * d], 0.5);
        let part = |i: usize| params.clone().narrow(1, i * d, d).reshape([2, 1, d]);
        let (shift, scale, gate) = (part(0), part(1), part(2));
        let x = randn([1, tokens, d], 2.0);
        let fast = G::layer_norm_modulate(x.clone(), &shift, &scale, &runs, 1e-6);
        let want = portable_run(|| portable::layer_norm_modulate(x.clone(), &shift, &scale, &runs, 1e-6));
        check(&format!("layer_norm_modulate {tokens} tokens, runs {runs:?}"), fast, want, 2e-2);
        let y = randn([1, tokens, d], 1.0);
        let fast = G::gated_residual(x.clone(), y.clone(), &gate, &runs);
        let want = portable_run(|| portable::gated_residual(x.clone(), y.clone(), &gate, &runs));
        check(&format!("gated_residual {tokens} tokens"), fast, want, 2e-2);
    }
    // Rows wider than the DiT's take the generic LayerNorm kernel.
    let (x, sh, sc) = (randn([2, 3, 4096], 2.0), randn([1, 2, 4096], 0.5), randn([1, 2, 4096], 0.5));
    let fast = G::layer_norm_modulate(x.clone(), &sh, &sc, &[], 1e-6);
    let want = portable_run(|| portable::layer_norm_modulate(x.clone(), &sh, &sc, &[], 1e-6));
    check("layer_norm_modulate 2x3x4096", fast, want, 2e-2);
    for (batch, tokens, heads, dh) in [(1, 5495, 24, 128), (2, 9, 5, 128), (1, 33, 2, 16), (2, 7, 3, 64)] {
        let x = randn([batch, tokens, heads * dh], 3.0).reshape([batch, tokens, heads, dh]);
        let w = randn([dh], 0.3) + 1.0;
        let cos = Tensor::<G, 2>::random([tokens, dh / 2], Distribution::Uniform(-1.0, 1.0), &dev())
            .cast(DType::F32);
        let sin = Tensor::<G, 2>::random([tokens, dh / 2], Distribution::Uniform(-1.0, 1.0), &dev())
            .cast(DType::F32);
        let fast = G::rms_norm_rope(x.clone(), &w, 1e-6, &cos, &sin);
        let want = portable_run(|| portable::rms_norm_rope(x.clone(), &w, 1e-6, &cos, &sin));
        check(&format!("rms_norm_rope {batch}x{tokens}x{heads}x{dh}"), fast, want, 2e-2);
    }
    // The joint queries: text and image runs normalized and rotated into one tensor.
    let table = |tokens: usize| {
        Tensor::<G, 2>::random([tokens, 64], Distribution::Uniform(-1.0, 1.0), &dev()).cast(DType::F32)
    };
    let (wt, wi) = (randn([128], 0.3) + 1.0, randn([128], 0.3) + 1.0);
    let (ct, st, ci, si) = (table(1399), table(1399), table(4096), table(4096));
    let (xt, xi) = (randn([2, 1399, 24, 128], 3.0), randn([2, 4096, 24, 128], 3.0));
    let parts = [
        NormRope { x: xt, weight: &wt, eps: 1e-6, cos: &ct, sin: &st },
        NormRope { x: xi, weight: &wi, eps: 1e-6, cos: &ci, sin: &si },
    ];
    let fast = G::rms_norm_rope_cat(&parts);
    let want = portable_run(|| portable::rms_norm_rope_cat(&parts));
    check("rms_norm_rope_cat 2x(1399+4096)x24x128", fast, want, 2e-2);
    let (g, u) = (randn([1, 1469, 18944], 2.0), randn([1, 1469, 18944], 1.0));
    let fast = G::silu_mul(g.clone(), u.clone());
    let want = portable_run(|| portable::silu_mul(g.clone(), u.clone()));
    check("silu_mul 1469x18944", fast, want, 2e-2);
    // Qwen2.5-VL's RMSNorm at the language model's and the vision tower's widths.
    for (tokens, dim) in [(1469, 3584), (5476, 1280), (3, 8)] {
        let x = randn([1, tokens, dim], 3.0);
        let w = randn([dim], 0.3) + 1.0;
        let fast = G::rms_norm(x.clone(), &w, 1e-6);
        let want = portable_run(|| portable::rms_norm(x.clone(), &w, 1e-6));
        check(&format!("rms_norm {tokens}x{dim}"), fast, want, 2e-3);
    }
    // The VAE's channel RMS norm (+ SiLU) at the decoder's shapes: it rounds as the portable composition does, so
    // only a rare last-bit difference (the order of the sum of squares) is allowed.
    for (shape, silu) in [([1, 384, 128, 128], true), ([1, 96, 1024, 1024], true), ([2, 384, 16, 16], false)]
    {
        let x = randn(shape, 3.0);
        let gamma = randn([shape[1]], 0.3) + 1.0;
        let fast = G::channel_rms_norm(x.clone(), &gamma, silu);
        let want = portable_run(|| portable::channel_rms_norm(x.clone(), &gamma, silu));
        check(&format!("channel_rms_norm {shape:?}, silu {silu}"), fast, want, 2e-3);
    }
    // Qwen2.5-VL's rotate-half rotary: the language model's (bf16 tables, dense queries and keys) and the vision
    // tower's (f32 tables, a third of the fused QKV).
    let uniform = |shape: [usize; 2]| Tensor::<G, 2>::random(shape, Distribution::Uniform(-1.0, 1.0), &dev());
    for (tokens, heads, dh) in [(1469, 28, 128), (1469, 4, 128), (3, 2, 16)] {
        let x = randn([1, tokens, heads * dh], 3.0).reshape([1, tokens, heads, dh]);
        let (cos, sin) = (uniform([tokens, dh]), uniform([tokens, dh]));
        let fast = G::rotary_half(x.clone(), &cos, &sin);
        let want = portable_run(|| portable::rotary_half(x.clone(), &cos, &sin));
        check(&format!("rotary_half {tokens}x{heads}x{dh}, bf16 tables"), fast, want, 2e-3);
    }
    let (tokens, heads, dh) = (5476, 16, 80);
    let qkv = randn([1, tokens, 3 * heads * dh], 3.0).reshape([1, tokens, 3, heads, dh]);
    let k = qkv.narrow(2, 1, 1).reshape([1, tokens, heads, dh]);
    let (cos, sin) = (uniform([tokens, dh]).cast(DType::F32), uniform([tokens, dh]).cast(DType::F32));
    let fast = G::rotary_half(k.clone(), &cos, &sin);
    let want = portable_run(|| portable::rotary_half(k.clone(), &cos, &sin));
    check(&format!("rotary_half {tokens}x{heads}x{dh} of a fused QKV, f32 tables"), fast, want, 2e-3);
    assert_fast(GLUE, "glue");
}

// ---------------------------------------------------------------------------------------------------------------
// Ordering between burn's queue and the fast path's stream

#[test]
fn interleaved_burn_and_fast_ops_stay_ordered() {
    let _g = setup();
    // A chain where every fast op consumes a burn op's fresh output and vice versa; freed buffers are reused by
    // burn's allocator right away. A missing dependency shows up as a wrong result.
    let (m, k) = (1024, 1024);
    let ws: Vec<Tensor<G, 2>> = (0..4).map(|_| randn([k, k], 1.0 / (k as f64).sqrt())).collect();
    let x0 = randn([1, m, k], 1.0);
    let chain = |x0: Tensor<G, 3>| {
        let mut x = x0;
        for i in 0..24 {
            let y = G::dense(x.clone(), &ws[i % 4], None);
            x = (y * 0.5 + x).clamp(-8.0, 8.0);
        }
        x
    };
    let fast = chain(x0.clone());
    let want = portable_run(|| chain(x0.clone()));
    check("24 × (cuBLASLt GEMM → burn elementwise)", fast, want, 2e-2);
    println!("ordering mode: {:?}", cuda::ordering_mode(&dev()));
}

// ---------------------------------------------------------------------------------------------------------------
// The VAE: convolutions through cuDNN or lowered to cuBLASLt GEMMs, its 384-wide attention lowered to GEMMs

/// A GPU tensor's values as a CPU (Flex, f32) tensor of the same shape.
fn to_cpu<const D: usize>(t: Tensor<G, D>) -> Tensor<CpuBackend, D> {
    let dims = t.dims();
    Tensor::from_data(TensorData::new(to_f32_vec(t), dims), (&Default::default(), DType::F32))
}

#[test]
fn vae_convolutions_and_wide_attention_use_gemms() {
    let _g = setup();
    // The convolutions through cuDNN (needs libcudnn.so.9 on LD_LIBRARY_PATH), then lowered to GEMMs (cuDNN off).
    for (path, kind, ops) in
        [("cuDNN", CONV, FastOps::ALL), ("im2col GEMM", GEMM, FastOps { conv: false, ..FastOps::ALL })]
    {
        cuda::configure(&dev(), FastPathConfig { ops, ..cuda::config(&dev()) }).expect("configuration");
        // (batch, in, out, h, w, kernel, stride, pad): 3×3 "same" at a VAE width, 1×1, the stride-2 downsampler on
        // an odd size, the RGB input convolution (27 im2col columns).
        for (n, c, o, h, w, k, s, p) in [
            (1, 96, 96, 64, 48, 3, 1, 1),
            (2, 64, 32, 17, 9, 1, 1, 0),
            (1, 32, 32, 33, 33, 3, 2, 0),
            (1, 3, 96, 40, 40, 3, 1, 1),
        ] {
            // A bias as large as the convolution's output: a missing or misplaced one fails the check.
            let (x, weight, bias) = (randn([n, c, h, w], 1.0), randn([o, c, k, k], 0.1), randn([o], 1.0));
            reset_stats();
            let fast = G::conv2d_nchw(x.clone(), &weight, &bias, s, p);
            assert_fast(
                kind,
                &format!("conv2d_nchw through {path} (cuDNN needs libcudnn.so.9 on LD_LIBRARY_PATH)"),
            );
            let want = portable::conv2d(to_cpu(x), &to_cpu(weight), &to_cpu(bias), s, p);
            let got = to_f32_vec(fast.clone());
            assert_eq!(fast.dims(), want.dims());
            let err = rel_l2(&got, &want.into_data().to_vec::<f32>().unwrap());
            let what = format!("conv2d_nchw {path} {n}x{c}x{h}x{w} -> {o}, k{k} s{s} p{p}");
            println!("{what:60} rel L2 {err:.2e}");
            assert!(err <= 2e-2 && got.iter().all(|v| v.is_finite()), "{what}: {err:.3e}");
        }
    }
    cuda::configure(&dev(), FastPathConfig { ops: FastOps::ALL, ..cuda::config(&dev()) })
        .expect("configuration");
    // The mid-block attention: one 384-wide head over the latent pixels.
    let q = randn([1, 1024, 1, 384], 1.0);
    let segs = segments(1, &[1024], 1, 384);
    let fast = G::attend(q.clone(), &segs, &AttentionOptions::default());
    let want = reference_attention(&q, &segs, None, false);
    check("attend: VAE single head 384 (GEMM lowering)", fast, want.clone(), 2e-2);
    // In chunks of query rows (300, 300, 300, 124), as the VAE's 16 384 latent pixels at 1024² run (2048 rows each).
    let chunked = lowered::attention_chunked(q, &segs, 300 * 1024 * 4);
    check("attend: VAE single head 384 in chunks of 300 queries", chunked, want, 2e-2);
}

// ---------------------------------------------------------------------------------------------------------------
// 8-bit images across the bus: converted on the GPU, the same bits as the host conversion

#[test]
fn rgb8_upload_and_read_back_match_the_host_conversions() {
    let _g = setup();
    // An odd size (no vector alignment to lean on), every 8-bit level in each channel.
    let (h, w) = (37, 53);
    let rgb: Vec<u8> = (0..h * w * 3).map(|i| ((i * 7919) % 256) as u8).collect();
    let fast = G::upload_rgb8(&rgb, h, w, DType::BF16, &dev()).expect("upload");
    assert_fast(GLUE, "upload_rgb8");
    let want = portable_run(|| portable::upload_rgb8::<G>(&rgb, h, w, DType::BF16, &dev()).expect("upload"));
    let bits = |t: Tensor<G, 4>| t.into_data().as_slice::<burn::tensor::bf16>().unwrap().to_vec();
    assert_eq!(bits(fast.clone()), bits(want), "upload_rgb8: values differ from the host conversion");
    assert_eq!(G::read_rgb8(fast).expect("read"), rgb, "an uploaded image reads back unchanged");
    // Decoder-like outputs: beyond [-1, 1] on both sides, NaN, values near each level's rounding boundary; a batch
    // of two (the first image is read).
    reset_stats();
    let mut v: Vec<f32> = (0..2 * 3 * h * w).map(|i| ((i as f32) * 0.618_034).sin() * 1.3).collect();
    v[5] = f32::NAN;
    v[6] = 2.0 * (127.5 / 255.0) - 1.0;
    let x = Tensor::<G, 4>::from_data(TensorData::new(v, [2, 3, h, w]), (&dev(), DType::BF16));
    let got = G::read_rgb8(x.clone()).expect("read");
    assert_fast(GLUE, "read_rgb8");
    let want = portable_run(|| portable::read_rgb8(x).expect("read"));
    let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "read_rgb8: {differ} of {} bytes differ from the host conversion", want.len());
    println!("rgb8 upload and read-back: bit-identical to the host ({h}×{w})");
}

#[test]
fn staged_activation_uploads_are_exact_and_ordered() {
    let _g = setup();
    let config = cuda::config(&dev());
    cuda::configure(&dev(), FastPathConfig { staged_uploads: true, ..config.clone() })
        .expect("configuration");
    // Busy device first (a GEMM chain), so the uploads queue behind it; more uploads in flight than staging
    // buffers, of sizes below and above one buffer's smallest capacity, each read by a burn op right away.
    let w = randn::<2>([2048, 2048], 1.0 / 2048f64.sqrt());
    let mut busy = randn::<3>([1, 4096, 2048], 1.0);
    for _ in 0..8 {
        busy = G::dense(busy, &w, None).clamp(-4.0, 4.0);
    }
    reset_stats();
    let mut pending = Vec::new();
    for round in 0..3usize {
        for &n in &[1usize, 1000, 600_000, 5_000_000] {
            let host: Vec<burn::tensor::bf16> = (0..n)
                .map(|i| burn::tensor::bf16::from_f32(((i * 31 + round * 7) % 251) as f32 - 125.0))
                .collect();
            let up = G::upload_activation::<1>(TensorData::new(host.clone(), [n]), &dev());
            pending.push((host, up * 2.0));
        }
    }
    assert_fast(GLUE, "upload_activation");
    for (host, doubled) in pending {
        let got = doubled.into_data().to_vec::<burn::tensor::bf16>().expect("bf16 values");
        let want: Vec<_> = host.iter().map(|v| burn::tensor::bf16::from_f32(v.to_f32() * 2.0)).collect();
        assert_eq!(got, want, "a staged upload of {} values differs", host.len());
    }
    drop(busy);
    cuda::configure(&dev(), config).expect("configuration");
    println!("staged activation uploads: 12 uploads (1 to 5 M values) exact behind a busy device");
}
