//! Rotary position embedding of the DiT: three axes (frame, height, width), interleaved pairs.
//!
//! Image token `(f, r, c)` of image `idx` gets frame position `idx + f` and centred height/width positions
//! (`r − (h − ⌊h/2⌋)`, likewise for columns); text token `j` gets position `max_i max(⌊h_i/2⌋, ⌊w_i/2⌋) + j` on all three
//! axes. The 128-dim head vector is read as 64 complex numbers `(x[2k], x[2k+1])` and multiplied by `e^{iθ_k}`.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

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

    /// Concatenates tables along the token axis.
    pub fn concat<'a>(tables: impl IntoIterator<Item = &'a RopeTable>) -> RopeTable {
        let mut out = RopeTable::default();
        for t in tables {
            out.half = t.half;
            out.cos.extend_from_slice(&t.cos);
            out.sin.extend_from_slice(&t.sin);
        }
        out
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
}

/// RoPE tables of one input layout kept on the device between calls: the denoising steps of an edit share their
/// token layout, so the tables are computed and uploaded once per edit instead of once per step (at 1024² that is
/// ~1.2 M host sin/cos and a 5 MB upload the GPU would otherwise wait for at the start of every step).
#[derive(Debug)]
pub(crate) struct RopeCache<B: Backend> {
    key: Option<(Vec<ImageShape>, usize)>,
    text: Option<RopeTensors<B>>,
    images: Vec<RopeTable>,
    /// Device tables of the image sets used so far (all images, the target alone, …).
    sets: Vec<(Vec<usize>, RopeTensors<B>)>,
}

impl<B: Backend> Default for RopeCache<B> {
    fn default() -> Self {
        RopeCache { key: None, text: None, images: Vec::new(), sets: Vec::new() }
    }
}

impl<B: Backend> RopeCache<B> {
    /// Makes the cache hold the tables of `shapes` and `text_len` text tokens (recomputed when they change).
    fn select(&mut self, rope: &QwenRope, shapes: &[ImageShape], text_len: usize, device: &B::Device) {
        if self.key.as_ref().is_some_and(|(s, t)| s == shapes && *t == text_len) {
            return;
        }
        self.text = Some(rope.text_table(shapes, text_len).to_device(device));
        self.images = rope.image_tables(shapes);
        self.sets.clear();
        self.key = Some((shapes.to_vec(), text_len));
    }

    /// The text tokens' table.
    pub fn text(
        &mut self,
        rope: &QwenRope,
        shapes: &[ImageShape],
        text_len: usize,
        device: &B::Device,
    ) -> RopeTensors<B> {
        self.select(rope, shapes, text_len, device);
        self.text.clone().expect("set by select")
    }

    /// The table of images `set` (indices into `shapes`), concatenated in that order.
    pub fn images(
        &mut self,
        rope: &QwenRope,
        shapes: &[ImageShape],
        text_len: usize,
        set: &[usize],
        device: &B::Device,
    ) -> RopeTensors<B> {
        self.select(rope, shapes, text_len, device);
        if let Some((_, t)) = self.sets.iter().find(|(s, _)| s == set) {
            return t.clone();
        }
        let t = RopeTable::concat(set.iter().map(|&i| &self.images[i])).to_device(device);
        self.sets.push((set.to_vec(), t.clone()));
        t
    }
}

/// The DiT's 3-axis RoPE (`QwenEmbedRope` with `scale_rope=True`).
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

    fn inv_freqs(&self, dim: usize) -> Vec<f32> {
        (0..dim / 2).map(|j| 1.0f32 / self.theta.powf((2 * j) as f32 / dim as f32)).collect()
    }

    /// Angles of one token: frame, height and width positions.
    fn push_token(&self, freqs: &[Vec<f32>; 3], pos: [i64; 3], out: &mut RopeTable) {
        for (axis, inv) in freqs.iter().enumerate() {
            for &w in inv {
                let angle = pos[axis] as f32 * w;
                out.cos.push(angle.cos());
                out.sin.push(angle.sin());
            }
        }
    }

    fn freqs(&self) -> [Vec<f32>; 3] {
        [self.inv_freqs(self.axes[0]), self.inv_freqs(self.axes[1]), self.inv_freqs(self.axes[2])]
    }

    /// One table per image, in `shapes` order (image `idx` has frame position `idx`).
    ///
    /// A token's angles are its three axes' angles side by side, so each axis's cos/sin rows are computed once per
    /// position and copied per token (the same f32 values as computing every token's angles, 20× fewer sin/cos).
    pub fn image_tables(&self, shapes: &[ImageShape]) -> Vec<RopeTable> {
        let freqs = self.freqs();
        let half = self.axes.iter().sum::<usize>() / 2;
        // cos/sin rows of one axis for positions `from .. from + n`.
        let axis_rows = |axis: usize, from: i64, n: usize| {
            let mut t = RopeTable { half: freqs[axis].len(), ..Default::default() };
            for p in 0..n as i64 {
                for &w in &freqs[axis] {
                    let angle = (from + p) as f32 * w;
                    t.cos.push(angle.cos());
                    t.sin.push(angle.sin());
                }
            }
            t
        };
        shapes
            .iter()
            .enumerate()
            .map(|(idx, s)| {
                let (h0, w0) = ((s.height - s.height / 2) as i64, (s.width - s.width / 2) as i64);
                let frames = axis_rows(0, idx as i64, s.frames);
                let rows = axis_rows(1, -h0, s.height);
                let cols = axis_rows(2, -w0, s.width);
                let mut t = RopeTable {
                    half,
                    cos: Vec::with_capacity(s.tokens() * half),
                    sin: Vec::with_capacity(s.tokens() * half),
                };
                let row = |a: &RopeTable, i: usize| (i * a.half)..((i + 1) * a.half);
                for f in 0..s.frames {
                    for r in 0..s.height {
                        for c in 0..s.width {
                            for (a, i) in [(&frames, f), (&rows, r), (&cols, c)] {
                                t.cos.extend_from_slice(&a.cos[row(a, i)]);
                                t.sin.extend_from_slice(&a.sin[row(a, i)]);
                            }
                        }
                    }
                }
                t
            })
            .collect()
    }

    /// The table of `text_len` text tokens that follow the images `shapes`.
    pub fn text_table(&self, shapes: &[ImageShape], text_len: usize) -> RopeTable {
        let freqs = self.freqs();
        let start = shapes.iter().map(|s| (s.height / 2).max(s.width / 2)).max().unwrap_or(0);
        let mut t = RopeTable { half: self.axes.iter().sum::<usize>() / 2, ..Default::default() };
        for j in 0..text_len {
            let p = (start + j) as i64;
            self.push_token(&freqs, [p, p, p], &mut t);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn positions_are_centred_and_text_follows_images() {
        let rope = QwenRope::new(&[2, 2, 2]);
        // With one frequency per axis equal to 1, the angles are the positions.
        let t = &rope.image_tables(&[ImageShape::new(3, 2)])[0];
        let angles: Vec<[f32; 3]> =
            (0..6).map(|i| [0, 1, 2].map(|a| t.sin[i * 3 + a].atan2(t.cos[i * 3 + a]))).collect();
        assert_eq!(angles[0], [0.0, -2.0, -1.0]);
        assert_eq!(angles[5], [0.0, 0.0, 0.0]);
        let second = &rope.image_tables(&[ImageShape::new(1, 1), ImageShape::new(5, 4)])[1];
        assert_eq!(second.sin[0].atan2(second.cos[0]), 1.0);
        let text = rope.text_table(&[ImageShape::new(3, 2), ImageShape::new(5, 4)], 2);
        assert_eq!(text.sin[0].atan2(text.cos[0]), 2.0);
        assert_eq!(text.sin[3].atan2(text.cos[3]), 3.0);
    }

    #[test]
    fn per_axis_tables_equal_per_token_angles() {
        let rope = QwenRope::new(&[16, 56, 56]);
        let shapes = [ImageShape::new(5, 7), ImageShape { frames: 2, height: 4, width: 3 }];
        let freqs = rope.freqs();
        for (idx, (s, t)) in shapes.iter().zip(rope.image_tables(&shapes)).enumerate() {
            let mut want = RopeTable { half: 64, ..Default::default() };
            let (h0, w0) = ((s.height - s.height / 2) as i64, (s.width - s.width / 2) as i64);
            for f in 0..s.frames {
                for r in 0..s.height {
                    for c in 0..s.width {
                        let pos = [(idx + f) as i64, r as i64 - h0, c as i64 - w0];
                        rope.push_token(&freqs, pos, &mut want);
                    }
                }
            }
            assert_eq!(t, want, "image {idx}");
        }
    }

    #[test]
    fn the_cache_follows_the_layout() {
        let dev = Default::default();
        let rope = QwenRope::new(&[2, 2, 4]);
        let mut cache = RopeCache::<Flex>::default();
        let host = |t: RopeTensors<Flex>| -> Vec<f32> { t.cos.into_data().to_vec().unwrap() };
        let (a, b) = (vec![ImageShape::new(2, 3), ImageShape::new(1, 2)], vec![ImageShape::new(3, 3)]);
        for (shapes, text) in [(&a, 4), (&b, 4), (&a, 5), (&a, 4)] {
            let want_text = rope.text_table(shapes, text).cos;
            assert_eq!(host(cache.text(&rope, shapes, text, &dev)), want_text);
            let all: Vec<usize> = (0..shapes.len()).collect();
            let want = RopeTable::concat(&rope.image_tables(shapes)).cos;
            assert_eq!(host(cache.images(&rope, shapes, text, &all, &dev)), want);
            let last = shapes.len() - 1;
            assert_eq!(
                host(cache.images(&rope, shapes, text, &[last], &dev)),
                rope.image_tables(shapes)[last].cos
            );
        }
    }

    #[test]
    fn rotation_uses_interleaved_pairs() {
        let dev = Default::default();
        let table = RopeTable { cos: vec![0.0, 1.0], sin: vec![1.0, 0.0], half: 2 };
        let x = Tensor::<Flex, 4>::from_floats([[[[1.0, 2.0, 3.0, 4.0]]]], &dev);
        let y: Vec<f32> = table.to_device::<Flex>(&dev).apply(x).into_data().to_vec().unwrap();
        // (1 + 2i)·i = −2 + i ; (3 + 4i)·1 = 3 + 4i
        assert_eq!(y, vec![-2.0, 1.0, 3.0, 4.0]);
    }
}
