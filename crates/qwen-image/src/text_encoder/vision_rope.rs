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
    pub fn new(grids: &[GridThw], merge: usize, head_dim: usize, theta: f64) -> Self {
        let spatial = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..spatial).step_by(2).map(|i| 1.0 / (theta as f32).powf(i as f32 / spatial as f32)).collect();
        let positions = patch_positions(grids, merge);
        let mut table = VisionRopeTable {
            cos: Vec::with_capacity(positions.len() * head_dim),
            sin: Vec::with_capacity(positions.len() * head_dim),
            head_dim,
        };
        let mut angles = Vec::with_capacity(head_dim);
        for [row, col] in positions {
            angles.clear();
            angles.extend(inv_freq.iter().map(|f| row as f32 * f));
            angles.extend(inv_freq.iter().map(|f| col as f32 * f));
            for _ in 0..2 {
                for a in &angles {
                    table.cos.push(a.cos());
                    table.sin.push(a.sin());
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
