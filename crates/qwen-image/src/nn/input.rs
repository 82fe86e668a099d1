//! [`LinearInput`]: one activation read by several linear layers (the Q/K/V projections of one stream), held in the
//! forms those layers need: in the model's dtype for dense layers and LoRA adapters, quantized per token for FP8
//! layers. The quantization is made once for all of them, and by the kernel that produces the activation where
//! the backend fuses it ([`QwenBackend::layer_norm_modulate_fp8`]); a layer never quantizes it again.

use burn::tensor::Tensor;

use super::{Linear, LinearWeight};
use crate::{ops::QwenBackend, quant::Fp8Activation};

/// What the layers reading one activation need of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InputNeeds {
    /// Some layer reads it in the model's dtype (a dense weight, or LoRA adapters).
    pub dense: bool,
    /// Some layer has an FP8 weight.
    pub fp8: bool,
}

impl InputNeeds {
    /// The needs of `layers` together.
    pub fn of<B: QwenBackend>(layers: &[&Linear<B>]) -> Self {
        layers.iter().fold(InputNeeds::default(), |n, l| {
            let fp8 = matches!(l.weight, LinearWeight::Fp8(_));
            InputNeeds { dense: n.dense || !fp8 || !l.adapters.is_empty(), fp8: n.fp8 || fp8 }
        })
    }
}

/// An activation `[batch, tokens, in]` for the layers of some [`InputNeeds`]: in the model's dtype when a layer
/// reads it so, quantized when an FP8 layer reads it.
#[derive(Clone, Debug)]
pub struct LinearInput<B: QwenBackend> {
    dense: Option<Tensor<B, 3>>,
    fp8: Option<Fp8Activation<B>>,
}

impl<B: QwenBackend> LinearInput<B> {
    /// `x` for layers with `needs`: quantized once here when an FP8 layer reads it.
    pub fn new(x: Tensor<B, 3>, needs: InputNeeds) -> Self {
        let fp8 = needs.fp8.then(|| B::quantize_activation_fp8(x.clone()));
        LinearInput { dense: (needs.dense || !needs.fp8).then_some(x), fp8 }
    }

    /// `x` for the given layers ([`InputNeeds::of`]).
    pub fn for_layers(x: Tensor<B, 3>, layers: &[&Linear<B>]) -> Self {
        Self::new(x, InputNeeds::of(layers))
    }

    /// `LayerNorm(x) · (1 + scale) + shift` ([`QwenBackend::layer_norm_modulate`]) for layers with `needs`: quantized
    /// by the same kernel when an FP8 layer reads it ([`QwenBackend::layer_norm_modulate_fp8`]).
    pub fn layer_norm_modulated(
        x: Tensor<B, 3>,
        shift: &Tensor<B, 3>,
        scale: &Tensor<B, 3>,
        runs: &[(usize, usize)],
        eps: f64,
        needs: InputNeeds,
    ) -> Self {
        if needs.fp8 {
            let (dense, fp8) = B::layer_norm_modulate_fp8(x, shift, scale, runs, eps, needs.dense);
            LinearInput { dense, fp8: Some(fp8) }
        } else {
            LinearInput { dense: Some(B::layer_norm_modulate(x, shift, scale, runs, eps)), fp8: None }
        }
    }

    /// The activation in the model's dtype, when a layer needs it so.
    pub fn dense(&self) -> Option<&Tensor<B, 3>> {
        self.dense.as_ref()
    }

    /// The quantized activation, when an FP8 layer reads it.
    pub fn fp8(&self) -> Option<&Fp8Activation<B>> {
        self.fp8.as_ref()
    }
}

impl<B: QwenBackend> Linear<B> {
    /// [`forward`](Self::forward) of a shared input: an FP8 layer reads its quantized form.
    ///
    /// Panics if `input` was made for other layers' needs (one without the dense form, read by a dense layer or one
    /// with adapters): a bug in the caller, which makes the input for the layers it then calls.
    pub fn forward_input(&self, input: &LinearInput<B>) -> Tensor<B, 3> {
        self.forward_form(input, false)
    }

    /// [`forward_gelu_tanh`](Self::forward_gelu_tanh) of a shared input (see [`forward_input`](Self::forward_input)).
    pub fn forward_input_gelu_tanh(&self, input: &LinearInput<B>) -> Tensor<B, 3> {
        self.forward_form(input, true)
    }

    fn forward_form(&self, input: &LinearInput<B>, gelu: bool) -> Tensor<B, 3> {
        if let (LinearWeight::Fp8(w), Some(q), true) = (&self.weight, &input.fp8, self.adapters.is_empty()) {
            return B::dense_fp8_quantized(q, w, self.bias.as_ref(), gelu);
        }
        let x = input.dense.clone().expect("a LinearInput made without the dense form a layer reads");
        if gelu {
            self.forward_gelu_tanh(x)
        } else {
            self.forward(x)
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::{
        backend::Flex,
        tensor::{DType, Distribution, Tensor},
    };

    use super::*;
    use crate::{nn::LowRankAdapter, quant::Fp8Weight};

    fn randn<const D: usize>(shape: [usize; D], std: f64) -> Tensor<Flex, D> {
        Tensor::<Flex, D>::random(shape, Distribution::Normal(0.0, std), &Default::default())
            .cast(DType::BF16)
    }

    fn host(t: Tensor<Flex, 3>) -> Vec<f32> {
        t.cast(DType::F32).into_data().iter::<f32>().collect()
    }

    #[test]
    fn each_layer_reads_the_form_it_needs_and_gets_its_own_forward() {
        let x = randn([1, 6, 32], 1.0);
        let dense = Linear::new(randn([16, 32], 0.1), Some(randn([16], 0.1)));
        let fp8 =
            Linear::new(LinearWeight::Fp8(Fp8Weight::quantize(randn([16, 32], 0.1))), Some(randn([16], 0.1)));
        let mut adapted = fp8.clone();
        adapted.adapters.push(LowRankAdapter {
            id: 1,
            down: randn([2, 32], 0.1),
            up: randn([16, 2], 0.1),
            scale: 0.5,
        });

        assert_eq!(InputNeeds::of(&[&dense]), InputNeeds { dense: true, fp8: false });
        assert_eq!(InputNeeds::of(&[&fp8, &fp8]), InputNeeds { dense: false, fp8: true });
        assert_eq!(InputNeeds::of(&[&adapted]), InputNeeds { dense: true, fp8: true });
        assert_eq!(InputNeeds::of(&[&fp8, &dense]), InputNeeds { dense: true, fp8: true });

        let only_fp8 = LinearInput::for_layers(x.clone(), &[&fp8]);
        assert!(only_fp8.dense().is_none() && only_fp8.fp8().is_some());
        let both = LinearInput::for_layers(x.clone(), &[&fp8, &dense, &adapted]);
        for layer in [&fp8, &dense, &adapted] {
            assert_eq!(host(layer.forward_input(&both)), host(layer.forward(x.clone())));
            assert_eq!(host(layer.forward_input_gelu_tanh(&both)), host(layer.forward_gelu_tanh(x.clone())));
        }
        assert_eq!(host(fp8.forward_input(&only_fp8)), host(fp8.forward(x.clone())));
        let plain = LinearInput::for_layers(x.clone(), &[&dense]);
        assert!(plain.fp8().is_none());
        assert_eq!(host(dense.forward_input(&plain)), host(dense.forward(x)));
    }

    #[test]
    fn a_modulated_input_is_the_modulated_activation_in_each_form() {
        let x = randn([2, 5, 32], 1.0);
        let (shift, scale) = (randn([1, 2, 32], 0.3), randn([1, 2, 32], 0.3));
        let want = Flex::layer_norm_modulate(x.clone(), &shift, &scale, &[], 1e-6);
        let needs = InputNeeds { dense: true, fp8: true };
        let input = LinearInput::layer_norm_modulated(x.clone(), &shift, &scale, &[], 1e-6, needs);
        assert_eq!(host(input.dense().unwrap().clone()), host(want.clone()));
        let q = input.fp8().unwrap();
        let direct = Flex::quantize_activation_fp8(want);
        assert_eq!(
            q.bits.clone().into_data().iter::<u8>().collect::<Vec<_>>(),
            direct.bits.into_data().iter::<u8>().collect::<Vec<_>>()
        );
        let fp8_only = LinearInput::layer_norm_modulated(
            x,
            &shift,
            &scale,
            &[],
            1e-6,
            InputNeeds { dense: false, fp8: true },
        );
        assert!(fp8_only.dense().is_none());
    }
}
