//! The worst-case grid of a schedule: one row per worst case (worst first), columns
//! source | ground truth | output | |output − ground truth| (a heat map, ×[`DIFF_GAIN`]).

use qwen_image::processor::RgbImage;
use qwen_image_pipeline::metrics::difference_heatmap;

use crate::{evaluate::WorstCase, EvalError, Result};

/// Gain of the difference heat map (a difference of 255 / gain is white).
pub const DIFF_GAIN: f32 = 2.0;

/// Gap between cells, pixels (white).
const GAP: u32 = 4;

/// The grid of `cases` (`None` when there are none).
pub fn worst_case_grid(cases: &[WorstCase]) -> Result<Option<RgbImage>> {
    let mut rows = Vec::with_capacity(cases.len());
    for case in cases {
        let (w, h) = case.output.dimensions();
        let heat = difference_heatmap(case.output.as_raw(), case.target.as_raw(), DIFF_GAIN)?;
        let heat = RgbImage::from_raw(w, h, heat)
            .ok_or_else(|| EvalError::Invalid("the difference heat map has the wrong size".into()))?;
        rows.push([case.source.clone(), case.target.clone(), case.output.clone(), heat]);
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let cell_w = rows.iter().flatten().map(|i| i.width()).max().unwrap_or(0);
    let cell_h = rows.iter().flatten().map(|i| i.height()).max().unwrap_or(0);
    let (n_rows, n_cols) = (rows.len() as u32, 4u32);
    let mut grid = RgbImage::from_pixel(
        n_cols * cell_w + (n_cols - 1) * GAP,
        n_rows * cell_h + (n_rows - 1) * GAP,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            let (x, y) = (c as u32 * (cell_w + GAP), r as u32 * (cell_h + GAP));
            image::imageops::overlay(&mut grid, cell, x.into(), y.into());
        }
    }
    Ok(Some(grid))
}
