//! [`PixelMask`]: the user's black/white edit mask, and how it maps onto the target's token grid and output pixels.

use std::path::Path;

use crate::PruneError;

/// A black/white edit mask as inpainting tools take it: white (luma ≥ 128) marks the region to edit, black the
/// region to keep. Any size: it is scaled to the target's token grid and to the output image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PixelMask {
    width: usize,
    height: usize,
    edit: Vec<bool>,
}

impl PixelMask {
    /// A mask of `width × height` pixels, row-major, `true` = edit.
    pub fn new(width: usize, height: usize, edit: Vec<bool>) -> Result<Self, PruneError> {
        if width == 0 || height == 0 || edit.len() != width * height {
            return Err(PruneError::InvalidPlan(format!(
                "a {width}×{height} mask needs {} values, got {}",
                width * height,
                edit.len()
            )));
        }
        Ok(PixelMask { width, height, edit })
    }

    /// Reads a PNG or JPEG; white (luma ≥ 128) is the region to edit. Errors if the file cannot be read or marks
    /// nothing.
    pub fn load(path: &Path) -> Result<Self, PruneError> {
        let err = |reason: String| PruneError::Spec { spec: format!("mask:{}", path.display()), reason };
        let img = image::open(path).map_err(|e| err(format!("cannot read the mask: {e}")))?.to_luma8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mask = PixelMask::new(w, h, img.pixels().map(|p| p.0[0] >= 128).collect())
            .map_err(|e| err(e.to_string()))?;
        if !mask.edit.contains(&true) {
            return Err(err("the mask has no white pixel: nothing to edit".into()));
        }
        Ok(mask)
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Whether the pixel of an image of `width × height` at `(x, y)` is in the edit region (nearest neighbour).
    pub fn edits_pixel(&self, x: usize, y: usize, width: usize, height: usize) -> bool {
        let mx = (x * self.width / width.max(1)).min(self.width - 1);
        let my = (y * self.height / height.max(1)).min(self.height - 1);
        self.edit[my * self.width + mx]
    }

    /// The token mask on a `(rows, columns)` grid: a token is marked when any mask pixel of its cell is white (so
    /// every edited pixel lies in a marked token).
    pub fn token_mask(&self, grid: (usize, usize)) -> Vec<bool> {
        let (h, w) = (grid.0.max(1), grid.1.max(1));
        let mut out = vec![false; h * w];
        for y in 0..self.height {
            for x in 0..self.width {
                if self.edit[y * self.width + x] {
                    out[(y * h / self.height) * w + x * w / self.width] = true;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_cover_every_white_pixel() {
        // 4×2 pixels, white at (3, 1): on a 2×2 grid that is token row 1, column 1.
        let mut edit = vec![false; 8];
        edit[7] = true;
        let mask = PixelMask::new(4, 2, edit).unwrap();
        assert_eq!(mask.token_mask((2, 2)), vec![false, false, false, true]);
        assert!(mask.edits_pixel(7, 3, 8, 4) && !mask.edits_pixel(0, 0, 8, 4));
        assert!(PixelMask::new(2, 2, vec![true]).is_err());
    }
}
