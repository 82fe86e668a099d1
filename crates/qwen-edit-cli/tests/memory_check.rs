//! The memory check before loading (`--device-memory`, `--no-memory-check`) on the built-in tiny random-weight demo
//! model: the dry run's verdict, an edit refused before anything is loaded or written, the same edit with the check
//! skipped, and a server that stops before listening.

mod support;

use std::process::Command;

use support::{tiny_demo, workdir};

#[test]
fn the_dry_run_says_whether_the_edit_fits_the_given_memory() {
    let dir = workdir("memory", "dry-run");
    let (ok, out, err) = tiny_demo(&dir, &["--dry-run", "--device-memory", "24GB"]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("Memory: the first edit's memory plan peaks at") && out.contains("it fits"),
        "{out}"
    );
    // The tiny model's plan is dominated by the 3 GiB runtime overhead: 2 GiB is too little, and no smaller mode
    // helps.
    let (ok, out, err) = tiny_demo(&dir, &["--dry-run", "--device-memory", "2GiB"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("Memory: the first edit needs about") && out.contains("2.00 GiB are free"), "{out}");
    assert!(out.contains("the smaller modes would not fit either: --quantize fp8 (about"), "{out}");
    assert!(!dir.join("outputs_pruning").exists());
}

#[test]
fn an_edit_that_cannot_fit_is_refused_before_loading_unless_forced() {
    let dir = workdir("memory", "refused");
    let (ok, out, err) = tiny_demo(&dir, &["--device-memory", "2GiB"]);
    assert!(!ok, "ran: {out}");
    assert!(err.contains("needs about") && err.contains("--no-memory-check runs it anyway"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.contains("Loaded") && !dir.join("outputs_pruning").exists(), "{out}");
    // Skipped: the edit runs.
    let (ok, out, err) = tiny_demo(&dir, &["--device-memory", "2GiB", "--no-memory-check"]);
    assert!(ok, "{out}\n{err}");
    assert!(!out.contains("the first edit needs about"), "{out}");
    assert!(dir.join("outputs_pruning").exists());
    // A bad byte count is a clear error.
    let (ok, _, err) = tiny_demo(&dir, &["--device-memory", "lots"]);
    assert!(!ok && err.contains("is not a byte count"), "{err}");
}

#[test]
fn a_server_whose_typical_request_cannot_fit_stops_before_loading() {
    let dir = workdir("memory", "serve");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qwen-edit"))
        .current_dir(&dir)
        .args(["serve", "--demo", "--port", "0", "--device-memory", "2GiB"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It must exit on its own; a server that started would listen until killed.
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the server started despite the memory check");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success(), "{out}\n{err}");
    assert!(
        err.contains("a typical request (one ") && err.contains("image, `cat`, 4 steps) needs about"),
        "{err}"
    );
    assert!(err.contains("--no-memory-check serves anyway") && !out.contains("listening"), "{out}\n{err}");
}
