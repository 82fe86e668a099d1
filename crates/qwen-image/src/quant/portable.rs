//! The portable FP8 operations ([`QwenBackend::quantize_fp8`], [`QwenBackend::dense_fp8`] and
//! [`QwenBackend::dense_fp8_gelu_tanh`]'s defaults): an exact emulation, in f32, of what an FP8 GEMM with per-row
//! activation scales and per-column weight scales computes. The quantization itself runs on the host with the
//! [`e4m3`] functions (one definition of the rounding for weights and activations), so a device backend pays a
//! round trip per call here: this path is the reference, the CUDA backend overrides it.
//!
//! For `x [M, K]` (the tokens of all batch items as rows) and an [`Fp8Weight`] `(bits [N, K], sw [N])`:
//!
//! 1. `sx[m] = row_scale(max_k |x[m, k]|)` and `qx[m, k] = e4m3(x[m, k] / sx[m])` ([`e4m3::quantize_rows`], from
//!    `x` cast to f32);
//! 2. `acc[m, n] = Σ_k e4m3(qx[m, k]) · e4m3(bits[n, k])` in f32 (every product is exact in f32, so only the order
//!    of the sums can differ from a GPU's);
//! 3. `y[m, n] = acc[m, n] · sx[m] · sw[n] + bias[n]` in f32 (the bias cast from its dtype), then the GELU-tanh for
//!    the fused variant, rounded once to `x`'s dtype.

use burn::tensor::{DType, Int, Tensor, TensorData};

pub use super::activation::{
    dense_fp8_quantized, dequantize_activation, layer_norm_modulate_fp8, quantize_activation,
};
use super::{e4m3, Fp8Weight};
use crate::ops::QwenBackend;

/// [`QwenBackend::quantize_fp8`]'s default: per-row scales and e4m3 rounding on the host ([`e4m3::quantize_rows`]),
/// bits and scales uploaded to the weight's device.
pub fn quantize_fp8<B: QwenBackend>(weight: Tensor<B, 2>) -> Fp8Weight<B> {
    let ([out, inp], dtype, device) = (weight.dims(), weight.dtype(), weight.device());
    let q = e4m3::quantize_rows(&host_f32(weight), inp);
    let bits = Tensor::<B, 2, Int>::from_data(TensorData::new(q.bits, [out, inp]), (&device, DType::U8));
    let scales = Tensor::<B, 1>::from_data(TensorData::new(q.scales, [out]), (&device, DType::F32));
    Fp8Weight::from_fitting_parts(bits, scales, dtype)
}

/// [`QwenBackend::dense_fp8`]'s default (see the module docs): step 1 by [`quantize_activation`], steps 2–3 by
/// [`dense_fp8_quantized`].
pub fn dense_fp8<B: QwenBackend>(
    x: Tensor<B, 3>,
    weight: &Fp8Weight<B>,
    bias: Option<&Tensor<B, 1>>,
) -> Tensor<B, 3> {
    dense_fp8_quantized(&quantize_activation(x), weight, bias, false)
}

/// [`QwenBackend::dense_fp8_gelu_tanh`]'s default: the GELU-tanh of [`dense_fp8`]'s f32 result, rounded once.
pub fn dense_fp8_gelu_tanh<B: QwenBackend>(
    x: Tensor<B, 3>,
    weight: &Fp8Weight<B>,
    bias: Option<&Tensor<B, 1>>,
) -> Tensor<B, 3> {
    dense_fp8_quantized(&quantize_activation(x), weight, bias, true)
}

/// The values of `t` in f32 on the host, row-major.
pub(super) fn host_f32<B: QwenBackend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().iter::<f32>().collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use burn::{
        backend::Flex,
        tensor::{Distribution, Tensor},
    };

    use super::*;
    use crate::tensor_io::rel_l2;

    fn randn<const D: usize>(shape: [usize; D], std: f64) -> Tensor<Flex, D> {
        Tensor::random(shape, Distribution::Normal(0.0, std), &Default::default())
    }

    fn host<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.cast(DType::F32).into_data().iter::<f32>().collect()
    }

    /// The FP8 linear written out with loops over host values: per-row scales and e4m3 rounding of both operands
    /// element by element, f64 sums.
    pub(crate) fn reference(x: &[f32], w: &[f32], bias: &[f32], k: usize) -> Vec<f32> {
        let quantize = |row: &[f32]| {
            let s = e4m3::row_scale(row.iter().fold(0f32, |m, v| m.max(v.abs())));
            (
                row.iter().map(|&v| f64::from(e4m3::decode(e4m3::encode(v / s)))).collect::<Vec<_>>(),
                f64::from(s),
            )
        };
        let rows: Vec<_> = x.chunks(k).map(quantize).collect();
        let cols: Vec<_> = w.chunks(k).map(quantize).collect();
        let mut y = Vec::new();
        for (qx, sx) in &rows {
            for (n, (qw, sw)) in cols.iter().enumerate() {
                let acc: f64 = qx.iter().zip(qw).map(|(a, b)| a * b).sum();
                y.push((acc * sx * sw + f64::from(bias[n])) as f32);
            }
        }
        y
    }

    #[test]
    fn the_emulated_fp8_linear_is_the_written_out_one() {
        let (x, w, b) = (randn([2, 5, 48], 1.0), randn([7, 48], 0.05), randn([7], 0.1));
        // One token with an outlier (its row scale is large), one weight row of zeros.
        let x = x.slice_assign([0..1, 2..3, 3..4], Tensor::full([1, 1, 1], 300.0, &Default::default()));
        let w = w.slice_assign([4..5, 0..48], Tensor::zeros([1, 48], &Default::default()));
        let fp8 = Fp8Weight::quantize(w.clone());
        let want = reference(&host(x.clone()), &host(w.clone()), &host(b.clone()), 48);
        let got = host(dense_fp8(x.clone(), &fp8, Some(&b)));
        assert!(rel_l2(&got, &want) < 1e-6, "{:.2e}", rel_l2(&got, &want));
        // The GELU variant applies the activation to the same f32 result.
        let gelu = host(burn::tensor::activation::gelu_approximate(Tensor::<Flex, 1>::from_floats(
            want.as_slice(),
            &Default::default(),
        )));
        let got = host(dense_fp8_gelu_tanh(x.clone(), &fp8, Some(&b)));
        assert!(rel_l2(&got, &gelu) < 1e-6);
        // Against the unquantized product: close (e4m3 keeps 3 mantissa bits), and a wrong scale layout is far off.
        let exact = host(crate::ops::portable::dense(x.clone(), &w, Some(&b)));
        let err = rel_l2(&host(dense_fp8(x.clone(), &fp8, Some(&b))), &exact);
        assert!(err < 0.06, "fp8 vs f32: {err:.3}");
        let mut swapped = fp8.clone();
        swapped.scales = swapped.scales.flip([0]);
        assert!(rel_l2(&host(dense_fp8(x, &swapped, Some(&b))), &exact) > 0.5);
    }

    #[test]
    fn bf16_inputs_give_bf16_outputs() {
        let (x, w) = (randn([1, 3, 32], 1.0), randn([5, 32], 0.1));
        let fp8 = Fp8Weight::quantize(w.clone().cast(DType::BF16));
        assert_eq!(fp8.dtype, DType::BF16);
        let y = dense_fp8(x.clone().cast(DType::BF16), &fp8, None);
        assert_eq!(y.dtype(), DType::BF16);
        let want = reference(&host(x.cast(DType::BF16)), &host(w.cast(DType::BF16)), &[0.0; 5], 32);
        // Within one bf16 rounding of the written-out result (the sums' order may tip a rounding).
        for (got, want) in host(y).iter().zip(&want) {
            assert!((got - want).abs() <= want.abs() * 2f32.powi(-8), "{got} vs {want}");
        }
    }

    #[test]
    fn quantized_weights_are_the_host_quantizer_s_bits_and_dequantize_close() {
        let w = randn([6, 20], 0.02);
        let q = e4m3::quantize_rows(&host(w.clone()), 20);
        let fp8 = quantize_fp8(w.clone());
        assert_eq!(fp8.bits.dtype(), DType::U8);
        let bits: Vec<u8> = fp8.bits.clone().into_data().iter::<u8>().collect();
        assert_eq!(bits, q.bits);
        assert_eq!(host(fp8.scales.clone()), q.scales);
        assert_eq!(fp8.size_bytes(), 6 * 20 + 4 * 6);
        let err = rel_l2(&host(fp8.dequantize()), &host(w));
        assert!(err > 1e-4 && err < 0.04, "{err:.3}");
    }
}
