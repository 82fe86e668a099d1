//! Qwen-Image-Edit in Rust with pluggable token pruning: the workspace's facade package.
//!
//! It hosts the workspace-level examples, parity tests and benches, which use the crates directly:
//! `qwen-image` (the networks), `qwen-image-pruning` (schedules, plans, the condition-token cache) and
//! `qwen-image-pipeline` (the denoising loop and the edit pipeline). Its own code is test support:
//!
//! - [`reference`](mod@reference): run a network or a denoising loop on inputs dumped from diffusers, for the
//!   parity tests and the reference examples;
//! - [`exit_code`]: the examples' error handling.

pub mod reference;

/// Exit status of an example's `main`: success, or the error printed to stderr and a failure status.
pub fn exit_code(result: Result<(), Box<dyn std::error::Error>>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
