//! `QwenImageDecoder3d` on single frames (`decoder.*`): `z_dim` latent channels → image at 8× resolution.

use burn::tensor::{backend::Backend, Tensor};

use super::{
    blocks::{MidBlock, ResidualBlock, Upsample},
    config::VaeConfig,
    conv::Conv2d,
    norm::ChannelRmsNorm,
};
use crate::{ops::QwenBackend, weights::WeightPath, Result};

/// `QwenImageUpBlock`: `num_res_blocks + 1` residual blocks, then an optional ×2 upsampler (`dim → dim/2`).
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L486
#[derive(Clone, Debug)]
pub struct UpBlock<B: Backend> {
    /// `resnets`: the first maps `in → out`, the others `out → out`.
    pub resnets: Vec<ResidualBlock<B>>,
    /// `upsamplers.0` (absent at the last level).
    pub upsampler: Option<Upsample<B>>,
}

impl<B: QwenBackend> UpBlock<B> {
    /// `[batch, in, h, w] → [batch, out, h, w]`, or `[batch, out/2, 2h, 2w]` with the upsampler.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.resnets.iter().fold(x, |x, block| block.forward(x));
        match &self.upsampler {
            Some(up) => up.forward(x),
            None => x,
        }
    }
}

/// The decoder: `conv_in → mid_block → up_blocks → norm_out → SiLU → conv_out`.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L555
#[derive(Clone, Debug)]
pub struct Decoder<B: Backend> {
    /// `conv_in`, 3×3, `z_dim → top_dim`.
    pub conv_in: Conv2d<B>,
    /// `mid_block`.
    pub mid_block: MidBlock<B>,
    /// `up_blocks`.
    pub up_blocks: Vec<UpBlock<B>>,
    /// `norm_out`.
    pub norm_out: ChannelRmsNorm<B>,
    /// `conv_out`, 3×3, `base_dim → input_channels`.
    pub conv_out: Conv2d<B>,
}

impl<B: QwenBackend> Decoder<B> {
    /// Loads the decoder under `path` (the checkpoint's `decoder`).
    pub fn load(path: &mut WeightPath<'_>, config: &VaeConfig, device: &B::Device) -> Result<Self> {
        let dims = config.decoder_dims();
        let levels = config.dim_mult.len();
        let conv_in = Conv2d::load_causal(&mut path.pp("conv_in"), config.z_dim, dims[0], 3, device)?;
        let mid_block = MidBlock::load(&mut path.pp("mid_block"), dims[0], device)?;
        let mut up_blocks = Vec::with_capacity(levels);
        for level in 0..levels {
            // Every level after the first receives the previous upsampler's halved channels.
            let mut in_dim = if level > 0 { dims[level] / 2 } else { dims[level] };
            let out_dim = dims[level + 1];
            let mut block = path.pp(format!("up_blocks.{level}"));
            let mut resnets = Vec::with_capacity(config.num_res_blocks + 1);
            for j in 0..=config.num_res_blocks {
                resnets.push(ResidualBlock::load(
                    &mut block.pp(format!("resnets.{j}")),
                    in_dim,
                    out_dim,
                    device,
                )?);
                in_dim = out_dim;
            }
            let upsampler = if level != levels - 1 {
                let temporal = config.temperal_upsample(level);
                Some(Upsample::load(&mut block.pp("upsamplers.0"), out_dim, temporal, device)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let bottom = dims[levels];
        Ok(Decoder {
            conv_in,
            mid_block,
            up_blocks,
            norm_out: ChannelRmsNorm::load_5d(&mut path.pp("norm_out"), bottom, device)?,
            conv_out: Conv2d::load_causal(
                &mut path.pp("conv_out"),
                bottom,
                config.input_channels,
                3,
                device,
            )?,
        })
    }

    /// `[batch, z_dim, h, w] → [batch, input_channels, 8h, 8w]` (after `post_quant_conv`, before clamping).
    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.mid_block.forward(self.conv_in.forward(z));
        let x = self.up_blocks.iter().fold(x, |x, block| block.forward(x));
        self.conv_out.forward(self.norm_out.forward_silu(x))
    }
}
