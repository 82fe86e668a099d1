//! The held-out set of the proxy models (`tests/fixtures/proxy/heldout`, written by
//! `python3 tools/proxy/scenes.py heldout`): its manifest, a selection of its edits, and each edit's images.
//!
//! How to use:
//!
//! ```no_run
//! use qwen_image_eval::heldout::{HeldOutSet, Selection};
//!
//! # fn main() -> qwen_image_eval::Result<()> {
//! let set = HeldOutSet::open("tests/fixtures/proxy/heldout".as_ref())?;
//! let edits = set.select(&Selection { limit: Some(24), ..Selection::default() })?; // every task, both variants
//! let images = set.load(edits[0])?;
//! # let _ = images; Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use qwen_image::processor::{load_image, RgbImage};
use qwen_image_pipeline::Variant;
use qwen_image_pruning::{ScheduleSpec, DEFAULT_MASK_MARGIN};
use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

/// Which pipeline a held-out edit is for (the manifest's `variant`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetVariant {
    /// `QwenImageEditPipeline` (one input image).
    Edit,
    /// `QwenImageEditPlusPipeline` (one or two input images).
    Plus,
}

impl SetVariant {
    /// The pipeline variant that runs it.
    pub fn pipeline_variant(self) -> Variant {
        match self {
            SetVariant::Edit => Variant::Edit,
            SetVariant::Plus => Variant::EditPlus,
        }
    }

    /// `edit` or `plus`.
    pub fn name(self) -> &'static str {
        match self {
            SetVariant::Edit => "edit",
            SetVariant::Plus => "plus",
        }
    }
}

impl std::str::FromStr for SetVariant {
    type Err = EvalError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "edit" => Ok(SetVariant::Edit),
            "plus" => Ok(SetVariant::Plus),
            _ => Err(EvalError::Invalid(format!("unknown variant `{s}` (edit or plus)"))),
        }
    }
}

/// One line of `manifest.jsonl` (fields not listed here are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeldOutEdit {
    /// `edit_0000` … `plus_0199`.
    pub id: String,
    /// The pipeline it is for.
    pub variant: SetVariant,
    /// `recolor`, `remove`, `add`, `background` or `paste` (Edit-Plus only).
    pub task: String,
    /// The instruction.
    pub instruction: String,
    /// Input PNGs, relative to the set's folder (for `paste`: picture 1, then picture 2).
    pub sources: Vec<String>,
    /// The ground-truth PNG.
    pub target: String,
    /// The mask PNG (255 = core of the edit, 128 = edge, 0 = must not change).
    pub mask: String,
    /// The colour the instruction asks for, if any.
    #[serde(default)]
    pub requested_rgb: Option<[f64; 3]>,
    /// Mean RGB of the ground truth over the mask's core (what the success rule compares with).
    pub core_rgb: [f64; 3],
    /// 0-based line of the edit in the manifest (set when read).
    #[serde(skip)]
    pub index: usize,
}

/// An edit's images, decoded.
#[derive(Clone, Debug)]
pub struct EditImages {
    /// The input images.
    pub sources: Vec<RgbImage>,
    /// The ground truth.
    pub target: RgbImage,
    /// The mask, one byte per pixel of the target.
    pub mask: Vec<u8>,
}

/// Which edits of the set to run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// At most this many edits, spread evenly over the selected (variant, task) groups (round robin over the
    /// groups, the variants alternating, each group in manifest order), so that a small limit still covers every
    /// task of both variants; `None` = all.
    pub limit: Option<usize>,
    /// Only these tasks (empty = all).
    pub tasks: Vec<String>,
    /// Only these variants (empty = both).
    pub variants: Vec<SetVariant>,
}

/// A held-out set: its folder and the edits of its manifest.
#[derive(Clone, Debug)]
pub struct HeldOutSet {
    /// The folder holding `manifest.jsonl` and `images/`.
    pub dir: PathBuf,
    /// Every edit, in manifest order.
    pub edits: Vec<HeldOutEdit>,
}

impl HeldOutSet {
    /// Reads `dir/manifest.jsonl`.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = dir.join("manifest.jsonl");
        let bad = |reason: String| EvalError::HeldOut { path: manifest.clone(), reason };
        if !dir.is_dir() {
            return Err(EvalError::HeldOut {
                path: dir.to_path_buf(),
                reason:
                    "no such folder (the held-out set is written by `python3 tools/proxy/scenes.py heldout`; \
                         pass its folder with --heldout)"
                        .into(),
            });
        }
        let text = std::fs::read_to_string(&manifest).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let mut edits = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let mut edit: HeldOutEdit =
                serde_json::from_str(line).map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
            edit.index = edits.len();
            edits.push(edit);
        }
        if edits.is_empty() {
            return Err(bad("holds no edits".into()));
        }
        Ok(HeldOutSet { dir: dir.to_path_buf(), edits })
    }

    /// The task names in the set, in first-seen order.
    pub fn tasks(&self) -> Vec<&str> {
        let mut tasks: Vec<&str> = Vec::new();
        for e in &self.edits {
            if !tasks.contains(&e.task.as_str()) {
                tasks.push(&e.task);
            }
        }
        tasks
    }

    /// The edits `selection` asks for, in manifest order; errors for an unknown task or an empty selection.
    pub fn select(&self, selection: &Selection) -> Result<Vec<&HeldOutEdit>> {
        let known = self.tasks();
        if let Some(t) = selection.tasks.iter().find(|t| !known.contains(&t.as_str())) {
            return Err(EvalError::Invalid(format!("unknown task `{t}` (the set has {})", known.join(", "))));
        }
        let wanted = |e: &HeldOutEdit| {
            (selection.tasks.is_empty() || selection.tasks.contains(&e.task))
                && (selection.variants.is_empty() || selection.variants.contains(&e.variant))
        };
        let mut groups: Vec<((SetVariant, &str), Vec<&HeldOutEdit>)> = Vec::new();
        for e in self.edits.iter().filter(|e| wanted(e)) {
            let key = (e.variant, e.task.as_str());
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, list)) => list.push(e),
                None => groups.push((key, vec![e])),
            }
        }
        // Alternate the variants (edit/recolor, plus/recolor, edit/remove, …) so that a small limit covers both.
        let mut rank = std::collections::HashMap::new();
        let mut ranked: Vec<_> = groups
            .into_iter()
            .map(|g| {
                let r = rank.entry(g.0 .0).or_insert(0usize);
                *r += 1;
                (*r, g)
            })
            .collect();
        ranked.sort_by_key(|(r, _)| *r);
        let groups: Vec<_> = ranked.into_iter().map(|(_, g)| g).collect();
        let total: usize = groups.iter().map(|(_, l)| l.len()).sum();
        let limit = selection.limit.unwrap_or(total).min(total);
        let mut picked = Vec::with_capacity(limit);
        'rounds: for round in 0.. {
            let before = picked.len();
            for (_, list) in &groups {
                if picked.len() == limit {
                    break 'rounds;
                }
                if let Some(e) = list.get(round) {
                    picked.push(*e);
                }
            }
            if picked.len() == before {
                break;
            }
        }
        if picked.is_empty() {
            return Err(EvalError::Invalid("the selection holds no held-out edits".into()));
        }
        picked.sort_by_key(|e| e.index);
        Ok(picked)
    }

    /// Decodes the images of `edit` and checks that the target and the mask have the same size.
    pub fn load(&self, edit: &HeldOutEdit) -> Result<EditImages> {
        let image = |rel: &str| {
            load_image(&self.dir.join(rel)).map_err(|e| EvalError::HeldOut {
                path: self.dir.join(rel),
                reason: format!("edit {}: {e}", edit.id),
            })
        };
        let sources = edit.sources.iter().map(|s| image(s)).collect::<Result<Vec<_>>>()?;
        let target = image(&edit.target)?;
        let mask_image = image(&edit.mask)?;
        if mask_image.dimensions() != target.dimensions() {
            return Err(EvalError::HeldOut {
                path: self.dir.join(&edit.mask),
                reason: format!("edit {}: the mask is not the size of the target", edit.id),
            });
        }
        let mask = mask_image.pixels().map(|p| p.0[0]).collect();
        Ok(EditImages { sources, target, mask })
    }

    /// The schedule `spec` for `edit`: `mask:heldout[,MARGIN[,REFRESH]]` becomes `mask:` the edit's own mask file
    /// (its core and edge, the pixels the edit may change: an oracle region to compare `region` with) with that
    /// margin (default [`DEFAULT_MASK_MARGIN`]) and refresh step; any other spec is returned as it is.
    pub fn schedule_for(&self, spec: &ScheduleSpec, edit: &HeldOutEdit) -> Result<ScheduleSpec> {
        let ScheduleSpec::Mask { path, mode, layers, .. } = spec else { return Ok(spec.clone()) };
        let text = path.to_string_lossy();
        let mut parts = text.split(',');
        if parts.next() != Some(HELDOUT_MASK) {
            return Ok(spec.clone());
        }
        let bad =
            || EvalError::Invalid(format!("`mask:{text}`: expected mask:{HELDOUT_MASK}[,MARGIN[,REFRESH]]"));
        let numbers =
            parts.map(|p| p.trim().parse::<usize>().map_err(|_| bad())).collect::<Result<Vec<_>>>()?;
        if numbers.len() > 2 || numbers.get(1).is_some_and(|&r| r < 2) {
            return Err(bad());
        }
        Ok(ScheduleSpec::Mask {
            path: self.dir.join(&edit.mask),
            margin: numbers.first().copied().unwrap_or(DEFAULT_MASK_MARGIN),
            refresh: numbers.get(1).copied(),
            mode: *mode,
            layers: *layers,
        })
    }
}

/// The mask file name that [`HeldOutSet::schedule_for`] replaces by each edit's own mask (`mask:heldout`).
pub const HELDOUT_MASK: &str = "heldout";

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> HeldOutSet {
        let edit = |i: usize, variant, task: &str| HeldOutEdit {
            id: format!("e{i}"),
            variant,
            task: task.into(),
            instruction: "x".into(),
            sources: vec![],
            target: String::new(),
            mask: String::new(),
            requested_rgb: None,
            core_rgb: [0.0; 3],
            index: i,
        };
        let mut edits = Vec::new();
        for task in ["recolor", "remove"] {
            for _ in 0..5 {
                edits.push(edit(edits.len(), SetVariant::Edit, task));
            }
        }
        for _ in 0..3 {
            edits.push(edit(edits.len(), SetVariant::Plus, "paste"));
        }
        HeldOutSet { dir: PathBuf::new(), edits }
    }

    #[test]
    fn mask_heldout_becomes_each_edits_own_mask() {
        let mut s = set();
        s.dir = PathBuf::from("/set");
        s.edits[1].mask = "images/e1_mask.png".into();
        let concrete = |spec: &str| s.schedule_for(&spec.parse().unwrap(), &s.edits[1]);
        let ScheduleSpec::Mask { path, margin, refresh, .. } = concrete("mask:heldout").unwrap() else {
            panic!()
        };
        assert_eq!(
            (path, margin, refresh),
            (PathBuf::from("/set/images/e1_mask.png"), DEFAULT_MASK_MARGIN, None)
        );
        let ScheduleSpec::Mask { margin, refresh, .. } = concrete("mask:heldout,2,3").unwrap() else {
            panic!()
        };
        assert_eq!((margin, refresh), (2, Some(3)));
        for bad in ["mask:heldout,x", "mask:heldout,1,1", "mask:heldout,1,3,4"] {
            assert!(concrete(bad).is_err(), "{bad}");
        }
        let user: ScheduleSpec = "mask:edit.png".parse().unwrap();
        assert_eq!(s.schedule_for(&user, &s.edits[1]).unwrap(), user, "a user's mask stays as it is");
        assert_eq!(concrete("cat").unwrap(), "cat".parse().unwrap());
    }

    #[test]
    fn a_limit_spreads_over_groups() {
        let s = set();
        let ids = |sel: &Selection| s.select(sel).unwrap().iter().map(|e| e.index).collect::<Vec<_>>();
        assert_eq!(ids(&Selection { limit: Some(4), ..Default::default() }), vec![0, 1, 5, 10]);
        assert_eq!(ids(&Selection { limit: Some(100), ..Default::default() }).len(), 13);
        let plus = Selection { variants: vec![SetVariant::Plus], ..Default::default() };
        assert_eq!(ids(&plus), vec![10, 11, 12]);
        let removes = Selection { tasks: vec!["remove".into()], limit: Some(2), ..Default::default() };
        assert_eq!(ids(&removes), vec![5, 6]);
    }

    #[test]
    fn bad_selections_and_folders_are_refused() {
        let s = set();
        let err = s.select(&Selection { tasks: vec!["recolour".into()], ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("unknown task `recolour`"), "{err}");
        let none =
            Selection { tasks: vec!["paste".into()], variants: vec![SetVariant::Edit], ..Default::default() };
        assert!(s.select(&none).is_err());
        let err = HeldOutSet::open(Path::new("/nonexistent/heldout")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/heldout") && err.contains("scenes.py heldout"), "{err}");
        assert!("both".parse::<SetVariant>().is_err());
    }
}
