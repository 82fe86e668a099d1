//! Multimodal rotary position embedding (M-RoPE) of the language model.
//!
//! Every token has three positions (temporal, height, width). Text tokens carry the same running index on all three
//! axes. The `t·h·w` tokens of an image (`h`, `w` in merged cells) starting at running index `s` get
//! `(s + frame, s + row, s + column)`, and the text after it continues at `s + max(h, w)` (`get_rope_index` of
//! transformers). The head's `head_dim / 2` frequencies `1/θ^(2j/head_dim)` are split into `mrope_section` chunks
//! that read the temporal, height and width positions; the angles are repeated twice for the rotate-half pairs.

use crate::processor::GridThw;
use crate::{ModelError, Result};

/// How the language model's rotary positions are assigned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PositionMode {
    /// M-RoPE positions from the image grids (`get_rope_index`): what Qwen2.5-VL was trained with and what
    /// transformers computes when `mm_token_type_ids` is passed (and always did before transformers 5).
    #[default]
    Multimodal,
    /// `0, 1, 2, …` on all three axes, ignoring the image grids: what transformers 5 computes when it is called
    /// without `mm_token_type_ids`, as diffusers' Qwen-Image pipelines call it.
    Sequential,
}

/// Positions of the three axes, one entry per token each.
pub type Positions = [Vec<i64>; 3];

/// `0..len` on all three axes.
pub fn sequential_positions(len: usize) -> Positions {
    let p: Vec<i64> = (0..len as i64).collect();
    [p.clone(), p.clone(), p]
}

/// M-RoPE positions of one sequence of (unpadded) token ids holding the images `grids`, in order.
///
/// Each image takes `t · (h/merge) · (w/merge)` consecutive `image_token_id` tokens. Errors if the image tokens do
/// not line up with the grids.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L934
pub fn multimodal_positions(
    ids: &[i64],
    image_token_id: i64,
    grids: &[GridThw],
    merge: usize,
) -> Result<Positions> {
    let mut pos: Positions = Default::default();
    let mut current = 0i64;
    let (mut i, mut image) = (0usize, 0usize);
    while i < ids.len() {
        if ids[i] != image_token_id {
            pos.iter_mut().for_each(|axis| axis.push(current));
            current += 1;
            i += 1;
            continue;
        }
        let Some(&GridThw { t, h, w }) = grids.get(image) else {
            return Err(ModelError::invalid(format!(
                "image token at position {i} follows the tokens of all {} image(s) of this sequence",
                grids.len()
            )));
        };
        let (gh, gw) = (h / merge, w / merge);
        let count = t * gh * gw;
        if i + count > ids.len() || ids[i..i + count].iter().any(|&id| id != image_token_id) {
            return Err(ModelError::invalid(format!(
                "image {image} (grid {t}×{h}×{w} patches) needs {count} consecutive image tokens from position {i}"
            )));
        }
        for f in 0..t as i64 {
            for r in 0..gh as i64 {
                for c in 0..gw as i64 {
                    pos[0].push(current + f);
                    pos[1].push(current + r);
                    pos[2].push(current + c);
                }
            }
        }
        current += gh.max(gw) as i64;
        i += count;
        image += 1;
    }
    if image != grids.len() {
        return Err(ModelError::invalid(format!(
            "the sequence holds the tokens of {image} image(s) but {} were assigned to it",
            grids.len()
        )));
    }
    Ok(pos)
}

/// cos/sin of the M-RoPE angles, `[tokens, head_dim]` row-major, f32.
// https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py#L492
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MropeTable {
    /// Cosines.
    pub cos: Vec<f32>,
    /// Sines.
    pub sin: Vec<f32>,
    /// Columns per token.
    pub head_dim: usize,
}

impl MropeTable {
    /// The table of `positions` for heads of `head_dim` with base `theta` and frequency `sections` (t, h, w)
    /// summing to `head_dim / 2`. Computed in f32 as transformers does.
    ///
    /// An angle depends only on a position value and a frequency, and a prompt holds few distinct position values
    /// (an image's tokens share rows and columns), so the cosines and sines are computed once per distinct value:
    /// the same f32 values as evaluating them per token.
    pub fn new(positions: &Positions, head_dim: usize, theta: f64, sections: [usize; 3]) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / head_dim as f32)).collect();
        let axis_of: Vec<usize> = (0..half)
            .map(|j| {
                if j < sections[0] {
                    0
                } else if j < sections[0] + sections[1] {
                    1
                } else {
                    2
                }
            })
            .collect();
        let [t, h, w] = positions;
        let tokens = t.len();
        // Row `slot[p]` of the per-value tables holds the cosines and sines of position value `p` (all `half`
        // frequencies); values get a row when first seen.
        let mut slot = std::collections::HashMap::new();
        let (mut cos_of, mut sin_of) = (Vec::new(), Vec::new());
        let mut row_of = |p: i64| -> usize {
            *slot.entry(p).or_insert_with(|| {
                cos_of.extend(inv_freq.iter().map(|f| (p as f32 * f).cos()));
                sin_of.extend(inv_freq.iter().map(|f| (p as f32 * f).sin()));
                cos_of.len() / half - 1
            })
        };
        let rows: Vec<[usize; 3]> =
            t.iter().zip(h).zip(w).map(|((&pt, &ph), &pw)| [row_of(pt), row_of(ph), row_of(pw)]).collect();
        let mut table = MropeTable {
            cos: Vec::with_capacity(tokens * head_dim),
            sin: Vec::with_capacity(tokens * head_dim),
            head_dim,
        };
        let mut cos = vec![0f32; half];
        let mut sin = vec![0f32; half];
        for row in rows {
            for j in 0..half {
                let at = row[axis_of[j]] * half + j;
                cos[j] = cos_of[at];
                sin[j] = sin_of[at];
            }
            for _ in 0..2 {
                table.cos.extend_from_slice(&cos);
                table.sin.extend_from_slice(&sin);
            }
        }
        table
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.cos.len().checked_div(self.head_dim).unwrap_or(0)
    }

    /// Whether the table has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: i64 = 9;

    #[test]
    fn text_image_text_positions() {
        // 2 text tokens, a 1×4×6 image (2×3 merged cells), 2 text tokens.
        let ids = [1, 2, IMG, IMG, IMG, IMG, IMG, IMG, 3, 4];
        let [t, h, w] = multimodal_positions(&ids, IMG, &[GridThw::new(1, 4, 6)], 2).unwrap();
        assert_eq!(t, vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(h, vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(w, vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn adjacent_images_and_mismatches() {
        let ids = [IMG, IMG, IMG, 7];
        let [_, h, w] =
            multimodal_positions(&ids, IMG, &[GridThw::new(1, 2, 2), GridThw::new(1, 2, 4)], 2).unwrap();
        assert_eq!((h, w), (vec![0, 1, 1, 3], vec![0, 1, 2, 3]));
        assert!(multimodal_positions(&ids, IMG, &[GridThw::new(1, 2, 2)], 2)
            .unwrap_err()
            .to_string()
            .contains("all 1"));
        assert!(multimodal_positions(&ids, IMG, &[GridThw::new(1, 4, 4)], 2)
            .unwrap_err()
            .to_string()
            .contains("needs 4"));
        let err = multimodal_positions(&[1, 2], IMG, &[GridThw::new(1, 2, 2)], 2).unwrap_err();
        assert!(err.to_string().contains("0 image(s)"), "{err}");
    }

    #[test]
    fn table_equals_the_direct_evaluation_bit_for_bit() {
        // Edit v1's layout: 66 text tokens, a 74×74-patch image (37×37 merged cells), 32 text tokens; head dim 128.
        let mut ids = vec![1i64; 66];
        ids.extend(std::iter::repeat_n(IMG, 37 * 37));
        ids.extend([1i64; 32]);
        let positions = multimodal_positions(&ids, IMG, &[GridThw::new(1, 74, 74)], 2).unwrap();
        let (head_dim, theta, sections) = (128, 1e6, [16, 24, 24]);
        let got = MropeTable::new(&positions, head_dim, theta, sections);
        let half = head_dim / 2;
        let inv: Vec<f32> =
            (0..half).map(|j| 1.0 / (theta as f32).powf((2 * j) as f32 / head_dim as f32)).collect();
        let axis = |j: usize| usize::from(j >= sections[0]) + usize::from(j >= sections[0] + sections[1]);
        for (i, c) in got.cos.chunks(head_dim).enumerate() {
            for (k, &v) in c.iter().enumerate() {
                let angle = positions[axis(k % half)][i] as f32 * inv[k % half];
                assert_eq!(v.to_bits(), angle.cos().to_bits(), "token {i}, column {k}");
                assert_eq!(
                    got.sin[i * head_dim + k].to_bits(),
                    angle.sin().to_bits(),
                    "token {i}, column {k}"
                );
            }
        }
        assert_eq!(got.len(), ids.len());
    }

    #[test]
    fn sections_pick_the_axes() {
        // head_dim 8, sections [1, 1, 2]: frequency 0 reads t, 1 reads h, 2 and 3 read w; θ = 1 makes all
        // frequencies 1, so the angles are the positions.
        let positions = [vec![5], vec![6], vec![7]];
        let table = MropeTable::new(&positions, 8, 1.0, [1, 1, 2]);
        let angles: Vec<f32> = (0..8).map(|i| table.sin[i].atan2(table.cos[i])).collect();
        let want = [5.0f32, 6.0, 7.0, 7.0, 5.0, 6.0, 7.0, 7.0].map(|a| a.sin().atan2(a.cos()));
        for (a, w) in angles.iter().zip(want) {
            assert!((a - w).abs() < 1e-5, "{angles:?}");
        }
    }
}
