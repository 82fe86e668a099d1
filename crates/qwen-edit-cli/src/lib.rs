//! The `qwen-edit` command line tool as a library: [`run()`] takes parsed [`args::Args`] and does what the binary
//! does (the binary is `install a logger → parse → run → exit code`). Everything numeric lives in
//! `qwen-image-pipeline`; this crate only builds the jobs, calls the pipeline, writes images and reports, and
//! formats tables.
//!
//! - [`args`]: the command line.
//! - [`demo`](mod@demo): `--demo` with the trained proxy model (a real edit and a before/after grid).
//! - [`eval`]: `qwen-edit eval`, schedules on the proxy's held-out set (the logic is in `qwen-image-eval`).
//! - [`jobs`]: the edits to run, from the command line or a batch file, checked before any weights are loaded.
//! - [`run`](mod@run): the run itself, as a list of stages (check, load, warm up, run each job, report).
//! - [`report`]: the typed [`RunReport`](report::RunReport) written as JSON.
//! - [`output`]: output file names, the comparison grid, and the text tables.
//! - [`progress`]: progress bars.
//! - [`serve`](mod@serve): `qwen-edit serve`, the OpenAI-compatible HTTP server (crate `qwen-image-serve`).
//!
//! How to use: `qwen-edit --demo`, `qwen-edit eval --limit 24`, `qwen-edit -i input.png -p "Make it purple"`, `qwen-edit --help`; on a GPU,
//! `qwen-edit --demo --size full --device cuda --compare --repeat 10` runs the full-size architecture with random
//! weights and reports the time per stage and the memory after each edit. Library warnings (e.g. a CUDA fast path
//! switched off) go through the `log` crate; the binary shows them on stderr (`RUST_LOG` sets the level, default
//! `warn`).

pub mod args;
pub mod demo;
pub mod eval;
pub mod jobs;
mod memory_check;
pub mod output;
pub mod progress;
pub mod report;
pub mod run;
pub mod serve;

use std::io::Write;

use qwen_image::ops::QwenBackend;
use qwen_image_pipeline::MemoryProbe;

use crate::args::{Args, Command, DemoSizeArg, Device, Dtype};

/// Errors of the CLI: the library's typed errors, or a message.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the command described by `args`, writing human-readable output to `out`.
pub fn run(args: &Args, out: &mut dyn Write) -> Result<(), CliError> {
    match &args.command {
        Some(Command::Eval(eval)) => return on_device(eval.device, eval::EvalTask { args: eval, out }),
        Some(Command::Serve(serve_args)) => return serve::run(serve_args),
        None => {}
    }
    check_demo_args(args)?;
    on_device(args.device, EditTask { args, out })
}

/// Work that runs on the backend of a `--device`.
pub(crate) trait BackendTask {
    /// Runs on backend `B`, device `device`, reading memory with `probe`.
    fn run<B: QwenBackend>(self, device: &B::Device, probe: MemoryProbe) -> Result<(), CliError>;
}

/// The edits of the flat command line (and `--demo`).
struct EditTask<'a> {
    args: &'a Args,
    out: &'a mut dyn Write,
}

impl BackendTask for EditTask<'_> {
    fn run<B: QwenBackend>(self, device: &B::Device, probe: MemoryProbe) -> Result<(), CliError> {
        if self.args.demo && demo_choice(self.args) == DemoSizeArg::Proxy {
            let model = demo::demo_model(self.args);
            if let qwen_image_proxy::DemoModel::Proxy(_) = model {
                return demo::run_proxy::<B>(self.args, model, device, self.out);
            }
            if demo::demo_variant(self.args) != model.variant() {
                // The tiny random model is an Edit (one-image) model: nothing to fall back to.
                return Err("the Edit-Plus demo (two or more images, or --variant edit-plus) runs the Edit-Plus \
                            proxy, which is not bundled in this build (crates/qwen-image-proxy/snapshots/README.md); \
                            give one image, or use --size tiny"
                    .into());
            }
            writeln!(
                self.out,
                "Note: the trained proxy model is not bundled in this build (crates/qwen-image-proxy/snapshots/README.md); \
                 running the random-weight tiny model instead."
            )?;
        }
        run::run_on::<B>(self.args, device, probe, self.out)
    }
}

/// Runs `task` on the backend of `device`.
pub(crate) fn on_device(device: Device, task: impl BackendTask) -> Result<(), CliError> {
    match device {
        Device::Cpu => task.run::<qwen_image::CpuBackend>(&Default::default(), MemoryProbe::host()),
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
                    let device = qwen_image::cuda::device_memory_info(0);
                    qwen_image_pipeline::MemoryReading {
                        device_used_bytes: device.map(|(free, total)| total - free),
                        device_total_bytes: device.map(|(_, total)| total),
                        pool_in_use_bytes: pool.map(|p| p.0),
                        pool_reserved_bytes: pool.map(|p| p.1),
                        ..qwen_image_pipeline::MemoryReading::host()
                    }
                });
                task.run::<qwen_image::cuda::CudaBackend>(&device, probe)
            }
            #[cfg(not(feature = "cuda"))]
            {
                drop(task);
                Err("--device cuda needs a build with CUDA support: \
                     cargo build --release -p qwen-edit-cli --features cuda"
                    .into())
            }
        }
    }
}

/// The weights dtype: `--dtype`, else f32 on the CPU and bf16 on CUDA.
pub(crate) fn dtype_for(dtype: Option<Dtype>, device: Device) -> burn::tensor::DType {
    match (dtype, device) {
        (Some(Dtype::F32), _) | (None, Device::Cpu) => burn::tensor::DType::F32,
        (Some(Dtype::Bf16), _) | (None, Device::Cuda) => burn::tensor::DType::BF16,
    }
}

/// `--lora` files as the pipeline's LoRA options (merged into the weights, `--lora-scale` each).
pub(crate) fn lora_options(paths: &[std::path::PathBuf], scale: f32) -> Vec<qwen_image_pipeline::LoraOption> {
    paths
        .iter()
        .map(|p| qwen_image_pipeline::LoraOption { path: p.clone(), multiplier: scale, merge: true })
        .collect()
}

/// `--modulation` as the model's [`ModulationMode`](qwen_image::dit::ModulationMode).
pub(crate) fn modulation_mode(arg: args::ModulationArg) -> qwen_image::dit::ModulationMode {
    match arg {
        args::ModulationArg::Table => qwen_image::dit::ModulationMode::Table,
        args::ModulationArg::Resident => qwen_image::dit::ModulationMode::Resident,
    }
}

/// The demo model asked for (default: the trained proxy).
pub(crate) fn demo_choice(args: &Args) -> DemoSizeArg {
    args.size.unwrap_or(DemoSizeArg::Proxy)
}

/// The random-weight demo model asked for (`--size tiny|full`; the trained proxy runs in [`demo`](mod@demo)).
pub(crate) fn demo_size(args: &Args) -> qwen_image_pipeline::demo::DemoSize {
    match args.size {
        Some(DemoSizeArg::Full) => qwen_image_pipeline::demo::DemoSize::Full,
        Some(DemoSizeArg::Tiny | DemoSizeArg::Proxy) | None => qwen_image_pipeline::demo::DemoSize::Tiny,
    }
}

/// `--size`, `--allow-full-on-cpu`, `--repeat` and `--keep-going`, checked before anything is loaded.
fn check_demo_args(args: &Args) -> Result<(), CliError> {
    if args.size.is_some() && !args.demo {
        return Err("--size chooses the demo model and needs --demo".into());
    }
    if args.variant.is_some() && !args.demo {
        return Err(
            "--variant chooses the demo's pipeline and needs --demo (a model's own files say its variant)"
                .into(),
        );
    }
    if args.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    if args.keep_going && args.batch.is_none() {
        return Err("--keep-going applies to --batch".into());
    }
    if args.demo
        && demo_choice(args) == DemoSizeArg::Full
        && args.device == Device::Cpu
        && !args.allow_full_on_cpu
    {
        return Err(concat!(
            "--demo --size full builds the 20 B-parameter model (~58 GB of bf16 weights, ~80 GB in f32) and is meant ",
            "for a GPU: use --device cuda (a CUDA build). To run it on the CPU anyway (hours per edit), add ",
            "--allow-full-on-cpu"
        )
        .into());
    }
    Ok(())
}
