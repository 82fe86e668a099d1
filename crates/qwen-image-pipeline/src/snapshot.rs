//! Finding and checking a diffusers snapshot folder of Qwen-Image-Edit (v1, 2509, 2511).
//!
//! How to use: `Snapshot::locate("Qwen/Qwen-Image-Edit")` finds the snapshot in the Hugging Face cache
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`: `models--Qwen--Qwen-Image-Edit/
//! snapshots/<rev>/`, the revision named by `refs/main` when present); `Snapshot::locate("/path/to/folder")` opens a
//! folder. Either way `model_index.json` must name `QwenImageEditPipeline` (Edit v1) or `QwenImageEditPlusPipeline`
//! (2509 / 2511), and the component folders must exist.

use std::path::{Path, PathBuf};

use qwen_image::{dit::DitConfig, processor::ImageProcessorConfig};
use serde::{Deserialize, Serialize};

use crate::{PipelineError, Result};

/// Which pipeline a snapshot is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Variant {
    /// `QwenImageEditPipeline` (Qwen-Image-Edit): one input image, the vision-language encoder sees it at ~1 MP.
    Edit,
    /// `QwenImageEditPlusPipeline` (Edit-2509 / 2511): 1–3 input images, ~384² for the vision-language encoder.
    EditPlus,
}

impl Variant {
    /// The most input images the variant takes.
    pub fn max_images(self) -> usize {
        match self {
            Variant::Edit => 1,
            Variant::EditPlus => 3,
        }
    }
}

/// A checked snapshot folder.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The folder holding `model_index.json`.
    pub root: PathBuf,
    /// The pipeline variant from `model_index.json`.
    pub variant: Variant,
}

fn snap_err(path: &Path, reason: impl Into<String>) -> PipelineError {
    PipelineError::Snapshot { path: path.to_path_buf(), reason: reason.into() }
}

/// The Hugging Face hub cache folder.
pub fn hf_hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// Whether `spec` looks like a hub repo id (`owner/name`) rather than a path.
fn is_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        && !spec.starts_with('.')
}

/// The snapshot folder of `repo_id` in the hub cache `cache`.
pub fn find_in_cache(cache: &Path, repo_id: &str) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if !snapshots.is_dir() {
        return Err(snap_err(
            &repo,
            format!("`{repo_id}` is not in the Hugging Face cache (download it first, or pass a folder)"),
        ));
    }
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .map_err(|e| snap_err(&snapshots, e.to_string()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path()))
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, p)| p).ok_or_else(|| snap_err(&snapshots, "no snapshot revision is downloaded"))
}

impl Snapshot {
    /// A folder path, or a hub repo id looked up in the Hugging Face cache (a path that exists wins).
    pub fn locate(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() || !is_repo_id(spec) {
            return Self::open(path);
        }
        let cache = hf_hub_cache()
            .ok_or_else(|| snap_err(path, "no Hugging Face cache folder (set HF_HOME or HF_HUB_CACHE)"))?;
        Self::open(&find_in_cache(&cache, spec)?)
    }

    /// Opens and checks a snapshot folder.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(snap_err(root, "the model folder does not exist"));
        }
        let index = root.join("model_index.json");
        let text = std::fs::read_to_string(&index).map_err(|_| {
            snap_err(
                root,
                "no model_index.json: this is not a diffusers snapshot folder (give the folder holding \
                            model_index.json, transformer/, vae/, text_encoder/ …)",
            )
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| snap_err(&index, format!("invalid JSON: {e}")))?;
        let class = json.get("_class_name").and_then(|v| v.as_str()).unwrap_or("");
        let variant = match class {
            "QwenImageEditPipeline" => Variant::Edit,
            "QwenImageEditPlusPipeline" => Variant::EditPlus,
            other => {
                return Err(snap_err(
                    &index,
                    format!(
                        "wrong model type: the snapshot is a `{other}`; this pipeline runs QwenImageEditPipeline \
                         (Qwen-Image-Edit) and QwenImageEditPlusPipeline (Qwen-Image-Edit-2509/2511) snapshots"
                    ),
                ))
            }
        };
        let snap = Snapshot { root: root.to_path_buf(), variant };
        for dir in ["transformer", "vae", "text_encoder"] {
            if !root.join(dir).is_dir() {
                return Err(snap_err(root, format!("the `{dir}/` folder is missing")));
            }
        }
        snap.processor_dir()?;
        Ok(snap)
    }

    /// The DiT's `transformer/config.json` (e.g. its number of blocks, to check a schedule before loading).
    pub fn dit_config(&self) -> Result<DitConfig> {
        Ok(DitConfig::from_file(&self.root.join("transformer/config.json"))?)
    }

    /// `processor/` when it holds a tokenizer, else `tokenizer/`.
    pub fn processor_dir(&self) -> Result<PathBuf> {
        for dir in ["processor", "tokenizer"] {
            let d = self.root.join(dir);
            if d.join("tokenizer.json").is_file() || d.join("vocab.json").is_file() {
                return Ok(d);
            }
        }
        Err(snap_err(&self.root, "neither processor/ nor tokenizer/ holds a tokenizer"))
    }

    /// The Qwen2-VL image processor settings: `processor/preprocessor_config.json`, or the `image_processor` entry of
    /// `processor/processor_config.json` (transformers 5 layout).
    pub fn image_processor_config(&self) -> Result<ImageProcessorConfig> {
        let dir = self.root.join("processor");
        let pre = dir.join("preprocessor_config.json");
        if pre.is_file() {
            return Ok(ImageProcessorConfig::from_file(&pre)?);
        }
        let combined = dir.join("processor_config.json");
        if let Ok(text) = std::fs::read_to_string(&combined) {
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| snap_err(&combined, format!("invalid JSON: {e}")))?;
            if let Some(ip) = json.get("image_processor") {
                return Ok(ImageProcessorConfig::from_json(&ip.to_string())?);
            }
        }
        Err(snap_err(&dir, "no preprocessor_config.json (nor processor_config.json with an image_processor)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths() {
        assert!(is_repo_id("Qwen/Qwen-Image-Edit"));
        assert!(!is_repo_id("./models/x"));
        assert!(!is_repo_id("/abs/path"));
        assert!(!is_repo_id("a/b/c"));
    }

    #[test]
    fn finds_a_snapshot_in_the_cache_layout() {
        let cache = std::env::temp_dir().join(format!("qwen-hf-cache-{}", std::process::id()));
        let repo = cache.join("models--Qwen--Qwen-Image-Edit");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/old")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(find_in_cache(&cache, "Qwen/Qwen-Image-Edit").unwrap(), repo.join("snapshots/abc123"));
        let err = find_in_cache(&cache, "Qwen/Qwen-Image-Edit-2511").unwrap_err();
        assert!(err.to_string().contains("not in the Hugging Face cache"), "{err}");
    }
}
