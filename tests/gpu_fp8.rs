//! GPU correctness of the FP8 operations (feature `cuda`; needs an NVIDIA GPU, so CI only compiles it): the e4m3
//! quantization and GEMMs, the activations quantized once or by the adaLN kernel, the pruning cache's 8-bit K/V
//! restored, and FP8 attention, each against its portable emulation (`qwen_image::quant`). Build and run as
//! `gpu_fast_ops.rs` says; the full-size FP8 DiT is in `gpu_models.rs`.
#![cfg(feature = "cuda")]

mod gpu_support;

use burn::tensor::{Bool, DType, Tensor, TensorData};
use gpu_support::{
    assert_fast, check, dev, portable_run, randn, reset_stats, setup, stats, ATTENTION, FP8, G, GLUE,
};
use qwen_image::{
    ops::{portable, AttentionOptions, KvSegment, QwenBackend},
    quant::{Fp8Activation, Fp8Weight},
    tensor_io::{rel_l2, to_f32_vec},
};

// ---------------------------------------------------------------------------------------------------------------
// GEMMs and activations

/// The bits and scales of an FP8 weight on the host.
fn fp8_parts(w: &Fp8Weight<G>) -> (Vec<u8>, Vec<f32>) {
    (w.bits.clone().into_data().iter::<u8>().collect(), to_f32_vec(w.scales.clone()))
}

#[test]
fn fp8_quantization_and_gemm_match_the_portable_emulation() {
    let _g = setup();
    // (tokens, in, out, gelu): the DiT's MLP and attention shapes at full size, a text-length GEMM.
    for (m, k, n, gelu) in [(1024, 3072, 12288, true), (1024, 12288, 3072, false), (77, 3072, 3072, false)] {
        let w = randn([n, k], 1.0 / (k as f64).sqrt());
        // Rows of different magnitudes and a token with an outlier: the per-row scales matter.
        let rows = Tensor::<G, 1>::from_data(
            TensorData::new((0..n).map(|i| 2f32.powi(i as i32 % 7 - 3)).collect::<Vec<_>>(), [n]),
            &dev(),
        );
        let w = (w * rows.cast(DType::BF16).unsqueeze_dim(1)).cast(DType::BF16);
        let x = randn([1, m, k], 1.0).slice_assign(
            [0..1, 3..4, 5..6],
            Tensor::<G, 3>::full([1, 1, 1], 300.0, &dev()).cast(DType::BF16),
        );
        let b = randn([n], 0.5);
        let fast = G::quantize_fp8(w.clone());
        let want = portable_run(|| G::quantize_fp8(w.clone()));
        assert_eq!(
            fp8_parts(&fast),
            fp8_parts(&want),
            "{m}x{k}x{n}: the quantization kernel differs from the host"
        );
        let got = if gelu {
            G::dense_fp8_gelu_tanh(x.clone(), &fast, Some(&b))
        } else {
            G::dense_fp8(x.clone(), &fast, Some(&b))
        };
        let reference = portable_run(|| {
            if gelu {
                G::dense_fp8_gelu_tanh(x.clone(), &want, Some(&b))
            } else {
                G::dense_fp8(x.clone(), &want, Some(&b))
            }
        });
        // The same e4m3 products in another summation order, each side rounded once to bf16.
        check(&format!("fp8 GEMM {m}x{k}x{n} gelu {gelu} vs the emulation"), got, reference, 1e-2);
    }
    assert_fast(FP8, "FP8 quantization and GEMMs");
    // A width cuBLASLt's FP8 GEMM does not take (K not a multiple of 16) falls back to the emulation.
    let (x, w) = (randn([1, 5, 40], 1.0), G::quantize_fp8(randn([24, 40], 0.2)));
    let before = stats()[FP8].fallbacks;
    drop(G::dense_fp8(x, &w, None));
    assert_eq!(stats()[FP8].fallbacks, before + 1);
}

/// The bits and scales of a quantized activation on the host.
fn activation_parts(q: &Fp8Activation<G>) -> (Vec<u8>, Vec<f32>) {
    (q.bits.clone().into_data().iter::<u8>().collect(), to_f32_vec(q.scales.clone()))
}

#[test]
fn fp8_activations_quantized_once_or_by_the_adaln_kernel_are_bit_identical() {
    let _g = setup();
    reset_stats();
    // The DiT's width (the `_3072` kernels) and a wider one, an odd token count, two modulation rows.
    for (dim, tokens) in [(3072, 777), (4096, 131)] {
        let x = randn([2, tokens, dim], 1.0).slice_assign(
            [1..2, 7..8, 9..10],
            Tensor::<G, 3>::full([1, 1, 1], 500.0, &dev()).cast(DType::BF16),
        );
        let (shift, scale) = (randn([2, 2, dim], 0.5), randn([2, 2, dim], 0.5));
        let runs = [(tokens - 100, 0), (100, 1)];
        let ln = G::layer_norm_modulate(x.clone(), &shift, &scale, &runs, 1e-6);
        // The quantization kernel against the host's rounding.
        let once = G::quantize_activation_fp8(ln.clone());
        let host = portable_run(|| portable::quantize_activation(ln.clone()));
        assert_eq!(
            activation_parts(&once),
            activation_parts(&host),
            "dim {dim}: kernel vs host quantization"
        );
        // The fused adaLN + quantization: the same bf16 rows and the same e4m3 rows.
        let (dense, fused) = G::layer_norm_modulate_fp8(x.clone(), &shift, &scale, &runs, 1e-6, true);
        assert_eq!(
            to_f32_vec(dense.expect("dense output")),
            to_f32_vec(ln.clone()),
            "dim {dim}: fused bf16 rows"
        );
        assert_eq!(activation_parts(&fused), activation_parts(&once), "dim {dim}: fused e4m3 rows");
        let (none, alone) = G::layer_norm_modulate_fp8(x, &shift, &scale, &runs, 1e-6, false);
        assert!(none.is_none());
        assert_eq!(
            activation_parts(&alone),
            activation_parts(&once),
            "dim {dim}: e4m3 rows without bf16 ones"
        );
        // A GEMM from the quantized rows is the one-call FP8 GEMM, and within the emulation's bound.
        let w = G::quantize_fp8(randn([1024, dim], 1.0 / (dim as f64).sqrt()));
        let b = randn([1024], 0.5);
        for gelu in [false, true] {
            let from_rows = G::dense_fp8_quantized(&fused, &w, Some(&b), gelu);
            let one_call = if gelu {
                G::dense_fp8_gelu_tanh(ln.clone(), &w, Some(&b))
            } else {
                G::dense_fp8(ln.clone(), &w, Some(&b))
            };
            let what = format!("fp8 GEMM from fused rows, dim {dim}, gelu {gelu}");
            assert_eq!(to_f32_vec(from_rows.clone()), to_f32_vec(one_call), "{what}: vs the one-call GEMM");
            let emulated = portable_run(|| portable::dense_fp8_quantized(&fused, &w, Some(&b), gelu));
            check(&what, from_rows, emulated, 1e-2);
        }
    }
    assert_fast(FP8, "fused FP8 adaLN, activation quantization and GEMMs");
    assert_fast(GLUE, "adaLN");
}

#[test]
fn fp8_cached_keys_and_values_are_restored_as_on_the_host() {
    let _g = setup();
    reset_stats();
    // The pruning cache's K/V of a 1024² condition image (one block's, fewer tokens), and rows of 8 values.
    for (tokens, k) in [(1000, 3072), (37, 8)] {
        let x = randn([2, tokens, k], 1.0).slice_assign(
            [1..2, 3..4, 5..6],
            Tensor::<G, 3>::full([1, 1, 1], 700.0, &dev()).cast(DType::BF16),
        );
        let q = G::quantize_activation_fp8(x.clone());
        let got = G::dequantize_activation_fp8(&q);
        let want = portable_run(|| portable::dequantize_activation(&q));
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(to_f32_vec(got.clone()), to_f32_vec(want), "{tokens}×{k}: kernel vs burn ops");
        let err = rel_l2(&to_f32_vec(got), &to_f32_vec(x));
        println!("{tokens}×{k}: restored K/V rel. L2 to the bf16 input {err:.2e}");
        assert!(err > 1e-3 && err < 5e-2, "{tokens}×{k}: {err:.3e}");
    }
    assert_fast(FP8, "FP8 cache quantization and restoring");
}

// ---------------------------------------------------------------------------------------------------------------
// Attention

/// `t` scaled by `2^(i % period − shift)` along axis `axis` (rows, heads or columns of different magnitudes, so that
/// every scale of the FP8 attention matters).
fn spread<const D: usize>(t: Tensor<G, D>, axis: usize, period: usize, shift: i32) -> Tensor<G, D> {
    let n = t.dims()[axis];
    let mut shape = [1; D];
    shape[axis] = n;
    let f: Vec<f32> = (0..n).map(|i| 2f32.powi((i % period) as i32 - shift)).collect();
    // Powers of two: exact in bf16, so the product is the bf16 tensor scaled.
    let f = Tensor::<G, 1>::from_data(TensorData::new(f, [n]), &dev()).cast(DType::BF16).reshape(shape);
    (t * f).cast(DType::BF16)
}

/// Random key/value segments `[b, len, hk, d]`: keys of a different magnitude per head, values per column.
fn fp8_segments(b: usize, lens: &[usize], hk: usize, d: usize) -> Vec<KvSegment<G>> {
    lens.iter()
        .map(|&n| KvSegment {
            key: spread(randn([b, n, hk, d], 1.0), 2, 3, 1),
            value: spread(randn([b, n, hk, d], 1.0), 3, 7, 3),
        })
        .collect()
}

/// (what, batch, queries, key segment lengths, heads, kv heads)
type Fp8Case = (&'static str, usize, usize, &'static [usize], usize, usize);

#[test]
fn fp8_attention_matches_the_host_emulation() {
    let _g = setup();
    reset_stats();
    // (what, batch, queries, key segment lengths, heads, kv heads): partial tiles, GQA, a single query, more
    // segments than the kernel takes (the tail merged), at head dim 128.
    let cases: &[Fp8Case] = &[
        ("3 segments, partial tiles", 1, 700, &[137, 300, 263], 4, 4),
        ("batch 2, GQA 6/3, 4 odd segments", 2, 300, &[1, 127, 129, 200], 6, 3),
        ("one query", 1, 1, &[5, 300], 8, 8),
        ("5 segments", 1, 200, &[9, 9, 9, 9, 150], 2, 2),
    ];
    let fp8 = AttentionOptions { fp8: true, ..Default::default() };
    for &(what, b, nq, lens, h, hk) in cases {
        let q = spread(randn([b, nq, h, 128], 1.0), 1, 5, 2);
        let segs = fp8_segments(b, lens, hk, 128);
        let got = G::attend(q.clone(), &segs, &fp8);
        let want = portable::attention(q.clone(), &segs, &fp8);
        // The same operands and integer logits (exact on both sides), the probabilities rounded against the same
        // running maxima; only `exp2`'s last bits, the P·V sums' order and the tensor cores' FP8 accumulation differ.
        check(&format!("fp8 attention: {what} vs the emulation"), got.clone(), want, 5e-3);
        let exact = G::attend(q, &segs, &AttentionOptions::default());
        let err = rel_l2(&to_f32_vec(got), &to_f32_vec(exact));
        println!("{:60} rel L2 {err:.2e}", format!("fp8 attention: {what} vs bf16"));
    }
    // A padded text prompt: batch 2, the second item's last 30 text keys masked out.
    let (b, txt, img, h) = (2, 100, 300, 4);
    let q = spread(randn([b, txt + img, h, 128], 1.0), 1, 5, 2);
    let segs = fp8_segments(b, &[txt, img], h, 128);
    let mut m = vec![true; b * (txt + img)];
    for j in txt - 30..txt {
        m[(txt + img) + j] = false;
    }
    let mask = Tensor::<G, 2, Bool>::from_data(TensorData::new(m, [b, txt + img]), &dev());
    let masked = AttentionOptions { key_mask: Some(mask), ..fp8.clone() };
    let got = G::attend(q.clone(), &segs, &masked);
    check(
        "fp8 attention: key mask vs the emulation",
        got.clone(),
        portable::attention(q.clone(), &segs, &masked),
        5e-3,
    );
    let unmasked = to_f32_vec(G::attend(q, &segs, &fp8));
    let e = rel_l2(&to_f32_vec(got), &unmasked);
    assert!(e > 5e-2, "the mask changed the FP8 result by only {e:.2e}");
    assert_fast(ATTENTION, "FP8 attention");
    // A head dim the kernel does not take falls back to the emulation itself.
    let (q, segs) = (randn([1, 50, 2, 64], 1.0), fp8_segments(1, &[70], 2, 64));
    let before = stats()[ATTENTION].fallbacks;
    let got = G::attend(q.clone(), &segs, &fp8);
    assert_eq!(stats()[ATTENTION].fallbacks, before + 1);
    assert_eq!(to_f32_vec(got), to_f32_vec(portable::attention(q, &segs, &fp8)));
}
