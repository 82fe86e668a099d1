//! GPU correctness of the CUDA fast path (feature `cuda`; needs an NVIDIA GPU, so CI only compiles it).
//!
//! Every fast operation is compared with an independent reference on random inputs of the real shapes (relative
//! L2 ≤ 2e-2 in bf16, no NaN), with outputs poisoned with NaN before each kernel runs; the tiny DiT fixture runs on
//! the GPU and is compared with the CPU; the modulation table is compared bit for bit with rows computed per call.
//! Build here, run on the GPU host (see `docs/performance.md`):
//!
//! ```text
//! CARGO_TARGET_DIR=target/cuda cargo test --release --features cuda --test gpu_fast_ops --no-run
//! LD_LIBRARY_PATH=/usr/local/cuda/lib64 <binary> --test-threads=1 --nocapture
//! ```
#![cfg(feature = "cuda")]

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use burn::tensor::{Bool, DType, Distribution, Tensor, TensorData};
use qwen_image::{
    cuda::{self, CudaBackend, CudaDevice, FastOps, FastPathConfig, FlashKernel},
    dit::{DitConfig, DitInput, DitLoadOptions, ImageShape, ModulationMode, QwenImageTransformer},
    ops::{portable, AttentionOptions, FastKindStats, KvSegment, NormRope, QwenBackend},
    synthetic,
    tensor_io::{rel_l2, to_f32_vec, TensorFile},
    weights::WeightStore,
    CpuBackend,
};
use qwen_image_edit::reference::{dit_forward, read_dit_input};

type G = CudaBackend;

/// Every test runs on GPU 0 and changes its fast-path configuration (flash kernel, fast path off for references)
/// and reads and resets its counters, which are per device: run one test at a time.
static LOCK: Mutex<()> = Mutex::new(());

/// Calls the references of the current test made with the fast path off, per kind: booked as fallbacks, they are
/// not the fast path's (see [`portable_run`] and [`assert_fast`]).
static REFERENCE_FALLBACKS: Mutex<[u64; 3]> = Mutex::new([0; 3]);

/// Kinds of operation in the order of the fast-path report.
const GEMM: usize = 0;
const ATTENTION: usize = 1;
const GLUE: usize = 2;

/// (what, batch, queries, key segment lengths, heads, kv heads, head dim, causal)
type AttnCase = (&'static str, usize, usize, &'static [usize], usize, usize, usize, bool);

fn dev() -> CudaDevice {
    CudaDevice::new(0)
}

/// Every test runs with everything on and outputs poisoned with NaN before each kernel.
fn setup() -> std::sync::MutexGuard<'static, ()> {
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    cuda::configure_runtime_caches(None).expect("kernel cache folder");
    let (ops, flash_kernel) = (FastOps::ALL, FlashKernel::Auto);
    let config = FastPathConfig { ops, flash_kernel, poison_outputs: true, ..cuda::config(&dev()) };
    cuda::configure(&dev(), config).expect("fast-path configuration");
    reset_stats();
    guard
}

/// Zeroes the device's counters (and this test's reference fallbacks).
fn reset_stats() {
    cuda::reset_stats(&dev());
    *REFERENCE_FALLBACKS.lock().unwrap_or_else(|e| e.into_inner()) = [0; 3];
}

/// The fast path's counters of GPU 0, per kind.
fn stats() -> Vec<FastKindStats> {
    G::fast_path_report(&dev()).expect("the CUDA backend reports its fast path").kinds
}

/// Chooses the flash kernel of GPU 0.
fn set_flash_kernel(flash_kernel: FlashKernel) {
    cuda::configure(&dev(), FastPathConfig { flash_kernel, ..cuda::config(&dev()) }).expect("configuration");
}

fn randn<const D: usize>(shape: [usize; D], std: f64) -> Tensor<G, D> {
    Tensor::<G, D>::random(shape, Distribution::Normal(0.0, std), &dev()).cast(DType::BF16)
}

/// Relative L2 error of `got` against `want` on the host; fails on NaN/∞ in `got`.
fn check<const D: usize>(what: &str, got: Tensor<G, D>, want: Tensor<G, D>, tol: f64) -> f64 {
    match try_check(what, got, want, tol) {
        Ok(err) => err,
        Err(msg) => panic!("{msg}"),
    }
}

/// [`check`] that reports a failure instead of panicking (so that every kernel of a case gets checked).
fn try_check<const D: usize>(
    what: &str,
    got: Tensor<G, D>,
    want: Tensor<G, D>,
    tol: f64,
) -> Result<f64, String> {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let (g, w) = (to_f32_vec(got), to_f32_vec(want));
    let bad = g.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        let msg = format!("{what}: {bad} non-finite outputs (unwritten elements stay NaN-poisoned)");
        println!("{msg}");
        return Err(msg);
    }
    let err = rel_l2(&g, &w);
    println!("{what:60} rel L2 {err:.2e}");
    if err > tol {
        return Err(format!("{what}: relative L2 error {err:.3e} > {tol:.1e}"));
    }
    Ok(err)
}

/// Runs `f` on the portable path (burn's own kernels), for a reference.
fn portable_run<T>(f: impl FnOnce() -> T) -> T {
    let before = stats();
    let config = cuda::config(&dev());
    cuda::configure(&dev(), FastPathConfig { ops: FastOps::NONE, ..config.clone() }).expect("configuration");
    let out = f();
    cuda::configure(&dev(), config).expect("configuration");
    // Calls made while a kind is off count as its fallbacks: remember them as the reference's.
    let mut reference = REFERENCE_FALLBACKS.lock().unwrap_or_else(|e| e.into_inner());
    for ((b, a), counter) in before.iter().zip(stats()).zip(reference.iter_mut()) {
        *counter += a.fallbacks - b.fallbacks;
    }
    out
}

/// Asserts that operations of `kind` ran on the fast path since [`setup`] (or the last [`reset_stats`]) and none
/// of them fell back or failed.
fn assert_fast(kind: usize, what: &str) {
    let s = &stats()[kind];
    let reference = REFERENCE_FALLBACKS.lock().unwrap_or_else(|e| e.into_inner())[kind];
    assert!(s.calls > 0, "{what}: the fast path did not run ({s:?})");
    assert_eq!(s.errors, 0, "{what}: CUDA errors ({s:?})");
    assert_eq!(s.fallbacks, reference, "{what}: fell back ({s:?}; {reference} were the references')");
}

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
        let opts = AttentionOptions { causal, key_mask: None };
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
    let opts = AttentionOptions { causal: false, key_mask: Some(mask) };
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
    assert_fast(GLUE, "glue");
}

// ---------------------------------------------------------------------------------------------------------------
// Ordering and the whole model

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

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dit").join(case)
}

#[test]
fn tiny_dit_on_the_gpu_matches_the_cpu() {
    let _g = setup();
    // (`heldout`, head dim 8, is left out: its attention falls back to burn's own CUDA attention, whose autotuning
    // takes minutes per shape; the CPU parity tests cover that fixture.)
    for case in ["plain", "zero_cond"] {
        let dir = fixture(case);
        let inputs = dir.join("inputs.safetensors");
        let gpu = QwenImageTransformer::<G>::load(&dir.join("transformer"), DType::BF16, &dev()).unwrap();
        reset_stats();
        let (out, shape) = dit_forward(&gpu, &inputs).unwrap();
        let s = stats();
        let calls: Vec<u64> = s.iter().map(|k| k.calls).collect();
        let fallbacks: Vec<u64> = s.iter().map(|k| k.fallbacks).collect();
        println!("{case}: fast-path calls {calls:?}, fallbacks {fallbacks:?}");
        assert!(
            calls.iter().all(|&c| c > 0) && fallbacks == [0; 3],
            "{case}: not all on the fast path: {s:?}"
        );
        let cpu = QwenImageTransformer::<CpuBackend>::load(
            &dir.join("transformer"),
            DType::BF16,
            &Default::default(),
        )
        .unwrap();
        let (want, _) = dit_forward(&cpu, &inputs).unwrap();
        let bad = out.iter().filter(|v| !v.is_finite()).count();
        assert_eq!(bad, 0, "{case}: non-finite outputs");
        let err = rel_l2(&out, &want);
        let diffusers =
            TensorFile::open(&dir.join("expected_bf16.safetensors")).unwrap().f32("sample").unwrap().0;
        let err_ref = rel_l2(&out, &diffusers);
        println!("{case}: shape {shape:?}, GPU vs CPU (bf16) rel L2 {err:.2e}, GPU vs diffusers bf16 {err_ref:.2e}");
        assert!(err <= 2e-2 && err_ref <= 2e-2, "{case}: {err:.3e} / {err_ref:.3e}");
    }
}

#[test]
fn the_modulation_table_is_bit_identical_on_the_gpu() {
    let _g = setup();
    use ModulationMode::{Resident, Table};
    let options = |modulation| DitLoadOptions { modulation };
    let mut cases = Vec::new();
    for case in ["plain", "zero_cond"] {
        let dir = fixture(case).join("transformer");
        let [resident, table] = [Resident, Table]
            .map(|m| QwenImageTransformer::<G>::load_with(&dir, DType::BF16, &options(m), &dev()).unwrap());
        let file = TensorFile::open(&fixture(case).join("inputs.safetensors")).unwrap();
        cases.push((format!("{case} fixture"), resident, table, read_dit_input::<G>(&file, &dev()).unwrap()));
    }
    // Two full-width blocks with random weights: the real modulation GEMM, [rows, 3072] × [18432, 3072]ᵀ.
    for zero_cond_t in [false, true] {
        let config = DitConfig { num_layers: 2, zero_cond_t, ..DitConfig::default() };
        let [resident, table] = [Resident, Table].map(|m| {
            let mut store = WeightStore::random(DType::BF16, 3);
            QwenImageTransformer::<G>::from_store_with(config.clone(), &mut store, &options(m), &dev())
                .unwrap()
        });
        let input = DitInput {
            hidden_states: randn([1, 32, config.in_channels], 1.0),
            encoder_hidden_states: randn([1, 8, config.joint_attention_dim], 1.0),
            encoder_hidden_states_mask: None,
            timestep: vec![0.7],
            img_shapes: vec![ImageShape::new(4, 4), ImageShape::new(4, 4)],
            modulation: None,
        };
        cases.push((format!("2 full-width blocks, zero_cond_t {zero_cond_t}"), resident, table, input));
    }
    let bits = |t: Tensor<G, 3>| to_f32_vec(t).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (name, resident, table_mode, mut input) in cases {
        // Rows computed in every forward pass from resident weights (the layout before the table), after a warm-up;
        // then table mode without a table (each layer made on the GPU for the call), and with one.
        drop(resident.forward(&input).unwrap());
        let want = bits(resident.forward(&input).unwrap());
        assert!(want.iter().all(|&b| f32::from_bits(b).is_finite()), "{name}: non-finite outputs");
        assert_eq!(bits(table_mode.forward(&input).unwrap()), want, "{name}: rows made per call differ");
        let timesteps = input.timestep.clone();
        input.modulation = Some(table_mode.modulation_table(&[&timesteps]).unwrap());
        assert_eq!(bits(table_mode.forward(&input).unwrap()), want, "{name}: table rows differ");
        println!("{name}: {} outputs, table vs rows computed per forward pass: bit-identical", want.len());
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Weight loading: straight from the memory-mapped checkpoint into device memory

#[test]
fn weights_upload_straight_from_the_memory_map() {
    let _g = setup();
    let dir = std::env::temp_dir().join(format!("qwen-gpu-upload-{}", std::process::id()));
    let tensors: Vec<(String, Vec<usize>)> = vec![
        ("a.weight".into(), vec![3, 1000]),
        ("b.weight".into(), vec![4097, 33]),
        ("c.bias".into(), vec![7]),
    ];
    // Small shards: the three tensors land in two files, the second at an offset inside its file.
    synthetic::write_random_checkpoint(&dir, "model", &tensors, 10_000, 7).expect("checkpoint");
    let mut gpu_store = WeightStore::open_dir(&dir, "model", DType::BF16).expect("open");
    let mut cpu_store = WeightStore::open_dir(&dir, "model", DType::BF16).expect("open");
    let a: Tensor<G, 2> = gpu_store.tensor("a.weight", [3, 1000], &dev()).expect("a");
    let b: Tensor<G, 2> = gpu_store.tensor("b.weight", [4097, 33], &dev()).expect("b");
    let c: Tensor<G, 1> = gpu_store.tensor("c.bias", [7], &dev()).expect("c");
    assert_fast(GLUE, "weight upload");
    let cpu = Default::default();
    let want_b: Tensor<CpuBackend, 2> = cpu_store.tensor("b.weight", [4097, 33], &cpu).expect("b");
    let want_c: Tensor<CpuBackend, 1> = cpu_store.tensor("c.bias", [7], &cpu).expect("c");
    let want_a: Tensor<CpuBackend, 2> = cpu_store.tensor("a.weight", [3, 1000], &cpu).expect("a");
    let host = |d: TensorData| d.convert::<f32>().to_vec::<f32>().unwrap();
    // Bit-exact copies, and burn's kernels that read them right away see the uploaded values (ordering).
    assert_eq!(to_f32_vec(a), host(want_a.into_data()));
    assert_eq!(to_f32_vec(c), host(want_c.into_data()));
    let doubled = to_f32_vec(b * 2.0);
    let want = host(want_b.mul_scalar(2.0).into_data());
    assert_eq!(doubled, want);
    assert!(doubled.iter().any(|&v| v != 0.0), "the checkpoint values are random, not zero");
    // f32 host data (LoRA adapters are uploaded this way, then cast to the model dtype).
    let values: Vec<f32> = (0..35).map(|i| i as f32 * 0.25 - 3.0).collect();
    let f32_tensor: Tensor<G, 2> = G::upload(TensorData::new(values.clone(), [5, 7]), &dev());
    assert_eq!(f32_tensor.dtype(), DType::F32);
    assert_eq!(to_f32_vec(f32_tensor.cast(DType::BF16)), values, "exact in bf16 too (multiples of 1/4)");
    assert_fast(GLUE, "f32 upload");
    println!("weight upload: 3 tensors from 2 mapped shards and one f32 tensor, bit-exact");
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------------------------------
// The VAE: convolutions and its 384-wide attention lowered to cuBLASLt GEMMs

/// A GPU tensor's values as a CPU (Flex, f32) tensor of the same shape.
fn to_cpu<const D: usize>(t: Tensor<G, D>) -> Tensor<CpuBackend, D> {
    let dims = t.dims();
    Tensor::from_data(TensorData::new(to_f32_vec(t), dims), (&Default::default(), DType::F32))
}

#[test]
fn vae_convolutions_and_wide_attention_use_gemms() {
    let _g = setup();
    // (batch, in, out, h, w, kernel, stride, pad): 3×3 "same" at a VAE width, 1×1, the stride-2 downsampler on an
    // odd size, the RGB input convolution (27 im2col columns).
    for (n, c, o, h, w, k, s, p) in [
        (1, 96, 96, 64, 48, 3, 1, 1),
        (2, 64, 32, 17, 9, 1, 1, 0),
        (1, 32, 32, 33, 33, 3, 2, 0),
        (1, 3, 96, 40, 40, 3, 1, 1),
    ] {
        let (x, weight, bias) = (randn([n, c, h, w], 1.0), randn([o, c, k, k], 0.1), randn([o], 0.1));
        reset_stats();
        let fast = G::conv2d_nchw(x.clone(), &weight, &bias, s, p);
        assert!(stats()[GEMM].calls > 0, "the convolution did not run a cuBLASLt GEMM");
        let want = portable::conv2d(to_cpu(x), &to_cpu(weight), &to_cpu(bias), s, p);
        let got = to_f32_vec(fast.clone());
        assert_eq!(fast.dims(), want.dims());
        let err = rel_l2(&got, &want.into_data().to_vec::<f32>().unwrap());
        println!("{:60} rel L2 {err:.2e}", format!("conv2d_nchw {n}x{c}x{h}x{w} -> {o}, k{k} s{s} p{p}"));
        assert!(
            err <= 2e-2 && got.iter().all(|v| v.is_finite()),
            "conv {:?}: {err:.3e}",
            (n, c, o, h, w, k, s, p)
        );
    }
    // The mid-block attention: one 384-wide head over the latent pixels.
    let q = randn([1, 1024, 1, 384], 1.0);
    let segs = segments(1, &[1024], 1, 384);
    let fast = G::attend(q.clone(), &segs, &AttentionOptions::default());
    check(
        "attend: VAE single head 384 (GEMM lowering)",
        fast,
        reference_attention(&q, &segs, None, false),
        2e-2,
    );
}

#[test]
fn tiny_vae_on_the_gpu_matches_the_cpu() {
    let _g = setup();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae/tiny");
    let inputs = dir.join("inputs.safetensors");
    let gpu =
        qwen_image::vae::AutoencoderKLQwenImage::<G>::load(&dir.join("vae"), DType::BF16, &dev()).unwrap();
    let cpu = qwen_image::vae::AutoencoderKLQwenImage::<CpuBackend>::load(
        &dir.join("vae"),
        DType::BF16,
        &Default::default(),
    )
    .unwrap();
    let (g, c) = (
        qwen_image_edit::reference::vae_file(&gpu, &inputs, None).unwrap(),
        qwen_image_edit::reference::vae_file(&cpu, &inputs, None).unwrap(),
    );
    for ((name, got, _), (_, want, _)) in g.into_iter().zip(c) {
        let err = rel_l2(&got, &want);
        println!("tiny VAE {name}: GPU vs CPU (bf16) rel L2 {err:.2e}");
        assert!(err <= 2e-2 && got.iter().all(|v| v.is_finite()), "{name}: {err:.3e}");
    }
}
