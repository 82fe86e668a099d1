//! `qwen-edit`: edit images with Qwen-Image-Edit, with token pruning. See `qwen-edit --help`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = qwen_edit_cli::args::Args::parse();
    match qwen_edit_cli::run(&args, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
