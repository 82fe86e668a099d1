//! [`Fp8Activation`]: an activation quantized per token, made once for every FP8 layer that reads it (the Q/K/V
//! projections of one stream read the same modulated tokens), or by the kernel that produces the activation
//! ([`QwenBackend::layer_norm_modulate_fp8`]). Issue 13 asks for that fusion: a separate quantization pass per GEMM
//! reads and writes every activation once more (FBGEMM measured it at 17 %).

use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};

use super::{e4m3, Fp8Weight};
use crate::ops::QwenBackend;

/// `x [batch, tokens, K]` as e4m3 bits and one f32 scale per token: `x[b, t, k] ≈ e4m3(bits[b, t, k]) · scales[b, t]`,
/// step 1 of [`QwenBackend::dense_fp8`] (the same rounding as a weight row's, [`e4m3::quantize_rows`]).
#[derive(Clone, Debug)]
pub struct Fp8Activation<B: Backend> {
    /// e4m3 bit patterns `[batch, tokens, K]` in an integer tensor of dtype `U8`.
    pub bits: Tensor<B, 3, Int>,
    /// `[batch, tokens]`, f32.
    pub scales: Tensor<B, 2>,
    /// The dtype of the activation it was quantized from: the dtype of the GEMMs' outputs.
    pub dtype: DType,
}

impl<B: Backend> Fp8Activation<B> {
    /// `[batch, tokens, K]`.
    pub fn dims(&self) -> [usize; 3] {
        self.bits.dims()
    }
}

/// [`QwenBackend::quantize_activation_fp8`]'s default: per-token scales and e4m3 rounding on the host
/// ([`e4m3::quantize_rows`]), bits and scales uploaded to the activation's device.
pub fn quantize_activation<B: QwenBackend>(x: Tensor<B, 3>) -> Fp8Activation<B> {
    let ([batch, tokens, k], dtype, device) = (x.dims(), x.dtype(), x.device());
    let q = e4m3::quantize_rows(&super::portable::host_f32(x), k);
    let bits =
        Tensor::<B, 3, Int>::from_data(TensorData::new(q.bits, [batch, tokens, k]), (&device, DType::U8));
    let scales = Tensor::<B, 2>::from_data(TensorData::new(q.scales, [batch, tokens]), (&device, DType::F32));
    Fp8Activation { bits, scales, dtype }
}

/// [`QwenBackend::dequantize_activation_fp8`]'s default: `e4m3(bits[b, t, k]) · scales[b, t]` in f32 (every e4m3
/// value is exact in f32), rounded once to the activation's dtype, with burn ops on its device.
pub fn dequantize_activation<B: QwenBackend>(x: &Fp8Activation<B>) -> Tensor<B, 3> {
    let [batch, tokens, k] = x.dims();
    let values = e4m3_values(x.bits.clone().reshape([batch * tokens * k])).reshape([batch, tokens, k]);
    (values * x.scales.clone().unsqueeze_dim(2)).cast(x.dtype)
}

/// [`QwenBackend::dense_fp8_quantized`]'s default: steps 2–3 of [`QwenBackend::dense_fp8`] in f32 with burn ops,
/// from the quantized activation (see [`super::portable`]), GELU-tanh before the one rounding when asked.
pub fn dense_fp8_quantized<B: QwenBackend>(
    x: &Fp8Activation<B>,
    weight: &Fp8Weight<B>,
    bias: Option<&Tensor<B, 1>>,
    gelu_tanh: bool,
) -> Tensor<B, 3> {
    let [batch, tokens, k] = x.dims();
    let [n, _] = weight.shape();
    let m = batch * tokens;
    let qx = e4m3_values(x.bits.clone().reshape([m * k])).reshape([m, k]);
    let acc = qx.matmul(weight.values_f32().transpose());
    let mut y = acc * x.scales.clone().reshape([m, 1]) * weight.scales.clone().unsqueeze_dim(0);
    if let Some(b) = bias {
        y = y + b.clone().cast(DType::F32).unsqueeze_dim(0);
    }
    if gelu_tanh {
        y = burn::tensor::activation::gelu_approximate(y);
    }
    y.reshape([batch, tokens, n]).cast(x.dtype)
}

/// The f32 values of e4m3 `bits` (a flat u8 tensor), decoded on their device by a table lookup.
pub(super) fn e4m3_values<B: Backend>(bits: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let table = Tensor::<B, 1>::from_data(
        TensorData::new(e4m3::decode_table().to_vec(), [256]),
        (&bits.device(), DType::F32),
    );
    table.select(0, bits.cast(DType::I32))
}

/// [`QwenBackend::layer_norm_modulate_fp8`]'s default: [`QwenBackend::layer_norm_modulate`], then
/// [`QwenBackend::quantize_activation_fp8`] of its output (returned too when `dense`).
pub fn layer_norm_modulate_fp8<B: QwenBackend>(
    x: Tensor<B, 3>,
    shift: &Tensor<B, 3>,
    scale: &Tensor<B, 3>,
    runs: &[(usize, usize)],
    eps: f64,
    dense: bool,
) -> (Option<Tensor<B, 3>>, Fp8Activation<B>) {
    let y = B::layer_norm_modulate(x, shift, scale, runs, eps);
    let q = B::quantize_activation_fp8(y.clone());
    (dense.then_some(y), q)
}

#[cfg(test)]
mod tests {
    use burn::{
        backend::Flex,
        tensor::{Distribution, Tensor},
    };

    use super::*;
    use crate::tensor_io::rel_l2;

    fn host<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.cast(DType::F32).into_data().iter::<f32>().collect()
    }

    #[test]
    fn a_restored_activation_is_each_e4m3_value_times_its_token_scale_rounded_once() {
        let device = Default::default();
        let x = Tensor::<Flex, 3>::random([2, 5, 48], Distribution::Normal(0.0, 3.0), &device)
            .slice_assign([1..2, 2..3, 7..8], Tensor::full([1, 1, 1], -900.0, &device));
        for dtype in [DType::F32, DType::BF16] {
            let q = quantize_activation(x.clone().cast(dtype));
            let restored = dequantize_activation(&q);
            assert_eq!(restored.dtype(), dtype);
            // Written out: the e4m3 value times the token's scale in f32, then one rounding to the dtype.
            let (bits, scales) =
                (q.bits.clone().into_data().iter::<u8>().collect::<Vec<_>>(), host(q.scales));
            let want: Vec<f32> =
                bits.iter().enumerate().map(|(i, &b)| e4m3::decode(b) * scales[i / 48]).collect();
            let want = host(Tensor::<Flex, 1>::from_floats(want.as_slice(), &device).cast(dtype));
            assert_eq!(host(restored.clone()), want, "{dtype:?}");
            // Close to what was quantized (3 mantissa bits), but not equal to it.
            let err = rel_l2(&host(restored), &host(x.clone().cast(dtype)));
            assert!(err > 1e-3 && err < 5e-2, "{dtype:?}: {err:.3e}");
        }
    }

    #[test]
    fn a_quantized_activation_gives_the_written_out_fp8_linear() {
        let device = Default::default();
        let randn = |shape: [usize; 2], std: f64| {
            Tensor::<Flex, 2>::random(shape, Distribution::Normal(0.0, std), &device)
        };
        let x = randn([10, 48], 1.0).reshape([2, 5, 48]);
        let (w, b) = (randn([16, 48], 0.05), randn([1, 16], 0.1).reshape([16]));
        let fp8 = Fp8Weight::quantize(w.clone());
        // The bits and scales of the host's row quantization, as the activation's dtype remembers.
        let qx = quantize_activation(x.clone().cast(DType::BF16));
        assert_eq!((qx.dims(), qx.scales.dims(), qx.dtype), ([2, 5, 48], [2, 5], DType::BF16));
        let want = e4m3::quantize_rows(&host(x.clone().cast(DType::BF16)), 48);
        assert_eq!(qx.bits.clone().into_data().iter::<u8>().collect::<Vec<_>>(), want.bits);
        assert_eq!(host(qx.scales.clone()), want.scales);
        assert_eq!(dense_fp8_quantized(&qx, &fp8, Some(&b), false).dtype(), DType::BF16);
        // The GEMM from it is the FP8 linear written out with loops, with and without the GELU epilogue.
        let reference =
            super::super::portable::tests::reference(&host(x.clone()), &host(w), &host(b.clone()), 48);
        let qx = quantize_activation(x);
        let got = host(dense_fp8_quantized(&qx, &fp8, Some(&b), false));
        assert!(rel_l2(&got, &reference) < 1e-6, "{:.2e}", rel_l2(&got, &reference));
        let gelu = host(burn::tensor::activation::gelu_approximate(Tensor::<Flex, 1>::from_floats(
            reference.as_slice(),
            &device,
        )));
        let got = host(dense_fp8_quantized(&qx, &fp8, Some(&b), true));
        assert!(rel_l2(&got, &gelu) < 1e-6, "{:.2e}", rel_l2(&got, &gelu));
    }
}
