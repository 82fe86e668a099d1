//! Tiled encoding and decoding of large images with linearly blended seams, as diffusers' `tiled_encode` /
//! `tiled_decode` (`enable_tiling`).
//!
//! The input is cut into overlapping tiles on a regular grid (starts `0, stride, 2·stride, …`; the last tiles are
//! clipped at the border); each tile runs through the network on its own, so memory is bounded by one tile's
//! activations (the middle block's attention is quadratic in the tile's latent pixels). Tiles are visited row by row;
//! each output tile is blended with the already blended tile above it (`blend_v`) and then with the one to its left
//! (`blend_h`) over `overlap` output pixels, with weights falling linearly from the neighbour to the tile, and its
//! top-left `stride × stride` part is kept.
//!
//! With the same tile size and overlap (diffusers' `tile_sample_min_* = tile`, `tile_sample_stride_* = tile −
//! overlap`), the result equals diffusers' tiled output (the decoded image is then clamped to `[-1, 1]`).
//!
//! Memory (published model, bf16): decoding 2048² untiled holds full-resolution activations of 0.8 GB (96
//! channels) to 1.6 GB (the 192-channel input of the last upsampler's convolution) each, twice that for f32
//! temporaries, and a middle-block attention over 256² = 65 536 tokens (8.6 GB of scores where the backend
//! materializes them). With the default 256-pixel tiles these are 13–26 MB and 1 024 tokens; between tiles only the
//! blended output and the previous row of decoded tiles are kept.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use super::autoencoder::AutoencoderKLQwenImage;
use crate::{ops::QwenBackend, ModelError, Result};

/// Tile size and overlap of the tiled modes, in image pixels (the decoder's output, the encoder's input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileConfig {
    /// Side of a square tile; a multiple of 8.
    pub tile: usize,
    /// Overlap of neighbouring tiles, blended linearly; a multiple of 8, at most `tile / 2`.
    pub overlap: usize,
}

impl Default for TileConfig {
    /// diffusers' defaults: 256-pixel tiles every 192 pixels (64 pixels of overlap).
    fn default() -> Self {
        TileConfig { tile: 256, overlap: 64 }
    }
}

impl TileConfig {
    /// A validated tile configuration for the 8× VAE.
    pub fn new(tile: usize, overlap: usize) -> Result<Self> {
        let config = TileConfig { tile, overlap };
        config.validate(8)?;
        Ok(config)
    }

    /// Checks the sizes against the VAE's spatial compression `factor`.
    pub fn validate(&self, factor: usize) -> Result<()> {
        let TileConfig { tile, overlap } = *self;
        if tile == 0 || tile % factor != 0 || overlap % factor != 0 || 2 * overlap > tile {
            return Err(ModelError::invalid(format!(
                "tile {tile} / overlap {overlap}: the tile must be a positive multiple of {factor} pixels and the \
                 overlap a multiple of {factor} of at most half the tile"
            )));
        }
        Ok(())
    }

    /// Distance between the starts of neighbouring tiles, in pixels.
    pub fn stride(&self) -> usize {
        self.tile - self.overlap
    }
}

/// Tiling of one input, in the input's and the output's pixel units.
#[derive(Clone, Copy, Debug)]
struct Grid {
    /// Input tile side.
    tile: usize,
    /// Input distance between tile starts.
    stride: usize,
    /// Output rows/columns blended with the neighbour.
    blend: usize,
    /// Output rows/columns kept from each tile.
    keep: usize,
}

/// Linear blend weights `(1 − k/n, k/n)` for `k < n`, in f32, shaped for `axis` (2 = rows, 3 = columns).
fn blend_weights<B: Backend>(n: usize, axis: usize, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let shape = if axis == 2 { [1, 1, n, 1] } else { [1, 1, 1, n] };
    let make = |f: &dyn Fn(f64) -> f64| {
        let values: Vec<f32> = (0..n).map(|k| f(k as f64 / n as f64) as f32).collect();
        Tensor::<B, 4>::from_data(TensorData::new(values, shape), (device, DType::F32))
    };
    (make(&|t| 1.0 - t), make(&|t| t))
}

/// diffusers' `blend_v` (axis 2) / `blend_h` (axis 3): the first `n = min(extent, a_len, b_len)` rows (columns) of
/// `b` become `a_tail · (1 − k/n) + b_head · k/n`, computed in f32.
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L891-L905
fn blend<B: Backend>(a: &Tensor<B, 4>, b: Tensor<B, 4>, extent: usize, axis: usize) -> Tensor<B, 4> {
    let (a_len, b_len) = (a.dims()[axis], b.dims()[axis]);
    let n = extent.min(a_len).min(b_len);
    if n == 0 {
        return b;
    }
    let dtype = b.dtype();
    let (wa, wb) = blend_weights::<B>(n, axis, &b.device());
    let tail = a.clone().narrow(axis, a_len - n, n).cast(DType::F32);
    let head = b.clone().narrow(axis, 0, n).cast(DType::F32);
    let mixed = (tail * wa + head * wb).cast(dtype);
    if n == b_len {
        mixed
    } else {
        Tensor::cat(vec![mixed, b.narrow(axis, n, b_len - n)], axis)
    }
}

/// Runs `f` on the tiles of `x` and blends the outputs; the result is cropped to `out_size` (height, width).
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/autoencoder_kl_qwenimage.py#L907
fn run_tiled<B: Backend>(
    x: Tensor<B, 4>,
    grid: Grid,
    out_size: [usize; 2],
    f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [_, _, h, w] = x.dims();
    let starts = |len: usize| (0..len).step_by(grid.stride).collect::<Vec<_>>();
    let (rows, cols) = (starts(h), starts(w));
    let mut above: Vec<Tensor<B, 4>> = Vec::new();
    let mut bands = Vec::with_capacity(rows.len());
    for &i in &rows {
        let mut row: Vec<Tensor<B, 4>> = Vec::with_capacity(cols.len());
        let mut kept = Vec::with_capacity(cols.len());
        for (c, &j) in cols.iter().enumerate() {
            let input = x.clone().narrow(2, i, grid.tile.min(h - i)).narrow(3, j, grid.tile.min(w - j));
            let mut tile = f(input);
            if let Some(up) = above.get(c) {
                tile = blend(up, tile, grid.blend, 2);
            }
            if let Some(left) = row.last() {
                tile = blend(left, tile, grid.blend, 3);
            }
            let [_, _, th, tw] = tile.dims();
            kept.push(tile.clone().narrow(2, 0, grid.keep.min(th)).narrow(3, 0, grid.keep.min(tw)));
            row.push(tile);
        }
        bands.push(Tensor::cat(kept, 3));
        above = row;
    }
    let out = Tensor::cat(bands, 2);
    let [_, _, oh, ow] = out.dims();
    out.narrow(2, 0, out_size[0].min(oh)).narrow(3, 0, out_size[1].min(ow))
}

impl<B: QwenBackend> AutoencoderKLQwenImage<B> {
    /// [`encode_mode`](Self::encode_mode) tile by tile: `tiles.tile`-pixel input tiles every `tiles.stride()` pixels,
    /// latents blended over `tiles.overlap / 8` rows and columns. Images no larger than one tile are encoded whole.
    pub fn encode_mode_tiled(&self, image: Tensor<B, 4>, tiles: &TileConfig) -> Result<Tensor<B, 4>> {
        self.check_image(&image)?;
        let f = self.spatial_compression();
        tiles.validate(f)?;
        let [_, _, h, w] = image.dims();
        if h <= tiles.tile && w <= tiles.tile {
            return Ok(self.encode_mode_unchecked(image));
        }
        let grid = Grid {
            tile: tiles.tile,
            stride: tiles.stride(),
            blend: tiles.tile / f - tiles.stride() / f,
            keep: tiles.stride() / f,
        };
        Ok(run_tiled(image, grid, [h / f, w / f], |tile| self.encode_mode_unchecked(tile)))
    }

    /// [`decode`](Self::decode) tile by tile: `tiles.tile / 8`-latent tiles every `tiles.stride() / 8` latents,
    /// decoded images blended over `tiles.overlap` pixels, then clamped to `[-1, 1]`. Latents no larger than one tile
    /// are decoded whole.
    pub fn decode_tiled(&self, z: Tensor<B, 4>, tiles: &TileConfig) -> Result<Tensor<B, 4>> {
        self.check_latents(&z)?;
        let f = self.spatial_compression();
        tiles.validate(f)?;
        let [_, _, h, w] = z.dims();
        if h <= tiles.tile / f && w <= tiles.tile / f {
            return Ok(self.decode_unclamped(z).clamp(-1.0, 1.0));
        }
        let grid = Grid {
            tile: tiles.tile / f,
            stride: tiles.stride() / f,
            blend: tiles.overlap,
            keep: tiles.stride(),
        };
        let out = run_tiled(z, grid, [h * f, w * f], |tile| self.decode_unclamped(tile));
        Ok(out.clamp(-1.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::{backend::Flex, tensor::Int};

    #[test]
    fn tile_configs_are_validated() {
        assert!(TileConfig::new(256, 64).is_ok());
        assert!(TileConfig::new(64, 32).is_ok());
        for (tile, overlap) in [(0, 0), (100, 16), (256, 60), (64, 40)] {
            assert!(TileConfig::new(tile, overlap).is_err(), "{tile}/{overlap} accepted");
        }
        assert_eq!(TileConfig::default().stride(), 192);
    }

    #[test]
    fn blending_ramps_from_the_neighbour_to_the_tile() {
        let dev = Default::default();
        let a = Tensor::<Flex, 4>::full([1, 1, 2, 6], 10.0, &dev);
        let b = Tensor::<Flex, 4>::zeros([1, 1, 2, 5], &dev);
        let y: Vec<f32> = blend(&a, b, 4, 3).into_data().to_vec().unwrap();
        assert_eq!(&y[..5], &[10.0, 7.5, 5.0, 2.5, 0.0]);
        // An extent longer than either tile is clipped to the shorter one.
        let short = Tensor::<Flex, 4>::zeros([1, 1, 1, 6], &dev);
        let y: Vec<f32> = blend(&a, short, 4, 2).into_data().to_vec().unwrap();
        assert_eq!(y, vec![10.0; 6]);
    }

    #[test]
    fn identity_tiling_reassembles_the_input() {
        // With f = identity and no overlap, the tiles put back together give the input.
        let dev = Default::default();
        let x = Tensor::<Flex, 1, Int>::arange(0..5 * 7, &dev).float().reshape([1, 1, 5, 7]);
        let grid = Grid { tile: 3, stride: 3, blend: 0, keep: 3 };
        let y = run_tiled(x.clone(), grid, [5, 7], |t| t);
        assert_eq!(y.into_data().to_vec::<f32>().unwrap(), x.clone().into_data().to_vec::<f32>().unwrap());
        // With overlap, the identity blends identical values: still the input.
        let grid = Grid { tile: 4, stride: 2, blend: 2, keep: 2 };
        let y = run_tiled(x.clone(), grid, [5, 7], |t| t);
        assert_eq!(y.into_data().to_vec::<f32>().unwrap(), x.into_data().to_vec::<f32>().unwrap());
    }
}
