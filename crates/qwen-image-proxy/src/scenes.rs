//! A few held-out scenes embedded for the demo: one edit per single-image task of the held-out set
//! (`tests/fixtures/proxy/heldout`, never used for training), with the ground truth and the mask of each.

use qwen_image::processor::{decode_image, RgbImage};
use qwen_image_pipeline::{PipelineError, Result};

/// One embedded held-out edit: its source image, instruction, ground truth and object mask.
#[derive(Clone, Copy, Debug)]
pub struct Scene {
    /// The id in the held-out manifest (`edit_0034`).
    pub id: &'static str,
    /// The task (`recolor`, `remove`, `add`, `background`).
    pub task: &'static str,
    /// The instruction.
    pub instruction: &'static str,
    /// Mean RGB of the ground truth over the mask's core (the manifest's `core_rgb`, for the success rule).
    pub core_rgb: [f64; 3],
    source_png: &'static [u8],
    target_png: &'static [u8],
    mask_png: &'static [u8],
}

macro_rules! scene {
    ($id:literal, $task:literal, $instruction:literal, $core:expr) => {
        Scene {
            id: $id,
            task: $task,
            instruction: $instruction,
            core_rgb: $core,
            source_png: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/scenes/", $id, "_src.png")),
            target_png: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/scenes/", $id, "_tgt.png")),
            mask_png: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/scenes/", $id, "_mask.png")),
        }
    };
}

/// The embedded scenes; the first is the demo's default.
pub const SCENES: &[Scene] = &[
    scene!("edit_0034", "recolor", "Color the red circle pink.", [245.0, 130.0, 190.0]),
    scene!("edit_0080", "remove", "Delete the red circle.", [205.662, 180.662, 130.662]),
    scene!("edit_0162", "add", "Put a medium cyan diamond at the bottom centre.", [40.0, 200.0, 215.0]),
    scene!("edit_0241", "background", "Paint the background navy blue.", [25.0, 35.0, 95.0]),
];

/// The demo's default scene (a recolour).
pub fn default_scene() -> &'static Scene {
    &SCENES[0]
}

impl Scene {
    /// The scene to edit.
    pub fn source(&self) -> Result<RgbImage> {
        Ok(decode_image(self.source_png)?)
    }

    /// The right answer.
    pub fn target(&self) -> Result<RgbImage> {
        Ok(decode_image(self.target_png)?)
    }

    /// The object mask, one byte per pixel: 255 = the edit changes the pixel completely, 128 = partly, 0 = must
    /// stay unchanged.
    pub fn mask(&self) -> Result<Vec<u8>> {
        let mask = decode_image(self.mask_png)?;
        let (w, h) = mask.dimensions();
        if (w, h) != (crate::SIDE, crate::SIDE) {
            return Err(PipelineError::invalid(format!("the mask of scene {} is {w}×{h}", self.id)));
        }
        Ok(mask.pixels().map(|p| p.0[0]).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_decode_at_the_proxy_size_with_a_core() {
        for s in SCENES {
            let (src, tgt, mask) = (s.source().unwrap(), s.target().unwrap(), s.mask().unwrap());
            assert_eq!(src.dimensions(), (crate::SIDE, crate::SIDE), "{}", s.id);
            assert_eq!(tgt.dimensions(), src.dimensions(), "{}", s.id);
            assert!(mask.contains(&255), "{}: empty core", s.id);
            assert!(mask.iter().all(|&m| [0, 128, 255].contains(&m)), "{}", s.id);
        }
    }
}
