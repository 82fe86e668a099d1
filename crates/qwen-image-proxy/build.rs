//! Lists the files of each snapshot folder for `include_bytes!` (`$OUT_DIR/snapshot_files.rs`): the folders under
//! `$QWEN_IMAGE_PROXY_SNAPSHOTS` when that is set (e.g. `/work/proxy-trained-v1`), else under this crate's
//! `snapshots/`.
//!
//! A folder that is missing gives an empty list: the crate still builds, and asking for that snapshot is an error
//! at run time that says so (see `snapshots/README.md`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The snapshot folders, and the constant each one's file list becomes.
const SNAPSHOTS: [(&str, &str); 2] =
    [("qwen-image-edit-proxy", "EDIT_FILES"), ("qwen-image-edit-plus-proxy", "PLUS_FILES")];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-env-changed=QWEN_IMAGE_PROXY_SNAPSHOTS");
    let base = match std::env::var_os("QWEN_IMAGE_PROXY_SNAPSHOTS") {
        Some(dir) => PathBuf::from(dir),
        None => manifest.join("snapshots"),
    };
    let mut code = String::new();
    for (folder, constant) in SNAPSHOTS {
        let root = base.join(folder);
        println!("cargo:rerun-if-changed={}", root.display());
        let mut files = Vec::new();
        if root.is_dir() {
            collect(&root, &root, &mut files);
        }
        files.sort();
        writeln!(code, "/// The files of `{}` (relative path, bytes).", root.display()).unwrap();
        writeln!(code, "pub(crate) const {constant}: &[(&str, &[u8])] = &[").unwrap();
        for (rel, abs) in &files {
            println!("cargo:rerun-if-changed={}", abs.display());
            writeln!(code, "    ({rel:?}, include_bytes!({:?})),", abs.display().to_string()).unwrap();
        }
        writeln!(code, "];").unwrap();
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("snapshot_files.rs"), code).expect("OUT_DIR is writable");
}

/// Every file under `dir` as (path relative to `root` with `/` separators, absolute path).
fn collect(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            collect(root, &path, files);
        } else {
            let rel = path.strip_prefix(root).expect("under the root");
            let rel = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            files.push((rel, path));
        }
    }
}
