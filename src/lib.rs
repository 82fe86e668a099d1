//! Qwen-Image-Edit in Rust with pluggable token pruning.
//!
//! This facade re-exports the workspace crates and holds the reference-check helpers used by the `dit_forward` and
//! `denoise` examples and by the parity tests:
//!
//! - [`model`] (`qwen-image`): the networks, generic over the burn backend.
//! - [`pruning`] (`qwen-image-pruning`): schedules, plans and the condition-token cache.
//! - [`pipeline`] (`qwen-image-pipeline`): the denoising loop and the edit pipeline.

pub use qwen_image as model;
pub use qwen_image_pipeline as pipeline;
pub use qwen_image_pruning as pruning;

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
