//! adaLN modulation: `x·(1 + scale) + shift` and gated residuals, with per-token rows for `zero_cond_t`.

use burn::tensor::{backend::Backend, Tensor};

/// Which modulation row each run of consecutive image tokens uses: row 0 is the real timestep, row 1 the zero
/// timestep (`zero_cond_t`: condition images). Adjacent runs with the same row are merged.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ModRuns(Vec<(usize, usize)>);

impl ModRuns {
    /// Runs from `(tokens, row)` pairs; empty runs are dropped and equal neighbours merged.
    pub fn new(runs: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (len, row) in runs {
            match out.last_mut() {
                _ if len == 0 => {}
                Some(last) if last.1 == row => last.0 += len,
                _ => out.push((len, row)),
            }
        }
        ModRuns(out)
    }

    /// All `tokens` use row 0.
    pub fn single(tokens: usize) -> Self {
        ModRuns::new([(tokens, 0)])
    }

    /// The `(tokens, row)` pairs in token order, as the adaLN and gated-residual operations of
    /// [`QwenBackend`](crate::ops::QwenBackend) take them.
    pub fn runs(&self) -> &[(usize, usize)] {
        &self.0
    }
}

/// One `(shift, scale, gate)` triple of a modulation, each `[rows, batch, dim]`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/transformers/transformer_qwenimage.py#L640
#[derive(Clone, Debug)]
pub struct Modulation<B: Backend> {
    /// Added after scaling.
    pub shift: Tensor<B, 3>,
    /// Multiplies the normalized input as `1 + scale`.
    pub scale: Tensor<B, 3>,
    /// Multiplies the sub-layer output before the residual add.
    pub gate: Tensor<B, 3>,
}

/// Picks, per token, the row of `t` (`[rows, batch, dim]`) given by `runs`: `[batch, tokens, dim]`, or a broadcastable
/// `[batch, 1, dim]` when a single row serves every token.
pub fn per_token<B: Backend>(t: &Tensor<B, 3>, runs: &ModRuns) -> Tensor<B, 3> {
    let [_, batch, dim] = t.dims();
    let row = |r: usize| t.clone().narrow(0, r, 1).reshape([batch, 1, dim]);
    match runs.runs() {
        [] => row(0),
        [(_, r)] => row(*r),
        many => Tensor::cat(many.iter().map(|&(len, r)| row(r).expand([batch, len, dim])).collect(), 1),
    }
}

impl<B: Backend> Modulation<B> {
    /// Splits `params` (`[rows·batch, 3·dim]`, layout `[shift | scale | gate]`) into a triple.
    pub fn from_params(params: Tensor<B, 2>, rows: usize) -> Self {
        let [rb, three_dim] = params.dims();
        let dim = three_dim / 3;
        let part = |i: usize| params.clone().narrow(1, i * dim, dim).reshape([rows, rb / rows, dim]);
        Modulation { shift: part(0), scale: part(1), gate: part(2) }
    }

    /// `x·(1 + scale) + shift` with the rows chosen by `runs`.
    pub fn modulate(&self, x: Tensor<B, 3>, runs: &ModRuns) -> Tensor<B, 3> {
        x * (per_token(&self.scale, runs) + 1.0) + per_token(&self.shift, runs)
    }

    /// `residual + gate · y` with the rows chosen by `runs`.
    pub fn gated_add(&self, residual: Tensor<B, 3>, y: Tensor<B, 3>, runs: &ModRuns) -> Tensor<B, 3> {
        residual + per_token(&self.gate, runs) * y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn runs_merge_and_select_rows() {
        assert_eq!(ModRuns::new([(2, 0), (0, 1), (3, 0), (1, 1), (2, 1)]).runs(), &[(5, 0), (3, 1)]);
        let dev = Default::default();
        // rows: 0 -> [1, 1], 1 -> [2, 2]; batch 1, dim 2.
        let t = Tensor::<Flex, 3>::from_floats([[[1.0, 1.0]], [[2.0, 2.0]]], &dev);
        let sel: Vec<f32> = per_token(&t, &ModRuns::new([(1, 0), (2, 1)])).into_data().to_vec().unwrap();
        assert_eq!(sel, vec![1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
    }

    #[test]
    fn modulation_order_is_shift_scale_gate() {
        let dev = Default::default();
        let params = Tensor::<Flex, 2>::from_floats([[10.0, 2.0, 0.5]], &dev);
        let m = Modulation::from_params(params, 1);
        let x = Tensor::<Flex, 3>::from_floats([[[1.0]]], &dev);
        let runs = ModRuns::single(1);
        let y: Vec<f32> = m.modulate(x.clone(), &runs).into_data().to_vec().unwrap();
        assert_eq!(y, vec![1.0 * 3.0 + 10.0]);
        let r: Vec<f32> = m.gated_add(x.clone(), x, &runs).into_data().to_vec().unwrap();
        assert_eq!(r, vec![1.5]);
    }
}
