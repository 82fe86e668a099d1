//! `QwenImageEncoder3d` on single frames (`encoder.*`): image → `2·z_dim` moment channels at 1/8 resolution.

use burn::tensor::{backend::Backend, Tensor};

use super::{
    blocks::{Downsample, MidBlock, ResidualBlock},
    config::VaeConfig,
    conv::Conv2d,
    norm::ChannelRmsNorm,
};
use crate::{ops::QwenBackend, weights::WeightPath, Result};

/// One entry of `encoder.down_blocks`.
#[derive(Clone, Debug)]
pub enum DownLayer<B: Backend> {
    /// A residual block.
    Residual(ResidualBlock<B>),
    /// A stride-2 downsampler.
    Downsample(Downsample<B>),
}

impl<B: QwenBackend> DownLayer<B> {
    /// Applies the layer.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            DownLayer::Residual(block) => block.forward(x),
            DownLayer::Downsample(down) => down.forward(x),
        }
    }
}

/// The encoder: `conv_in → down_blocks → mid_block → norm_out → SiLU → conv_out`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L378
#[derive(Clone, Debug)]
pub struct Encoder<B: Backend> {
    /// `conv_in`, 3×3, `input_channels → base_dim`.
    pub conv_in: Conv2d<B>,
    /// `down_blocks`: per level, `num_res_blocks` residual blocks, then a downsampler (except at the last level).
    pub down_blocks: Vec<DownLayer<B>>,
    /// `mid_block`.
    pub mid_block: MidBlock<B>,
    /// `norm_out`.
    pub norm_out: ChannelRmsNorm<B>,
    /// `conv_out`, 3×3, `top_dim → 2·z_dim`.
    pub conv_out: Conv2d<B>,
}

impl<B: QwenBackend> Encoder<B> {
    /// Loads the encoder under `path` (the checkpoint's `encoder`).
    pub fn load(path: &mut WeightPath<'_>, config: &VaeConfig, device: &B::Device) -> Result<Self> {
        let dims = config.encoder_dims();
        let levels = config.dim_mult.len();
        let conv_in =
            Conv2d::load_causal(&mut path.pp("conv_in"), config.input_channels, dims[0], 3, device)?;
        let mut down_blocks = Vec::new();
        for level in 0..levels {
            let (mut in_dim, out_dim) = (dims[level], dims[level + 1]);
            for _ in 0..config.num_res_blocks {
                let mut p = path.pp(format!("down_blocks.{}", down_blocks.len()));
                down_blocks.push(DownLayer::Residual(ResidualBlock::load(&mut p, in_dim, out_dim, device)?));
                in_dim = out_dim;
            }
            if level != levels - 1 {
                let mut p = path.pp(format!("down_blocks.{}", down_blocks.len()));
                let temporal = config.temperal_downsample[level];
                down_blocks.push(DownLayer::Downsample(Downsample::load(&mut p, out_dim, temporal, device)?));
            }
        }
        let top = dims[levels];
        Ok(Encoder {
            conv_in,
            down_blocks,
            mid_block: MidBlock::load(&mut path.pp("mid_block"), top, device)?,
            norm_out: ChannelRmsNorm::load_5d(&mut path.pp("norm_out"), top, device)?,
            conv_out: Conv2d::load_causal(&mut path.pp("conv_out"), top, 2 * config.z_dim, 3, device)?,
        })
    }

    /// `[batch, input_channels, H, W] → [batch, 2·z_dim, H/8, W/8]` (before `quant_conv`).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.conv_in.forward(x);
        for layer in &self.down_blocks {
            x = layer.forward(x);
        }
        let x = self.mid_block.forward(x);
        self.conv_out.forward(self.norm_out.forward_silu(x))
    }
}
