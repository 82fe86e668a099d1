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
//! - [`serve`](mod@serve): `qwen-edit serve`, the OpenAI-compatible HTTP server (crate `qwen-image-serve`).
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
pub mod serve;

use std::io::Write;

use qwen_image_pipeline::{demo, MemoryProbe};

use qwen_image::ops::QwenBackend;

use crate::args::{Args, Command, DemoSizeArg, Device};

/// Errors of the CLI: the library's typed errors, or a message.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the command described by `args`, writing human-readable output to `out`.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), CliError> {
    if let Some(Command::Serve(serve_args)) = &args.command {
        return serve::run(serve_args);
    }
    check_demo_args(args)?;
    with_backend(args.device, EditRun { args, out })
}

/// Where a command runs: the device of backend `B`, and how its memory is read.
pub(crate) struct Target<B: QwenBackend> {
    /// The device.
    pub device: B::Device,
    /// Host memory, plus the GPU's in CUDA builds.
    pub probe: MemoryProbe,
}

/// A command that runs on any backend ([`with_backend`] picks it).
pub(crate) trait OnBackend {
    /// Runs on backend `B`.
    fn run<B: QwenBackend>(self, target: Target<B>) -> Result<(), CliError>;
}

/// The edits of `qwen-edit` (no subcommand).
struct EditRun<'a> {
    args: &'a Args,
    out: &'a mut dyn Write,
}

impl OnBackend for EditRun<'_> {
    fn run<B: QwenBackend>(self, target: Target<B>) -> Result<(), CliError> {
        run::run_on::<B>(self.args, &target.device, target.probe, self.out)
    }
}

/// Runs `command` on the backend of `device`.
pub(crate) fn with_backend(device: Device, command: impl OnBackend) -> Result<(), CliError> {
    match device {
        Device::Cpu => command
            .run::<qwen_image::CpuBackend>(Target { device: Default::default(), probe: MemoryProbe::host() }),
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
                command.run::<qwen_image::cuda::CudaBackend>(Target { device, probe })
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = command;
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
