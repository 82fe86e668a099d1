//! The `qwen-edit` command line tool as a library: [`run()`] takes parsed [`args::Args`] and does what the binary
//! does (the binary is `install a logger → parse → run → exit code`). Everything numeric lives in
//! `qwen-image-pipeline`; this crate only builds the jobs, calls the pipeline, writes images and reports, and
//! formats tables.
//!
//! - [`args`]: the command line.
//! - [`jobs`]: the edits to run, from the command line or a batch file, checked before any weights are loaded.
//! - [`run`](mod@run): the run itself, as a list of stages (check, load, warm up, run each job, report).
//! - [`report`]: the typed [`RunReport`](report::RunReport) written as JSON.
//! - [`output`]: output file names, the comparison grid, and the text tables.
//! - [`progress`]: progress bars.
//!
//! How to use: `qwen-edit --demo`, `qwen-edit -i input.png -p "Make it purple"`, `qwen-edit --help`; on a GPU,
//! `qwen-edit --demo --size full --device cuda --compare --repeat 10` runs the full-size architecture with random
//! weights and reports the time per stage and the memory after each edit. Library warnings (e.g. a CUDA fast path
//! switched off) go through the `log` crate; the binary shows them on stderr (`RUST_LOG` sets the level, default
//! `warn`).

pub mod args;
pub mod jobs;
pub mod output;
pub mod progress;
pub mod report;
pub mod run;

use std::io::Write;

use qwen_image_pipeline::{demo, MemoryProbe};

use crate::args::{Args, DemoSizeArg, Device};

/// Errors of the CLI: the library's typed errors, or a message.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the command described by `args`, writing human-readable output to `out`.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), CliError> {
    check_demo_args(args)?;
    match args.device {
        Device::Cpu => {
            run::run_on::<qwen_image::CpuBackend>(args, &Default::default(), MemoryProbe::host(), out)
        }
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            {
                // burn's own CUDA kernels (VAE, text encoder, reshapes…) are compiled and autotuned on first use:
                // keep them across runs, before the first CUDA tensor exists.
                if let Err(e) = qwen_image::cuda::configure_runtime_caches(None) {
                    log::warn!("no kernel cache ({e}); burn's CUDA kernels are compiled again in every run");
                }
                let device = qwen_image::cuda::CudaDevice::new(0);
                let probe_device = device.clone();
                let probe = MemoryProbe::new(move || {
                    let pool = qwen_image::cuda::pool_usage(&probe_device);
                    qwen_image_pipeline::MemoryReading {
                        device_used_bytes: qwen_image::cuda::device_memory_used(0),
                        pool_in_use_bytes: pool.map(|p| p.0),
                        pool_reserved_bytes: pool.map(|p| p.1),
                        ..qwen_image_pipeline::MemoryReading::host()
                    }
                });
                run::run_on::<qwen_image::cuda::CudaBackend>(args, &device, probe, out)
            }
            #[cfg(not(feature = "cuda"))]
            {
                Err("--device cuda needs a build with CUDA support: \
                     cargo build --release -p qwen-edit-cli --features cuda"
                    .into())
            }
        }
    }
}

/// The demo size asked for.
pub(crate) fn demo_size(args: &Args) -> demo::DemoSize {
    match args.size {
        Some(DemoSizeArg::Full) => demo::DemoSize::Full,
        Some(DemoSizeArg::Tiny) | None => demo::DemoSize::Tiny,
    }
}

/// `--size`, `--allow-full-on-cpu`, `--repeat` and `--keep-going`, checked before anything is loaded.
fn check_demo_args(args: &Args) -> Result<(), CliError> {
    if args.size.is_some() && !args.demo {
        return Err("--size chooses the demo model and needs --demo".into());
    }
    if args.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    if args.keep_going && args.batch.is_none() {
        return Err("--keep-going applies to --batch".into());
    }
    if demo_size(args) == demo::DemoSize::Full && args.device == Device::Cpu && !args.allow_full_on_cpu {
        return Err(concat!(
            "--demo --size full builds the 20 B-parameter model (~58 GB of bf16 weights, ~80 GB in f32) and is meant ",
            "for a GPU: use --device cuda (a CUDA build). To run it on the CPU anyway (hours per edit), add ",
            "--allow-full-on-cpu"
        )
        .into());
    }
    Ok(())
}
