//! `qwen-edit`: edit images with Qwen-Image-Edit, with token pruning. See `qwen-edit --help`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = qwen_edit_cli::args::Args::parse();
    if let Some(qwen_edit_cli::args::Command::Serve(serve)) = &args.command {
        qwen_edit_cli::serve::init_logging(serve.log_json); // tracing; `log` records are forwarded to it
    } else {
        // The libraries report warnings (e.g. a CUDA fast path switched off after an error) through `log`.
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    }
    match qwen_edit_cli::run(&args, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
