//! Window attention layout of the vision tower (`get_vision_window_index`, `get_vision_cu_seqlens`).
//!
//! The vision blocks see the patches of all images as one sequence, reordered so that the merged cells (2×2
//! patches) of each attention window are contiguous. Per frame, the merged grid `gh × gw` is padded at the bottom and
//! right to multiples of the window side `ws` (by `ws − g mod ws`: a whole empty row/column of windows when the side
//! already divides, which then has no cells), tiled into `ws × ws` windows in row-major order, with the cells inside
//! a window in row-major order. Empty windows vanish from `cu_window_seqlens`.

use crate::processor::GridThw;

/// The permutation and block boundaries of the vision tower's attention.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/vision_utils.py#L130
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowLayout {
    /// `window_index[i]` = raster index (over all images) of the merged cell placed at position `i`.
    pub window_index: Vec<usize>,
    /// Window boundaries in patches, in the permuted order (`0 = c_0 < … < c_n = patches`).
    pub cu_window_seqlens: Vec<usize>,
    /// Frame boundaries in patches (full-attention blocks attend within one frame of one image).
    pub cu_seqlens: Vec<usize>,
}

impl WindowLayout {
    /// The layout of `grids` for merge cells of `merge × merge` patches and windows of `window_cells` merged cells.
    ///
    /// Heights and widths must be multiples of `merge` (checked by the caller).
    pub fn new(grids: &[GridThw], merge: usize, window_cells: usize) -> Self {
        let unit = merge * merge;
        let ws = window_cells;
        let mut window_index = Vec::new();
        let mut cu_window_seqlens = vec![0usize];
        let mut cu_seqlens = vec![0usize];
        let mut offset = 0;
        for &GridThw { t, h, w } in grids {
            let (gh, gw) = (h / merge, w / merge);
            let (nwh, nww) = ((gh + ws - gh % ws) / ws, (gw + ws - gw % ws) / ws);
            for frame in 0..t {
                let base = offset + frame * gh * gw;
                for wr in 0..nwh {
                    for wc in 0..nww {
                        let mut cells = 0;
                        for r in wr * ws..((wr + 1) * ws).min(gh) {
                            for c in wc * ws..((wc + 1) * ws).min(gw) {
                                window_index.push(base + r * gw + c);
                                cells += 1;
                            }
                        }
                        let end = cu_window_seqlens.last().copied().unwrap_or(0) + cells * unit;
                        if cells > 0 {
                            cu_window_seqlens.push(end);
                        }
                    }
                }
                cu_seqlens.push(cu_seqlens.last().copied().unwrap_or(0) + h * w);
            }
            offset += t * gh * gw;
        }
        WindowLayout { window_index, cu_window_seqlens, cu_seqlens }
    }

    /// Number of merged cells.
    pub fn cells(&self) -> usize {
        self.window_index.len()
    }

    /// The patch permutation: merged cell `window_index[i]`'s `unit` patches, for every `i`.
    pub fn patch_order(&self, unit: usize) -> Vec<usize> {
        self.window_index.iter().flat_map(|&cell| (0..unit).map(move |j| cell * unit + j)).collect()
    }

    /// The inverse of `window_index` (`argsort`): where each raster cell sits in the permuted order.
    pub fn reverse_index(&self) -> Vec<usize> {
        let mut reverse = vec![0; self.window_index.len()];
        for (pos, &cell) in self.window_index.iter().enumerate() {
            reverse[cell] = pos;
        }
        reverse
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_tile_the_merged_grid_row_major() {
        // One image of 6×10 patches → 3×5 merged cells, windows of 2×2 cells (the side does not divide).
        let layout = WindowLayout::new(&[GridThw::new(1, 6, 10)], 2, 2);
        assert_eq!(layout.window_index, vec![0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]);
        assert_eq!(layout.cu_window_seqlens, vec![0, 16, 32, 40, 48, 56, 60]);
        assert_eq!(layout.cu_seqlens, vec![0, 60]);
        let rev = layout.reverse_index();
        assert!(layout.window_index.iter().enumerate().all(|(i, &c)| rev[c] == i));
        assert_eq!(&layout.patch_order(4)[..6], &[0, 1, 2, 3, 4, 5]);
        assert_eq!(&layout.patch_order(4)[8..10], &[20, 21]);
    }

    #[test]
    fn divisible_grids_and_several_images() {
        // 2×2 merged cells with 2-cell windows divide exactly (the padding adds only empty windows);
        // the second image's cells are offset by the first image's 4 cells; frames attend separately.
        let layout = WindowLayout::new(&[GridThw::new(1, 4, 4), GridThw::new(2, 2, 4)], 2, 2);
        assert_eq!(layout.window_index, vec![0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(layout.cu_window_seqlens, vec![0, 16, 24, 32]);
        assert_eq!(layout.cu_seqlens, vec![0, 16, 24, 32]);
    }
}
