//! 2-D rotary embedding of the vision tower (`Qwen2_5_VLVisionRotaryEmbedding`, rope type "axial").
//!
//! Each patch has a (row, column) position in its image's patch grid. With `q = head_dim / 4` frequencies
//! `1/θ^(2j / (head_dim/2))`, the angles are `[row·f_0 … row·f_{q−1}, col·f_0 … col·f_{q−1}]`, repeated twice to
//! cover the head (rotate-half pairs `(i, i + head_dim/2)`). Patches are listed as the image processor emits them:
//! merged cells row-major, the `merge × merge` patches of a cell row-major inside it; every frame repeats the
//! positions. The tables are computed in f32, as transformers does.

use crate::processor::GridThw;

/// cos/sin of the vision rotary angles, `[patches, head_dim]` row-major, f32.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L125
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VisionRopeTable {
    /// Cosines.
    pub cos: Vec<f32>,
    /// Sines.
    pub sin: Vec<f32>,
    /// Columns per patch (the head dimension).
    pub head_dim: usize,
}

/// (row, column) of every patch of `grids`, in the processor's patch order.
pub fn patch_positions(grids: &[GridThw], merge: usize) -> Vec<[usize; 2]> {
    let mut out = Vec::new();
    for &GridThw { t, h, w } in grids {
        for _ in 0..t {
            for br in 0..h / merge {
                for bc in 0..w / merge {
                    for mr in 0..merge {
                        for mc in 0..merge {
                            out.push([br * merge + mr, bc * merge + mc]);
                        }
                    }
                }
            }
        }
    }
    out
}

impl VisionRopeTable {
    /// The table of `grids` (processor order) for heads of `head_dim` (a multiple of 4) and base `theta`.
    ///
    /// Every angle is `index as f32 · frequency` with the index a row or a column, so the cosines and sines are
    /// computed once per (index, frequency) and copied into each patch's row: the same f32 values as evaluating
    /// them per patch, for a few thousand instead of ~0.9 M trigonometric calls at Edit v1's 74×74 patches.
    pub fn new(grids: &[GridThw], merge: usize, head_dim: usize, theta: f64) -> Self {
        let spatial = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..spatial).step_by(2).map(|i| 1.0 / (theta as f32).powf(i as f32 / spatial as f32)).collect();
        let positions = patch_positions(grids, merge);
        let sides = grids.iter().map(|g| g.h.max(g.w)).max().unwrap_or(0);
        let angle_table = |f: fn(f32) -> f32| -> Vec<f32> {
            (0..sides).flat_map(|i| inv_freq.iter().map(move |fr| f(i as f32 * fr))).collect()
        };
        let (cos_of, sin_of) = (angle_table(f32::cos), angle_table(f32::sin));
        let q = inv_freq.len();
        let mut table = VisionRopeTable {
            cos: Vec::with_capacity(positions.len() * head_dim),
            sin: Vec::with_capacity(positions.len() * head_dim),
            head_dim,
        };
        for [row, col] in positions {
            for _ in 0..2 {
                for index in [row, col] {
                    table.cos.extend_from_slice(&cos_of[index * q..(index + 1) * q]);
                    table.sin.extend_from_slice(&sin_of[index * q..(index + 1) * q]);
                }
            }
        }
        table
    }

    /// Number of patches.
    pub fn len(&self) -> usize {
        self.cos.len().checked_div(self.head_dim).unwrap_or(0)
    }

    /// Whether the table has no patches.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows in the order `order` (`order[i]` = the patch placed at row `i`).
    pub fn permuted(&self, order: &[usize]) -> Self {
        let d = self.head_dim;
        let pick = |v: &[f32]| order.iter().flat_map(|&p| v[p * d..(p + 1) * d].iter().copied()).collect();
        VisionRopeTable { cos: pick(&self.cos), sin: pick(&self.sin), head_dim: d }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_come_in_merge_groups() {
        let pos = patch_positions(&[GridThw::new(1, 2, 4)], 2);
        assert_eq!(pos, vec![[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]);
        assert_eq!(patch_positions(&[GridThw::new(2, 2, 2)], 2).len(), 8);
    }

    /// The direct evaluation: the angles of every patch, then their cosines and sines.
    fn direct(grids: &[GridThw], merge: usize, head_dim: usize, theta: f64) -> VisionRopeTable {
        let spatial = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..spatial).step_by(2).map(|i| 1.0 / (theta as f32).powf(i as f32 / spatial as f32)).collect();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for [row, col] in patch_positions(grids, merge) {
            let angles: Vec<f32> = inv_freq
                .iter()
                .map(|f| row as f32 * f)
                .chain(inv_freq.iter().map(|f| col as f32 * f))
                .collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        VisionRopeTable { cos, sin, head_dim }
    }

    #[test]
    fn table_equals_the_direct_evaluation_bit_for_bit() {
        // Edit v1's vision grid (head dim 80, θ = 10⁴), and several images of different sides and frames.
        for (grids, head_dim) in
            [(vec![GridThw::new(1, 74, 74)], 80), (vec![GridThw::new(1, 4, 8), GridThw::new(2, 10, 6)], 16)]
        {
            let got = VisionRopeTable::new(&grids, 2, head_dim, 1e4);
            let want = direct(&grids, 2, head_dim, 1e4);
            assert_eq!(got.len(), want.len());
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&got.cos) == bits(&want.cos) && bits(&got.sin) == bits(&want.sin), "{grids:?}");
        }
        assert!(VisionRopeTable::new(&[], 2, 16, 1e4).is_empty());
    }

    #[test]
    fn angles_are_row_then_column_repeated() {
        // head_dim 8: frequencies 1 and 1/θ^(1/2) = 0.01 for θ = 10⁴.
        let t = VisionRopeTable::new(&[GridThw::new(1, 2, 4)], 2, 8, 1e4);
        assert_eq!(t.len(), 8);
        let angle = |p: usize, i: usize| t.sin[p * 8 + i].atan2(t.cos[p * 8 + i]);
        // Patch 6 is at row 1, column 2.
        let expect = [1.0, 0.01, 2.0, 0.02, 1.0, 0.01, 2.0, 0.02];
        for (i, e) in expect.iter().enumerate() {
            assert!((angle(6, i) - e).abs() < 1e-6, "{i}: {} vs {e}", angle(6, i));
        }
        let p = t.permuted(&[6, 0]);
        assert_eq!(&p.cos[..8], &t.cos[48..56]);
        assert_eq!(p.len(), 2);
    }
}
