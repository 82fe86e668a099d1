//! Zero padding of a [`Linear`]'s features, for layers whose width makes slow GEMMs: the vision tower's MLP is 3420
//! features wide, so its activations' rows are 6840 bytes, not a multiple of 16, and cuBLASLt then leaves its
//! Hopper kernels for older ones (H100, 5476 rows: 1280 → 3420 at 211–217 TFLOP/s, → 3424 at 656; 3420 → 1280 at
//! 170, 3424 → 1280 at 377; `dit_bench --vision-only`, docs/performance.md). Padding the hidden width with zero rows
//! (and zero bias) in the layers that produce it and zero columns in the layer that reads it leaves every output
//! value the same sum (the padded terms are exact zeros); only the GEMMs' blocking may change the order of the sums.

use burn::tensor::Tensor;

use super::{Linear, LinearWeight};
use crate::ops::QwenBackend;

impl<B: QwenBackend> Linear<B> {
    /// Whether the layer can be padded: a dense weight without runtime adapters (an FP8 weight keeps its
    /// quantized shape, and an adapter's factors have the unpadded width).
    pub(crate) fn paddable(&self) -> bool {
        matches!(self.weight, LinearWeight::Dense(_)) && self.adapters.is_empty()
    }

    /// The layer with `pad` output features of zero weight (and zero bias) appended; unchanged when it cannot be
    /// padded (`Linear::paddable`) or `pad` is 0.
    pub fn pad_outputs(self, pad: usize) -> Self {
        self.padded(pad, 0)
    }

    /// The layer with `pad` input features of zero weight appended (they read padded inputs that are zero anyway);
    /// unchanged when it cannot be padded or `pad` is 0.
    pub fn pad_inputs(self, pad: usize) -> Self {
        self.padded(pad, 1)
    }

    /// `pad` zero rows (`axis` 0: outputs, with zero biases) or columns (`axis` 1: inputs) appended to the weight.
    fn padded(self, pad: usize, axis: usize) -> Self {
        let LinearWeight::Dense(w) = &self.weight else { return self };
        if pad == 0 || !self.paddable() {
            return self;
        }
        let (device, dtype, mut shape) = (w.device(), w.dtype(), w.dims());
        shape[axis] = pad;
        let weight = Tensor::cat(vec![w.clone(), Tensor::zeros(shape, (&device, dtype))], axis);
        let bias = match axis {
            0 => self.bias.map(|b| {
                let dtype = b.dtype();
                Tensor::cat(vec![b, Tensor::zeros([pad], (&device, dtype))], 0)
            }),
            _ => self.bias,
        };
        Linear::new(weight, bias)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use crate::{
        nn::{Linear, LowRankAdapter},
        tensor_io::rel_l2,
        CpuBackend as B,
    };

    fn randn<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn values(t: Tensor<B, 3>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    #[test]
    fn padded_features_change_no_output() {
        let (first, second) =
            (Linear::new(randn([6, 5]), Some(randn([6]))), Linear::new(randn([4, 6]), Some(randn([4]))));
        let x = randn([2, 3, 5]);
        let plain = second.forward(first.forward(x.clone()));
        let (first, second) = (first.pad_outputs(2), second.pad_inputs(2));
        assert_eq!((first.out_dim(), second.in_dim()), (8, 8));
        let hidden = first.forward(x);
        // The padded features are exact zeros, so the next layer's sums are unchanged.
        let tail = hidden.clone().narrow(2, 6, 2);
        assert_eq!(values(tail), vec![0.0; 12]);
        let padded = second.forward(hidden);
        assert!(rel_l2(&values(padded), &values(plain)) < 1e-6);
        // Nothing to pad, or a layer with runtime adapters (whose factors keep the unpadded width): unchanged.
        assert_eq!(Linear::<B>::new(randn([3, 2]), None).pad_outputs(0).out_dim(), 3);
        let mut adapted = Linear::<B>::new(randn([3, 2]), None);
        adapted.adapters.push(LowRankAdapter { id: 1, down: randn([1, 2]), up: randn([3, 1]), scale: 1.0 });
        assert_eq!(adapted.pad_outputs(5).out_dim(), 3);
    }
}
