//! Rotary position embedding of the DiT: three axes (frame, height, width), interleaved pairs.
//!
//! Image token `(f, r, c)` of image `idx` gets frame position `idx + f` and centred height/width positions
//! (`r − (h − ⌊h/2⌋)`, likewise for columns); text token `j` gets position `max_i max(⌊h_i/2⌋, ⌊w_i/2⌋) + j` on all three
//! axes. The 128-dim head vector is read as 64 complex numbers `(x[2k], x[2k+1])` and multiplied by `e^{iθ_k}`.
//!
//! The model computes the cos/sin of every position of each axis once (`QwenRope::axis_tables`, as diffusers'
//! `QwenEmbedRope.__init__` does) and keeps them on the device; a forward call gathers its text and image tables
//! from them (`AxisTables::text`, `AxisTables::images`): no state between calls, the same tables for every
//! layout and text length (e.g. the prompt and negative-prompt branches of true CFG).

use std::cell::RefCell;

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use crate::{ModelError, Result};

/// Size of one image of the image stream, in tokens (latent pixels / patch size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImageShape {
    /// Frames (1 for images).
    pub frames: usize,
    /// Token rows.
    pub height: usize,
    /// Token columns.
    pub width: usize,
}

impl ImageShape {
    /// A one-frame image of `height × width` tokens.
    pub fn new(height: usize, width: usize) -> Self {
        ImageShape { frames: 1, height, width }
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.frames * self.height * self.width
    }
}

/// cos/sin of the rotation angles of a run of tokens, `[tokens, head_dim / 2]` each, row-major, f32.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RopeTable {
    /// Cosines.
    pub cos: Vec<f32>,
    /// Sines.
    pub sin: Vec<f32>,
    /// Number of complex entries per token (`head_dim / 2`).
    pub half: usize,
}

impl RopeTable {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.cos.len().checked_div(self.half).unwrap_or(0)
    }

    /// Whether the table has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Uploads the table as f32 tensors `[tokens, half]`.
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> RopeTensors<B> {
        let shape = [self.len(), self.half];
        let up = |v: &Vec<f32>| Tensor::from_data(TensorData::new(v.clone(), shape), (device, DType::F32));
        RopeTensors { cos: up(&self.cos), sin: up(&self.sin) }
    }
}

/// A [`RopeTable`] on the device.
#[derive(Clone, Debug)]
pub struct RopeTensors<B: Backend> {
    /// `[tokens, half]`, f32.
    pub cos: Tensor<B, 2>,
    /// `[tokens, half]`, f32.
    pub sin: Tensor<B, 2>,
}

impl<B: Backend> RopeTensors<B> {
    /// Rotates `x` (`[batch, tokens, heads, head_dim]`) in f32 and casts back to its dtype.
    // https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/transformers/transformer_qwenimage.py#L96
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        let dtype = x.dtype();
        let x = x.cast(DType::F32).reshape([b, s, h, d / 2, 2]);
        let re = x.clone().narrow(4, 0, 1);
        let im = x.narrow(4, 1, 1);
        let cos = self.cos.clone().reshape([1, s, 1, d / 2, 1]);
        let sin = self.sin.clone().reshape([1, s, 1, d / 2, 1]);
        let out_re = re.clone() * cos.clone() - im.clone() * sin.clone();
        let out_im = re * sin + im * cos;
        Tensor::cat(vec![out_re, out_im], 4).reshape([b, s, h, d]).cast(dtype)
    }

    /// Rows `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Self {
        RopeTensors {
            cos: self.cos.clone().narrow(0, start, len),
            sin: self.sin.clone().narrow(0, start, len),
        }
    }

    /// The rows `rows`, in that order (copies: bit-identical to the table's rows).
    pub fn select(&self, rows: Tensor<B, 1, burn::tensor::Int>) -> Self {
        RopeTensors { cos: self.cos.clone().select(0, rows.clone()), sin: self.sin.clone().select(0, rows) }
    }
}

/// Positions on each side of 0 that the per-axis tables cover: `−MAX_POSITION .. MAX_POSITION`, as diffusers'
/// `QwenEmbedRope` precomputes them (`pos_freqs` and `neg_freqs` of 4096 positions each).
pub const MAX_POSITION: usize = 4096;

/// The DiT's 3-axis RoPE frequencies (`QwenEmbedRope` with `scale_rope=True`).
// https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/transformers/transformer_qwenimage.py#L199
#[derive(Clone, Debug)]
pub struct QwenRope {
    axes: [usize; 3],
    theta: f32,
}

impl QwenRope {
    /// RoPE with the given per-axis dimensions (summing to the head dimension) and θ = 10000.
    pub fn new(axes_dims: &[usize]) -> Self {
        QwenRope { axes: [axes_dims[0], axes_dims[1], axes_dims[2]], theta: 10000.0 }
    }

    fn inv_freqs(&self, axis: usize) -> Vec<f32> {
        let dim = self.axes[axis];
        (0..dim / 2).map(|j| 1.0f32 / self.theta.powf((2 * j) as f32 / dim as f32)).collect()
    }

    /// cos/sin rows of one axis for the positions `from .. from + n`, on the host (`rope_params`).
    pub fn axis_rows(&self, axis: usize, from: i64, n: usize) -> RopeTable {
        let freqs = self.inv_freqs(axis);
        let mut t = RopeTable {
            half: freqs.len(),
            cos: Vec::with_capacity(n * freqs.len()),
            sin: Vec::with_capacity(n * freqs.len()),
        };
        for p in 0..n as i64 {
            for &w in &freqs {
                let angle = (from + p) as f32 * w;
                t.cos.push(angle.cos());
                t.sin.push(angle.sin());
            }
        }
        t
    }

    /// The per-axis tables of every position `−MAX_POSITION .. MAX_POSITION`, uploaded to `device` once (a model
    /// keeps them for its lifetime; ~4 MB for the published axes).
    pub(crate) fn axis_tables<B: Backend>(&self, device: &B::Device) -> AxisTables<B> {
        let all = |axis| self.axis_rows(axis, -(MAX_POSITION as i64), 2 * MAX_POSITION).to_device(device);
        AxisTables { axes: [all(0), all(1), all(2)] }
    }
}

/// cos/sin of every position `−MAX_POSITION .. MAX_POSITION` of each RoPE axis, on the device (row `p +
/// MAX_POSITION` holds position `p`), from which the tables of any input layout are gathered: copies of rows, so
/// bit-identical to computing each token's angles. Immutable; clones share the tensors.
#[derive(Clone, Debug)]
pub(crate) struct AxisTables<B: Backend> {
    axes: [RopeTensors<B>; 3],
}

impl<B: Backend> AxisTables<B> {
    /// Rows of positions `from .. from + n` of `axis` (a view).
    fn rows(&self, axis: usize, from: i64, n: usize) -> RopeTensors<B> {
        let start = usize::try_from(from + MAX_POSITION as i64).unwrap_or(0);
        self.axes[axis].narrow(start, n)
    }

    /// The table of image `idx` of shape `s` (frame positions `idx..`, centred rows and columns): each token's row
    /// is its frame, row and column rows side by side (`_compute_video_freqs`).
    pub(crate) fn image(&self, idx: usize, s: &ImageShape) -> RopeTensors<B> {
        let [f, h, w] = [s.frames, s.height, s.width];
        let frames = self.rows(0, idx as i64, f);
        let rows = self.rows(1, -((h - h / 2) as i64), h);
        let cols = self.rows(2, -((w - w / 2) as i64), w);
        let grid = |frames: &Tensor<B, 2>, rows: &Tensor<B, 2>, cols: &Tensor<B, 2>| {
            let [a0, a1, a2] = [frames, rows, cols].map(|t| t.dims()[1]);
            let parts = vec![
                frames.clone().reshape([f, 1, 1, a0]).expand([f, h, w, a0]),
                rows.clone().reshape([1, h, 1, a1]).expand([f, h, w, a1]),
                cols.clone().reshape([1, 1, w, a2]).expand([f, h, w, a2]),
            ];
            Tensor::cat(parts, 3).reshape([f * h * w, a0 + a1 + a2])
        };
        RopeTensors {
            cos: grid(&frames.cos, &rows.cos, &cols.cos),
            sin: grid(&frames.sin, &rows.sin, &cols.sin),
        }
    }

    /// The table of `text_len` text tokens following the images `shapes`: positions `start..start + text_len` on
    /// all three axes, `start = max_i max(⌊h_i/2⌋, ⌊w_i/2⌋)`.
    pub(crate) fn text(&self, shapes: &[ImageShape], text_len: usize) -> RopeTensors<B> {
        let start = text_start(shapes) as i64;
        let parts: Vec<RopeTensors<B>> = (0..3).map(|axis| self.rows(axis, start, text_len)).collect();
        RopeTensors {
            cos: Tensor::cat(parts.iter().map(|t| t.cos.clone()).collect(), 1),
            sin: Tensor::cat(parts.iter().map(|t| t.sin.clone()).collect(), 1),
        }
    }

    /// The tables of every image of `shapes`, for one forward call.
    pub(crate) fn images(&self, shapes: &[ImageShape]) -> ImageRopes<B> {
        let images = shapes.iter().enumerate().map(|(idx, s)| self.image(idx, s)).collect();
        ImageRopes { images, sets: RefCell::new(Vec::new()) }
    }
}

/// Errors unless the positions of `shapes` and of `text_len` text tokens lie inside the tables.
pub fn check_layout(shapes: &[ImageShape], text_len: usize) -> Result<()> {
    let max = MAX_POSITION;
    let image_fits = |(idx, s): (usize, &ImageShape)| {
        idx + s.frames <= max && s.height - s.height / 2 <= max && s.width - s.width / 2 <= max
    };
    if !shapes.iter().enumerate().all(image_fits) || text_start(shapes) + text_len > max {
        return Err(ModelError::invalid(format!(
            "RoPE positions of the images {shapes:?} and {text_len} text tokens exceed the ±{max} positions of \
             the model's tables"
        )));
    }
    Ok(())
}

/// First text position after the images `shapes` (`max_vid_index` with `scale_rope`).
fn text_start(shapes: &[ImageShape]) -> usize {
    shapes.iter().map(|s| (s.height / 2).max(s.width / 2)).max().unwrap_or(0)
}

/// The RoPE tables of the images of one forward call, and of the image sets the call asks for (all images, the
/// target alone, …), each concatenated once per call.
#[derive(Debug)]
pub(crate) struct ImageRopes<B: Backend> {
    images: Vec<RopeTensors<B>>,
    /// Concatenated tables of the sets of more than one image used so far in this call.
    sets: RefCell<Vec<(Vec<usize>, RopeTensors<B>)>>,
}

impl<B: Backend> ImageRopes<B> {
    /// The same tables with image 0 (the target) replaced by `target`, the table of the target tokens a step
    /// computes; the sets are built again on demand.
    pub(crate) fn with_target(&self, target: RopeTensors<B>) -> Self {
        let mut images = self.images.clone();
        images[0] = target;
        ImageRopes { images, sets: RefCell::new(Vec::new()) }
    }

    /// The table of the images `set` (indices into the call's images), concatenated in that order.
    pub(crate) fn set(&self, set: &[usize]) -> RopeTensors<B> {
        if let [one] = set {
            return self.images[*one].clone();
        }
        if let Some((_, t)) = self.sets.borrow().iter().find(|(s, _)| s == set) {
            return t.clone();
        }
        let pick = |f: fn(&RopeTensors<B>) -> &Tensor<B, 2>| {
            Tensor::cat(set.iter().map(|&i| f(&self.images[i]).clone()).collect(), 0)
        };
        let t = RopeTensors { cos: pick(|t| &t.cos), sin: pick(|t| &t.sin) };
        self.sets.borrow_mut().push((set.to_vec(), t.clone()));
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type B = Flex;

    fn host(t: &Tensor<B, 2>) -> Vec<f32> {
        t.clone().into_data().to_vec().unwrap()
    }

    /// Each token's angles computed directly (the definition), for comparison with the gathered tables.
    fn per_token(rope: &QwenRope, positions: &[[i64; 3]]) -> RopeTable {
        let mut want = RopeTable { half: rope.axes.iter().sum::<usize>() / 2, ..Default::default() };
        for pos in positions {
            for (axis, &p) in pos.iter().enumerate() {
                let row = rope.axis_rows(axis, p, 1);
                want.cos.extend(row.cos);
                want.sin.extend(row.sin);
            }
        }
        want
    }

    fn image_positions(idx: usize, s: &ImageShape) -> Vec<[i64; 3]> {
        let (h0, w0) = ((s.height - s.height / 2) as i64, (s.width - s.width / 2) as i64);
        let mut v = Vec::new();
        for f in 0..s.frames {
            for r in 0..s.height {
                for c in 0..s.width {
                    v.push([(idx + f) as i64, r as i64 - h0, c as i64 - w0]);
                }
            }
        }
        v
    }

    #[test]
    fn positions_are_centred_and_text_follows_images() {
        let rope = QwenRope::new(&[2, 2, 2]);
        let tables = rope.axis_tables::<B>(&Default::default());
        // With one frequency per axis equal to 1, the angles are the positions.
        let angles = |t: &RopeTensors<B>| -> Vec<f32> {
            host(&t.sin).iter().zip(host(&t.cos)).map(|(s, c)| s.atan2(c)).collect()
        };
        let first = angles(&tables.image(0, &ImageShape::new(3, 2)));
        assert_eq!(first[..3], [0.0, -2.0, -1.0]);
        assert_eq!(first[15..], [0.0, 0.0, 0.0]);
        assert_eq!(angles(&tables.image(1, &ImageShape::new(5, 4)))[0], 1.0);
        let text = angles(&tables.text(&[ImageShape::new(3, 2), ImageShape::new(5, 4)], 2));
        assert_eq!(text, [2.0, 2.0, 2.0, 3.0, 3.0, 3.0]);
    }

    #[test]
    fn gathered_tables_equal_per_token_angles_bit_for_bit() {
        let rope = QwenRope::new(&[16, 56, 56]);
        let tables = rope.axis_tables::<B>(&Default::default());
        let shapes =
            [ImageShape::new(5, 7), ImageShape { frames: 2, height: 4, width: 3 }, ImageShape::new(1, 1)];
        for (idx, s) in shapes.iter().enumerate() {
            let got = tables.image(idx, s);
            let want = per_token(&rope, &image_positions(idx, s));
            assert_eq!((host(&got.cos), host(&got.sin)), (want.cos, want.sin), "image {idx}");
        }
        let start = 3; // max(⌊5/2⌋, ⌊7/2⌋)
        let got = tables.text(&shapes, 4);
        let want = per_token(&rope, &(start..start + 4).map(|p| [p; 3]).collect::<Vec<_>>());
        assert_eq!((host(&got.cos), host(&got.sin)), (want.cos, want.sin));
        // The extreme positions of the tables.
        let edge = ImageShape::new(2 * MAX_POSITION, 1);
        let got = tables.image(0, &edge);
        assert_eq!(host(&got.cos), per_token(&rope, &image_positions(0, &edge)).cos);
    }

    #[test]
    fn image_sets_are_the_images_tables_in_order() {
        let rope = QwenRope::new(&[2, 2, 4]);
        let tables = rope.axis_tables::<B>(&Default::default());
        let shapes = [ImageShape::new(2, 3), ImageShape::new(1, 2), ImageShape::new(3, 3)];
        let images = tables.images(&shapes);
        let one = |i: usize| host(&tables.image(i, &shapes[i]).cos);
        for set in [vec![0, 1, 2], vec![2], vec![0, 2], vec![0, 1, 2]] {
            let want: Vec<f32> = set.iter().flat_map(|&i| one(i)).collect();
            assert_eq!(host(&images.set(&set).cos), want, "{set:?}");
        }
        assert_eq!(images.sets.borrow().len(), 2, "each set of several images is concatenated once");
    }

    #[test]
    fn layouts_outside_the_tables_are_refused() {
        let fits = |shapes: &[ImageShape], text| check_layout(shapes, text).is_ok();
        assert!(fits(&[ImageShape::new(2 * MAX_POSITION, 8)], 0));
        assert!(!fits(&[ImageShape::new(2 * MAX_POSITION + 2, 8)], 1));
        assert!(fits(&[ImageShape::new(64, 64)], MAX_POSITION - 32));
        assert!(!fits(&[ImageShape::new(64, 64)], MAX_POSITION - 31));
        let many: Vec<ImageShape> = vec![ImageShape::new(1, 1); MAX_POSITION + 1];
        assert!(!fits(&many, 1));
    }

    #[test]
    fn rotation_uses_interleaved_pairs() {
        let dev = Default::default();
        let table = RopeTable { cos: vec![0.0, 1.0], sin: vec![1.0, 0.0], half: 2 };
        let x = Tensor::<B, 4>::from_floats([[[[1.0, 2.0, 3.0, 4.0]]]], &dev);
        let y: Vec<f32> = table.to_device::<B>(&dev).apply(x).into_data().to_vec().unwrap();
        // (1 + 2i)·i = −2 + i ; (3 + 4i)·1 = 3 + 4i
        assert_eq!(y, vec![-2.0, 1.0, 3.0, 4.0]);
    }
}
