//! What the CLI's integration tests share: a fresh working folder, and `qwen-edit` run on the built-in tiny
//! random-weight demo model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh, empty folder for one test (`kind` the test file, `name` the test).
pub fn workdir(kind: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen-edit-{kind}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `qwen-edit --demo --size tiny -q ARGS` in `dir`: whether it succeeded, its stdout and its stderr.
pub fn tiny_demo(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let o: Output = Command::new(env!("CARGO_BIN_EXE_qwen-edit"))
        .current_dir(dir)
        .args(["--demo", "--size", "tiny", "-q"])
        .args(args)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (o.status.success(), text(&o.stdout), text(&o.stderr))
}
