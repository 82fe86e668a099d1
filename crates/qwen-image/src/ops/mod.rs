//! [`QwenBackend`]: the operations whose speed decides the models' speed, as a backend extension trait.
//!
//! Every method has a portable default written with burn tensor ops (the functions of [`portable`]), so any burn
//! backend runs the models and every test runs on the CPU. An accelerated backend overrides the methods it can do
//! better (the `cuda` feature: cuBLASLt GEMMs, our flash attention, fused elementwise kernels) and falls back to
//! [`portable`] for what it does not support; the portable functions stay the reference the fast path is tested
//! against.

use burn::tensor::{backend::Backend, Bool, DType, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::{
    quant::{Fp8Activation, Fp8Weight},
    weights::HostMemory,
};

/// What an accelerated backend's fast path did for one kind of operation (GEMM, attention, glue, …) since the
/// process (or the backend's statistics) started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastKindStats {
    /// The kind of operation (`"gemm"`, `"attention"`, …).
    pub kind: String,
    /// Calls that ran on the fast path.
    pub calls: u64,
    /// Calls that fell back to the portable implementation (unsupported shape or dtype, or the kind is off).
    pub fallbacks: u64,
    /// Calls whose fast path failed with a device error (each one fell back).
    pub errors: u64,
    /// Whether this kind is switched off (by the configuration, or after an error).
    pub disabled: bool,
    /// The error that switched it off, if one did.
    pub last_error: Option<String>,
}

/// The state of an accelerated backend's fast path: which kinds of operation ran fast, fell back or failed
/// ([`QwenBackend::fast_path_report`]). Reports put it next to their timings, so that a slow run caused by a
/// disabled fast path is visible.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastPathReport {
    /// The backend (e.g. `"cuda"`).
    pub backend: String,
    /// One entry per kind of operation.
    pub kinds: Vec<FastKindStats>,
}

/// Keys and values of one contiguous range of the key sequence, `[batch, keys, kv_heads, head_dim]` each.
#[derive(Clone, Debug)]
pub struct KvSegment<B: Backend> {
    /// Keys (already normalized and rotated), `[batch, keys, kv_heads, head_dim]`.
    pub key: Tensor<B, 4>,
    /// Values, `[batch, keys, kv_heads, head_dim]`.
    pub value: Tensor<B, 4>,
}

/// One run of tokens of [`QwenBackend::rms_norm_rope_cat`]: `x [batch, tokens, heads, head_dim]`, the RMSNorm
/// weight `[head_dim]` and epsilon, and the rotation tables `[tokens, head_dim / 2]` (f32).
#[derive(Clone, Debug)]
pub struct NormRope<'a, B: Backend> {
    /// The projected heads.
    pub x: Tensor<B, 4>,
    /// RMSNorm weight.
    pub weight: &'a Tensor<B, 1>,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Cosines of the rotation angles.
    pub cos: &'a Tensor<B, 2>,
    /// Sines of the rotation angles.
    pub sin: &'a Tensor<B, 2>,
}

/// Options of [`QwenBackend::attend`].
#[derive(Clone, Debug, Default)]
pub struct AttentionOptions<B: Backend> {
    /// Causal masking (query `i` sees keys `0..=i`, aligned at the start; queries and keys must have the same
    /// length).
    pub causal: bool,
    /// Which keys may be attended to, `[batch, total_keys]`, `true` = attend. `None` = all.
    pub key_mask: Option<Tensor<B, 2, Bool>>,
    /// FP8 attention: Q·Kᵀ on int8 with the keys' mean subtracted, the probabilities and V in e4m3, with the scales
    /// [`quant::attention`](crate::quant::attention) defines. A backend without an FP8 kernel
    /// for the call computes it with the host emulation ([`quant::attention::attention_fp8`](crate::quant::attention::attention_fp8)).
    pub fp8: bool,
}

/// Backend operations used by the Qwen-Image networks, with portable defaults.
///
/// Layouts follow PyTorch checkpoints: a linear weight is `[out_features, in_features]`; attention tensors are
/// `[batch, sequence, heads, head_dim]` (the layout projections produce, so no transposes are needed).
pub trait QwenBackend: Backend {
    /// `x · weightᵀ + bias`, weight `[out, in]`; `x` is `[batch, tokens, in]`.
    fn dense(
        x: Tensor<Self, 3>,
        weight: &Tensor<Self, 2>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        portable::dense(x, weight, bias)
    }

    /// `gelu_tanh(x · weightᵀ + bias)`: the first half of the DiT's MLP.
    fn dense_gelu_tanh(
        x: Tensor<Self, 3>,
        weight: &Tensor<Self, 2>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        portable::dense_gelu_tanh(x, weight, bias)
    }

    /// The multiple of features that a hidden width between two dense layers is padded to at load time
    /// ([`GatedMlp::pad_intermediate`](crate::text_encoder::language::GatedMlp::pad_intermediate)): 1 (none) by
    /// default; on CUDA 8, so that bf16 rows are 16-byte multiples, which cuBLASLt's Hopper GEMMs need.
    fn dense_width_multiple() -> usize {
        1
    }

    /// Quantizes a linear weight `[out, in]` to e4m3 with one f32 scale per output channel: for each row `n`,
    /// `scale[n] = max_k |W[n, k]| / 448` (1 when that is below `f32::MIN_POSITIVE`) and
    /// `bits[n, k] = e4m3(W[n, k] / scale[n])`, the division in f32 and the rounding to nearest even, saturating at
    /// ±448 (PyTorch's `(W / scale).clamp(-448, 448).to(torch.float8_e4m3fn)`). An override must give the same bits
    /// and scales (the portable default is checked against PyTorch); it runs once per layer at load time.
    fn quantize_fp8(weight: Tensor<Self, 2>) -> Fp8Weight<Self> {
        portable::quantize_fp8(weight)
    }

    /// `x · Wᵀ + bias` with an FP8 weight and per-token dynamic FP8 activations; `x` is `[batch, tokens, in]` in the
    /// model's dtype, the result is in `x`'s dtype.
    ///
    /// What an override (an FP8 GEMM with row/column scaling, e.g. cuBLASLt's outer-vector scale modes) must compute,
    /// with the `batch·tokens` rows of `x` as `m`:
    /// 1. `sx[m] = max_k |x[m, k]| / 448` in f32 (1 when below `f32::MIN_POSITIVE`) and
    ///    `qx[m, k] = e4m3(x[m, k] / sx[m])` (as [`quantize_fp8`](Self::quantize_fp8) does for weight rows);
    /// 2. `y[m, n] = (Σ_k qx[m, k] · bits[n, k]) · sx[m] · weight.scales[n] + bias[n]`, products and sums in f32
    ///    (every product of two e4m3 values is exact in f32);
    /// 3. one rounding of `y` to `x`'s dtype.
    ///
    /// The portable default ([`portable::dense_fp8`]) computes exactly that in f32 with burn ops (quantizing on the
    /// host); a GPU result may differ from it only by the order of the sums.
    fn dense_fp8(
        x: Tensor<Self, 3>,
        weight: &Fp8Weight<Self>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        portable::dense_fp8(x, weight, bias)
    }

    /// `gelu_tanh` of [`dense_fp8`](Self::dense_fp8)'s step 2, applied in f32 before the one rounding of step 3
    /// (a GELU epilogue): the DiT MLP's first layer.
    fn dense_fp8_gelu_tanh(
        x: Tensor<Self, 3>,
        weight: &Fp8Weight<Self>,
        bias: Option<&Tensor<Self, 1>>,
    ) -> Tensor<Self, 3> {
        portable::dense_fp8_gelu_tanh(x, weight, bias)
    }

    /// Step 1 of [`dense_fp8`](Self::dense_fp8) alone: `x [batch, tokens, K]` quantized per token, for several FP8
    /// layers that read the same activation ([`LinearInput`](crate::nn::LinearInput)). An override must give the
    /// portable default's bits and scales ([`portable::quantize_activation`], the host's rounding).
    fn quantize_activation_fp8(x: Tensor<Self, 3>) -> Fp8Activation<Self> {
        portable::quantize_activation(x)
    }

    /// An activation quantized per token ([`quantize_activation_fp8`](Self::quantize_activation_fp8)) back in its
    /// original dtype: `bits`' e4m3 values times their token's scale, the product in f32 rounded once. What the
    /// pruning cache stores in 8 bits is restored with it. An override must give the portable default's values
    /// ([`portable::dequantize_activation`]) bit for bit.
    fn dequantize_activation_fp8(x: &Fp8Activation<Self>) -> Tensor<Self, 3> {
        portable::dequantize_activation(x)
    }

    /// Steps 2–3 of [`dense_fp8`](Self::dense_fp8) from an activation quantized already, GELU-tanh before the
    /// rounding when `gelu_tanh` ([`dense_fp8_gelu_tanh`](Self::dense_fp8_gelu_tanh)); the result is in the
    /// activation's original dtype. `dense_fp8(x, …)` equals `dense_fp8_quantized(&quantize_activation_fp8(x), …)`
    /// up to the order of the sums.
    fn dense_fp8_quantized(
        x: &Fp8Activation<Self>,
        weight: &Fp8Weight<Self>,
        bias: Option<&Tensor<Self, 1>>,
        gelu_tanh: bool,
    ) -> Tensor<Self, 3> {
        portable::dense_fp8_quantized(x, weight, bias, gelu_tanh)
    }

    /// [`layer_norm_modulate`](Self::layer_norm_modulate)'s output quantized per token
    /// ([`quantize_activation_fp8`](Self::quantize_activation_fp8)), in one kernel where the backend can: the input of
    /// FP8 projections. With `dense`, also the output itself (for layers that read it in the model's dtype). Both must
    /// be bit-identical to the two calls' results. The default makes the two calls.
    fn layer_norm_modulate_fp8(
        x: Tensor<Self, 3>,
        shift: &Tensor<Self, 3>,
        scale: &Tensor<Self, 3>,
        runs: &[(usize, usize)],
        eps: f64,
        dense: bool,
    ) -> (Option<Tensor<Self, 3>>, Fp8Activation<Self>) {
        portable::layer_norm_modulate_fp8(x, shift, scale, runs, eps, dense)
    }

    /// Scaled dot-product attention of `query` over the concatenation of `segments` along the key axis.
    ///
    /// `query` is `[batch, queries, heads, head_dim]`; each segment's key/value is
    /// `[batch, keys_i, kv_heads, head_dim]` with `heads` a multiple of `kv_heads` (grouped-query attention: query
    /// head `h` uses key head `h / (heads / kv_heads)`). The scale is `1/√head_dim`. Returns
    /// `[batch, queries, heads, head_dim]`.
    fn attend(
        query: Tensor<Self, 4>,
        segments: &[KvSegment<Self>],
        options: &AttentionOptions<Self>,
    ) -> Tensor<Self, 4> {
        portable::attention(query, segments, options)
    }

    /// Attention restricted to independent blocks of one sequence (vision windows, one image each).
    ///
    /// `q`, `k`, `v` are `[1, tokens, heads, head_dim]`; `cu_seqlens` are the block boundaries
    /// (`0 = c_0 < c_1 < … < c_n = tokens`). Token `i` of block `j` attends to the keys of block `j` only.
    fn attend_blocks(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        cu_seqlens: &[usize],
    ) -> Tensor<Self, 4> {
        portable::attention_blocks(q, k, v, cu_seqlens, Self::attend)
    }

    /// adaLN: `LayerNorm(x) · (1 + scale) + shift`, the modulation row of each token chosen by `runs`.
    ///
    /// `x` is `[batch, tokens, dim]`; `shift` and `scale` are `[rows, batch, dim]`; `runs` lists `(tokens, row)` in
    /// token order (as [`ModRuns`](crate::dit::modulation::ModRuns) holds them; an empty list means row 0 for every
    /// token). The LayerNorm has no affine parameters and takes its statistics in f32; its output is cast back to
    /// `x`'s dtype before the modulation.
    fn layer_norm_modulate(
        x: Tensor<Self, 3>,
        shift: &Tensor<Self, 3>,
        scale: &Tensor<Self, 3>,
        runs: &[(usize, usize)],
        eps: f64,
    ) -> Tensor<Self, 3> {
        portable::layer_norm_modulate(x, shift, scale, runs, eps)
    }

    /// Gated residual: `residual + gate · y`, the gate row of each token chosen by `runs` (see
    /// [`layer_norm_modulate`](Self::layer_norm_modulate)); `gate` is `[rows, batch, dim]`.
    fn gated_residual(
        residual: Tensor<Self, 3>,
        y: Tensor<Self, 3>,
        gate: &Tensor<Self, 3>,
        runs: &[(usize, usize)],
    ) -> Tensor<Self, 3> {
        portable::gated_residual(residual, y, gate, runs)
    }

    /// Per-head RMSNorm followed by the DiT's interleaved-pair RoPE: `rope(rms_norm(x) · weight)`.
    ///
    /// `x` is `[batch, tokens, heads, head_dim]`, `weight` `[head_dim]`; `cos` and `sin` are f32
    /// `[tokens, head_dim / 2]` (see [`RopeTensors`](crate::dit::rope::RopeTensors)).
    fn rms_norm_rope(
        x: Tensor<Self, 4>,
        weight: &Tensor<Self, 1>,
        eps: f64,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
    ) -> Tensor<Self, 4> {
        portable::rms_norm_rope(x, weight, eps, cos, sin)
    }

    /// [`rms_norm_rope`](Self::rms_norm_rope) of several runs of tokens (same batch, heads and head dim),
    /// concatenated along the token axis: the joint attention's queries `[text ; image]` written into one tensor
    /// instead of normalized separately and then concatenated.
    fn rms_norm_rope_cat(parts: &[NormRope<'_, Self>]) -> Tensor<Self, 4> {
        portable::rms_norm_rope_cat(parts)
    }

    /// The gated product of a SwiGLU MLP: `silu(gate) · up`, both `[batch, tokens, dim]`.
    fn silu_mul(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        portable::silu_mul(gate, up)
    }

    /// A device tensor holding `data` (dense row-major, in the dtype the tensor gets): how model weights reach the
    /// device while loading. `data` may borrow a memory-mapped checkpoint. The CUDA fast path copies it straight into
    /// device memory; burn's own upload stages every tensor through a pinned host pool that it keeps for the rest of
    /// the process (38 GiB of host memory after loading the DiT on an H200).
    fn upload<const D: usize>(data: TensorData, device: &Self::Device) -> Tensor<Self, D> {
        portable::upload(data, device)
    }

    /// A device tensor holding `data` (dense row-major, in the dtype the tensor gets), an activation made on the host
    /// during an edit (the vision tower's patches, token embeddings gathered on the host): [`upload`](Self::upload)
    /// by default; the CUDA fast path can stage it through page-locked memory so that the host need not wait for
    /// the device to reach the copy (`FastPathConfig::staged_uploads`).
    fn upload_activation<const D: usize>(data: TensorData, device: &Self::Device) -> Tensor<Self, D> {
        Self::upload(data, device)
    }

    /// Host memory holding a copy of `bytes`, for weights uploaded to `device` for every use (streamed layers,
    /// [`HostTensor`](crate::weights::HostTensor)): page-locked on the CUDA fast path, where copies from it run at
    /// the host link's full speed; an ordinary allocation by default.
    fn host_memory(bytes: &[u8], device: &Self::Device) -> HostMemory {
        let _ = device;
        HostMemory::ordinary(bytes)
    }

    /// A float device tensor of `dtype` and `shape` holding `bytes` (dense row-major): [`upload`](Self::upload)
    /// without an owned [`TensorData`] (the CUDA fast path copies from the borrowed bytes).
    fn upload_bytes<const D: usize>(
        bytes: &[u8],
        shape: [usize; D],
        dtype: DType,
        device: &Self::Device,
    ) -> Tensor<Self, D> {
        portable::upload_bytes(bytes, shape, dtype, device)
    }

    /// A `U8` integer device tensor of `shape` holding `bytes` (the bits of an FP8 weight).
    fn upload_u8<const D: usize>(
        bytes: &[u8],
        shape: [usize; D],
        device: &Self::Device,
    ) -> Tensor<Self, D, Int> {
        portable::upload_u8(bytes, shape, device)
    }

    /// An interleaved 8-bit RGB image (`rgb`: `height·width·3` bytes) as the VAE's `[1, 3, H, W]` input in `dtype`,
    /// each level `v` as `2·(v / 255) − 1` in f32 rounded once to `dtype` ([`crate::pixels`]). An override must give
    /// the same values; the CUDA fast path uploads the 8-bit values and converts them on the GPU.
    fn upload_rgb8(
        rgb: &[u8],
        height: usize,
        width: usize,
        dtype: DType,
        device: &Self::Device,
    ) -> crate::Result<Tensor<Self, 4>> {
        portable::upload_rgb8(rgb, height, width, dtype, device)
    }

    /// The first image of the VAE's `[batch, 3, H, W]` output as interleaved 8-bit RGB (`H·W·3` bytes), each value
    /// `x` as `round((x·0.5 + 0.5).clamp(0, 1)·255)` in f32, half to even ([`crate::pixels`]). An override must give
    /// the same bytes; the CUDA fast path converts on the GPU and reads back the 8-bit values.
    fn read_rgb8(x: Tensor<Self, 4>) -> crate::Result<Vec<u8>> {
        portable::read_rgb8(x)
    }

    /// 2-D convolution with bias (the VAE's): `x [batch, in, h, w]`, `weight [out, in, k, k]` (PyTorch layout),
    /// stride `stride`, zero padding `pad` on every side → `[batch, out, (h + 2·pad − k) / stride + 1, …]`.
    fn conv2d_nchw(
        x: Tensor<Self, 4>,
        weight: &Tensor<Self, 4>,
        bias: &Tensor<Self, 1>,
        stride: usize,
        pad: usize,
    ) -> Tensor<Self, 4> {
        portable::conv2d(x, weight, bias, stride, pad)
    }

    /// RMSNorm over the last axis of `x [batch, tokens, dim]`: `x · 1/√(mean(x²) + eps)` in f32, rounded to the
    /// input dtype, times `weight [dim]` (Qwen2.5-VL's layers, [`crate::nn::RmsNorm`]).
    fn rms_norm(x: Tensor<Self, 3>, weight: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        portable::rms_norm(x, weight, eps)
    }

    /// Qwen2.5-VL's rotate-half rotary of `x [batch, tokens, heads, head_dim]` by `cos`/`sin` `[tokens, head_dim]`:
    /// `x·cos + rotate_half(x)·sin`, computed in the tables' dtype and returned in `x`'s (the vision tower rotates in
    /// f32, the language model in the activation dtype, as transformers does).
    fn rotary_half(x: Tensor<Self, 4>, cos: &Tensor<Self, 2>, sin: &Tensor<Self, 2>) -> Tensor<Self, 4> {
        portable::rotary_half(x, cos, sin)
    }

    /// The VAE's channel RMS norm, `x / max(‖x‖₂ over channels, 1e-12) · √C · γ` at every pixel of
    /// `x [batch, C, h, w]` (`gamma [C]`), then SiLU when `silu`: what feeds every VAE convolution but the first.
    fn channel_rms_norm(x: Tensor<Self, 4>, gamma: &Tensor<Self, 1>, silu: bool) -> Tensor<Self, 4> {
        portable::channel_rms_norm(x, gamma, silu)
    }

    /// How `device`'s allocator places the tensors this thread makes from now on: with `exact`, each in an
    /// allocation of its own size (burn's persistent allocation mode), which a freed tensor leaves for the next
    /// request of the same size and [`release_unused_memory`](Self::release_unused_memory) frees; otherwise as
    /// slices of the allocator's shared pages (the default). Exact allocations bound what a stage with a few large
    /// transients reserves (on CUDA the pages for them are up to a sixteenth of the card's memory each: docs/memory.md).
    /// A no-op by default.
    fn allocate_exactly(device: &Self::Device, exact: bool) {
        let _ = (device, exact);
    }

    /// Gives the device memory that the backend's allocator holds but no tensor uses back to the driver:
    /// `Backend::memory_cleanup` by default; on CUDA also the trim of the stream-ordered pool that burn allocates
    /// from (without it the driver still counts the freed pages as used).
    fn release_unused_memory(device: &Self::Device) {
        Self::memory_cleanup(device);
    }

    /// The fast path's statistics on `device` (calls, fallbacks and errors per kind of operation), or `None` for a
    /// backend without one (the portable default).
    fn fast_path_report(device: &Self::Device) -> Option<FastPathReport> {
        let _ = device;
        None
    }
}

pub mod lowered;

pub mod portable;

pub use portable::{attention as portable_attention, repeat_kv};

impl QwenBackend for burn::backend::Flex {}

#[cfg(test)]
mod tests {
    use burn::{
        backend::Flex,
        tensor::{Distribution, Tensor},
    };

    use super::{lowered, portable, AttentionOptions, KvSegment};
    use crate::tensor_io::rel_l2;

    fn randn<const D: usize>(shape: [usize; D]) -> Tensor<Flex, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn host<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    #[test]
    fn convolution_as_one_gemm_matches_burn() {
        // (batch, in, out, h, w, kernel, stride, pad): the VAE's 3×3 "same", 1×1 shortcut, stride-2 downsampler
        // (odd size after its right/bottom padding), and an RGB input (9·3 = 27 columns).
        let cases = [
            (2, 5, 7, 6, 9, 3, 1, 1),
            (1, 4, 3, 5, 4, 1, 1, 0),
            (1, 6, 6, 9, 7, 3, 2, 0),
            (1, 3, 8, 8, 8, 3, 1, 1),
            (2, 2, 3, 7, 5, 3, 1, 0),
        ];
        for (n, c, o, h, w, k, s, p) in cases {
            let (x, weight, bias) = (randn([n, c, h, w]), randn([o, c, k, k]), randn([o]));
            let want = portable::conv2d(x.clone(), &weight, &bias, s, p);
            let got = lowered::conv2d(x, &weight, &bias, s, p);
            assert_eq!(got.dims(), want.dims(), "case {:?}", (n, c, o, h, w, k, s, p));
            let err = rel_l2(&host(got), &host(want));
            assert!(err < 1e-5, "case {:?}: {err:.2e}", (n, c, o, h, w, k, s, p));
        }
        // Bands of output rows (a budget of one to three rows' columns) give the same result.
        for budget in [1, 2 * 9 * 4 * 9 * 4, 3 * 9 * 4 * 9 * 4] {
            let (x, weight, bias) = (randn([1, 4, 11, 9]), randn([5, 4, 3, 3]), randn([5]));
            let want = portable::conv2d(x.clone(), &weight, &bias, 1, 1);
            let got = lowered::conv2d_banded(x.clone(), &weight, &bias, 1, 1, budget);
            assert!(rel_l2(&host(got), &host(want)) < 1e-5, "budget {budget}");
            let want = portable::conv2d(x.clone(), &weight, &bias, 2, 0);
            let got = lowered::conv2d_banded(x, &weight, &bias, 2, 0, budget);
            assert!(rel_l2(&host(got), &host(want)) < 1e-5, "stride 2, budget {budget}");
        }
        // A transposed weight layout (in, out swapped in the im2col order) would be caught: [o, ky, kx, c] matters.
        let (x, weight, bias) = (randn([1, 4, 5, 5]), randn([4, 4, 3, 3]), randn([4]));
        let want = portable::conv2d(x.clone(), &weight, &bias, 1, 1);
        let wrong = lowered::conv2d(x, &weight.swap_dims(2, 3), &bias, 1, 1);
        assert!(rel_l2(&host(wrong), &host(want)) > 0.1);
    }

    #[test]
    fn attention_as_gemms_matches_the_reference() {
        // GQA over two key segments, and the VAE's single 384-wide head.
        for (b, nq, h, hk, d, lens) in [(2, 7, 4, 2, 16, vec![3, 6]), (1, 20, 1, 1, 384, vec![20])] {
            let q = randn([b, nq, h, d]);
            let segs: Vec<KvSegment<Flex>> = lens
                .iter()
                .map(|&n| KvSegment { key: randn([b, n, hk, d]), value: randn([b, n, hk, d]) })
                .collect();
            let want = portable::attention(q.clone(), &segs, &AttentionOptions::default());
            let got = lowered::attention(q, &segs);
            assert_eq!(got.dims(), want.dims());
            let err = rel_l2(&host(got), &host(want));
            assert!(err < 1e-5, "{:?}: {err:.2e}", (b, nq, h, hk, d));
        }
        // Chunks of query rows (one row, three rows with a short last chunk, all rows) give the same result.
        let q = randn([2, 11, 4, 16]);
        let segs = vec![
            KvSegment { key: randn([2, 5, 2, 16]), value: randn([2, 5, 2, 16]) },
            KvSegment { key: randn([2, 4, 2, 16]), value: randn([2, 4, 2, 16]) },
        ];
        let want = portable::attention(q.clone(), &segs, &AttentionOptions::default());
        for rows in [1, 3, 11] {
            let budget = rows * 9 * 4;
            assert_eq!(lowered::attention_rows_per_chunk(9, budget), rows);
            let got = lowered::attention_chunked(q.clone(), &segs, budget);
            let err = rel_l2(&host(got), &host(want.clone()));
            assert!(err < 1e-5, "{rows} rows per chunk: {err:.2e}");
        }
        // No queries: an empty result, not a panic.
        let none = lowered::attention_chunked(randn([2, 0, 4, 16]), &segs, 36);
        assert_eq!(none.dims(), [2, 0, 4, 16]);
        // The VAE's middle attention at 1024² (16 384 tokens) computes 2048 rows at a time.
        assert_eq!(lowered::attention_rows_per_chunk(16_384, lowered::ATTENTION_SCORES_BYTES), 2048);
    }
}
