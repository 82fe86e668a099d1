//! The VAE's building blocks on single frames: residual block, single-head attention block, down/upsamplers and
//! the middle block.

use burn::tensor::{backend::Backend, Tensor};

use super::{conv::Conv2d, norm::ChannelRmsNorm};
use crate::{
    nn::zero_pad,
    ops::{AttentionOptions, KvSegment, QwenBackend},
    weights::WeightPath,
    Result,
};

/// `QwenImageResidualBlock(in, out)`: `conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L220
#[derive(Clone, Debug)]
pub struct ResidualBlock<B: Backend> {
    /// `norm1`, over the input channels.
    pub norm1: ChannelRmsNorm<B>,
    /// `conv1`, 3×3, `in → out`.
    pub conv1: Conv2d<B>,
    /// `norm2`, over the output channels.
    pub norm2: ChannelRmsNorm<B>,
    /// `conv2`, 3×3, `out → out`.
    pub conv2: Conv2d<B>,
    /// `conv_shortcut`, 1×1, present when `in ≠ out` (otherwise the shortcut is the identity).
    pub shortcut: Option<Conv2d<B>>,
}

impl<B: QwenBackend> ResidualBlock<B> {
    /// Loads `norm1`, `conv1`, `norm2`, `conv2` and (if `in_dim ≠ out_dim`) `conv_shortcut` under `path`.
    pub fn load(
        path: &mut WeightPath<'_>,
        in_dim: usize,
        out_dim: usize,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(ResidualBlock {
            norm1: ChannelRmsNorm::load_5d(&mut path.pp("norm1"), in_dim, device)?,
            conv1: Conv2d::load_causal(&mut path.pp("conv1"), in_dim, out_dim, 3, device)?,
            norm2: ChannelRmsNorm::load_5d(&mut path.pp("norm2"), out_dim, device)?,
            conv2: Conv2d::load_causal(&mut path.pp("conv2"), out_dim, out_dim, 3, device)?,
            shortcut: if in_dim != out_dim {
                Some(Conv2d::load_causal(&mut path.pp("conv_shortcut"), in_dim, out_dim, 1, device)?)
            } else {
                None
            },
        })
    }

    /// `[batch, in, h, w] → [batch, out, h, w]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let residual = match &self.shortcut {
            Some(conv) => conv.forward(x.clone()),
            None => x.clone(),
        };
        let h = self.conv1.forward(self.norm1.forward_silu(x));
        let h = self.conv2.forward(self.norm2.forward_silu(h));
        h + residual
    }
}

/// `QwenImageAttentionBlock(dim)`: single-head self-attention over the `h·w` pixels with head dimension `dim`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L294
#[derive(Clone, Debug)]
pub struct AttentionBlock<B: Backend> {
    /// `norm` (`gamma [dim, 1, 1]`).
    pub norm: ChannelRmsNorm<B>,
    /// `to_qkv`, 1×1, `dim → 3·dim` (q, k, v in that order along the output channels).
    pub to_qkv: Conv2d<B>,
    /// `proj`, 1×1, `dim → dim`.
    pub proj: Conv2d<B>,
}

impl<B: QwenBackend> AttentionBlock<B> {
    /// Loads `norm`, `to_qkv` and `proj` under `path`.
    pub fn load(path: &mut WeightPath<'_>, dim: usize, device: &B::Device) -> Result<Self> {
        Ok(AttentionBlock {
            norm: ChannelRmsNorm::load_4d(&mut path.pp("norm"), dim, device)?,
            to_qkv: Conv2d::load_2d(&mut path.pp("to_qkv"), dim, 3 * dim, 1, device)?,
            proj: Conv2d::load_2d(&mut path.pp("proj"), dim, dim, 1, device)?,
        })
    }

    /// `x + proj(attention(q, k, v))` with `q, k, v = to_qkv(norm(x))`, scale `1/√dim`; `[batch, dim, h, w]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, dim, h, w] = x.dims();
        let qkv = self.to_qkv.forward(self.norm.forward(x.clone())).reshape([batch, 3 * dim, h * w]);
        // Channels → one head of `dim` features per pixel token: `[batch, h·w, 1, dim]`.
        let part =
            |i: usize| qkv.clone().narrow(1, i * dim, dim).swap_dims(1, 2).reshape([batch, h * w, 1, dim]);
        let (q, k, v) = (part(0), part(1), part(2));
        let out = B::attend(q, &[KvSegment { key: k, value: v }], &AttentionOptions::default());
        let out = out.reshape([batch, h * w, dim]).swap_dims(1, 2).reshape([batch, dim, h, w]);
        self.proj.forward(out) + x
    }
}

/// Marks a resampler's `time_conv` (a temporal `(3, 1, 1)` convolution, unused on single frames) as consumed after
/// checking that it exists with the expected shape.
fn skip_time_conv(path: &mut WeightPath<'_>, in_dim: usize, out_dim: usize) -> Result<()> {
    let (weight, bias) = (path.key("time_conv.weight"), path.key("time_conv.bias"));
    let store = path.store();
    store.data(&weight, Some(&[out_dim, in_dim, 3, 1, 1]))?;
    store.data(&bias, Some(&[out_dim]))?;
    Ok(())
}

/// `QwenImageResample` in `downsample2d`/`downsample3d` mode on one frame: zero-pad right and bottom by one pixel,
/// then a 3×3 convolution with stride 2 (`resample.1`). Halves the resolution (`h → h/2` for even `h`).
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L133
#[derive(Clone, Debug)]
pub struct Downsample<B: Backend> {
    /// `resample.1`, `dim → dim`.
    pub conv: Conv2d<B>,
}

impl<B: QwenBackend> Downsample<B> {
    /// Loads `resample.1`; with `temporal`, also checks and skips `time_conv`.
    pub fn load(path: &mut WeightPath<'_>, dim: usize, temporal: bool, device: &B::Device) -> Result<Self> {
        if temporal {
            skip_time_conv(path, dim, dim)?;
        }
        Ok(Downsample { conv: Conv2d::load_2d(&mut path.pp("resample.1"), dim, dim, 3, device)? })
    }

    /// `[batch, dim, h, w] → [batch, dim, ⌈h/2⌉, ⌈w/2⌉]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward_strided(pad_right_bottom(x), 2)
    }
}

/// Appends one zero column and one zero row (`nn.ZeroPad2d((0, 1, 0, 1))`) in the input's dtype.
pub fn pad_right_bottom<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    zero_pad(zero_pad(x, 3, 0, 1), 2, 0, 1)
}

/// `QwenImageResample` in `upsample2d`/`upsample3d` mode on one frame: nearest-neighbour ×2 (pixel duplication),
/// then a 3×3 convolution `dim → dim/2` (`resample.1`).
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L133
#[derive(Clone, Debug)]
pub struct Upsample<B: Backend> {
    /// `resample.1`, `dim → dim / 2`.
    pub conv: Conv2d<B>,
}

impl<B: QwenBackend> Upsample<B> {
    /// Loads `resample.1`; with `temporal`, also checks and skips `time_conv`.
    pub fn load(path: &mut WeightPath<'_>, dim: usize, temporal: bool, device: &B::Device) -> Result<Self> {
        if temporal {
            skip_time_conv(path, dim, 2 * dim)?;
        }
        Ok(Upsample { conv: Conv2d::load_2d(&mut path.pp("resample.1"), dim, dim / 2, 3, device)? })
    }

    /// `[batch, dim, h, w] → [batch, dim/2, 2h, 2w]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(upsample_nearest_2x(x))
    }
}

/// Nearest-neighbour ×2 upsampling (torch `nearest-exact` at an exact factor 2 duplicates every pixel).
pub fn upsample_nearest_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2]).reshape([b, c, 2 * h, 2 * w])
}

/// `QwenImageMidBlock(dim)`: `resnets.0 → attentions.0 → resnets.1`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L339
#[derive(Clone, Debug)]
pub struct MidBlock<B: Backend> {
    /// `resnets.0`.
    pub resnet0: ResidualBlock<B>,
    /// `attentions.0`.
    pub attention: AttentionBlock<B>,
    /// `resnets.1`.
    pub resnet1: ResidualBlock<B>,
}

impl<B: QwenBackend> MidBlock<B> {
    /// Loads `resnets.{0,1}` and `attentions.0` under `path`.
    pub fn load(path: &mut WeightPath<'_>, dim: usize, device: &B::Device) -> Result<Self> {
        Ok(MidBlock {
            resnet0: ResidualBlock::load(&mut path.pp("resnets.0"), dim, dim, device)?,
            attention: AttentionBlock::load(&mut path.pp("attentions.0"), dim, device)?,
            resnet1: ResidualBlock::load(&mut path.pp("resnets.1"), dim, dim, device)?,
        })
    }

    /// `[batch, dim, h, w] → [batch, dim, h, w]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.resnet1.forward(self.attention.forward(self.resnet0.forward(x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn upsampling_duplicates_pixels() {
        let dev = Default::default();
        let x = Tensor::<Flex, 4>::from_floats([[[[1.0, 2.0], [3.0, 4.0]]]], &dev);
        let y: Vec<f32> = upsample_nearest_2x(x).into_data().to_vec().unwrap();
        #[rustfmt::skip]
        let want = [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 3.0, 3.0, 4.0, 4.0];
        assert_eq!(y, want);
    }

    #[test]
    fn downsampling_pads_right_and_bottom() {
        // A 3×3 kernel of ones at stride 2 on a 4×4 ramp, padded only right/bottom: windows start at 0 and 2.
        let dev = Default::default();
        let x = Tensor::<Flex, 1>::from_floats(
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0],
            &dev,
        )
        .reshape([1, 1, 4, 4]);
        let down = Downsample {
            conv: Conv2d { weight: Tensor::ones([1, 1, 3, 3], &dev), bias: Tensor::zeros([1], &dev) },
        };
        let y: Vec<f32> = down.forward(x).into_data().to_vec().unwrap();
        // (0,0): rows 0-2, cols 0-2; (0,1): rows 0-2, cols 2-3 (+ pad); (1,0): rows 2-3, cols 0-2; (1,1): rows/cols 2-3.
        assert_eq!(y, vec![54.0, 45.0, 72.0, 54.0]);
    }
}
