//! `qwen-edit serve`: the OpenAI-compatible edit server ([`qwen_image_serve`]) on the demo model or a snapshot.
//! `--demo` serves the model of `qwen-edit --demo` with its settings ([`DemoModel`], crate `qwen-image-proxy`):
//! the trained Edit proxy when this build bundles it, else the tiny random-weight model.
//!
//! It prints `listening on http://ADDR` on stdout once the port is bound (`--port 0` picks a free one), loads the
//! model on the service's worker thread (`/ready` turns 200 when it is loaded), serves until SIGTERM or Ctrl-C,
//! then shuts down gracefully (see [`qwen_image_serve::http::serve`]). Logs go to stderr through `tracing`
//! (`RUST_LOG`, default `info`; `--log-json` for one JSON object per line). See docs/serving.md.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qwen_image::ops::QwenBackend;
use qwen_image_pipeline::{
    ImageAreas, LoadOptions, MemoryProbe, QwenImageEditPipeline, SchedulerChoice, Snapshot, Variant,
};
use qwen_image_proxy::DemoModel;
use qwen_image_pruning::ScheduleSpec;
use qwen_image_serve::http::{self, Defaults, HttpConfig, Limits};
use qwen_image_serve::{EditService, ServiceConfig};

use crate::args::{Device, Dtype, ModulationArg, QuantizeArgs};
use crate::CliError;

/// Serve edits over HTTP: OpenAI's `POST /v1/images/edits` (multipart or JSON), `GET /v1/models`, `/health`,
/// `/ready`, `/metrics` (Prometheus), server-sent progress with `stream=true`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Serve the built-in demo model of `qwen-edit --demo` with its settings (no download; CPU): the trained Edit
    /// proxy when this build bundles it, else the tiny random-weight model.
    #[arg(long)]
    pub demo: bool,
    /// Snapshot folder, or a repo id found in the Hugging Face cache.
    #[arg(long, default_value = "Qwen/Qwen-Image-Edit")]
    pub model: String,
    /// The model id that `/v1/models` lists and requests may name [default: `qwen-image-edit-demo` with
    /// --demo, otherwise the snapshot folder's name].
    #[arg(long)]
    pub model_name: Option<String>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Weights dtype (default: f32 on the CPU, bf16 on CUDA).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// LoRA files merged into the DiT (a Lightning LoRA switches to the Lightning scheduler).
    #[arg(long)]
    pub lora: Vec<PathBuf>,
    /// Strength of the LoRAs.
    #[arg(long, default_value_t = 1.0)]
    pub lora_scale: f32,
    /// Where the DiT's modulation weights live.
    #[arg(long, value_enum, default_value = "table")]
    pub modulation: ModulationArg,
    /// Quantization of the DiT's weights.
    #[command(flatten)]
    pub quantize: QuantizeArgs,
    /// Jobs that may wait in the queue; more get 429 with Retry-After.
    #[arg(long, default_value_t = 32)]
    pub queue_capacity: usize,
    /// Budget of the per-image reuse cache (VAE latents, vision embeddings) in MiB; 0 turns reuse off.
    #[arg(long, default_value_t = 1024)]
    pub reuse_cache_mib: usize,
    /// Largest request body in MiB.
    #[arg(long, default_value_t = 32)]
    pub max_body_mib: usize,
    /// Largest input image in pixels.
    #[arg(long, default_value_t = 4096 * 4096)]
    pub max_image_pixels: u64,
    /// Longest prompt in characters.
    #[arg(long, default_value_t = 2000)]
    pub max_prompt_chars: usize,
    /// Most input images per request.
    #[arg(long, default_value_t = 3)]
    pub max_images: usize,
    /// Most output images per request (`n`).
    #[arg(long, default_value_t = 4)]
    pub max_n: usize,
    /// Most denoising steps per request.
    #[arg(long, default_value_t = 100)]
    pub max_steps: usize,
    /// Default denoising steps [default: 4; with --demo, the demo model's].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Default pruning schedule.
    #[arg(long, default_value = "cat")]
    pub schedule: ScheduleSpec,
    /// Seconds from submission to image before a request is cancelled (504).
    #[arg(long, default_value_t = 600.0)]
    pub timeout_seconds: f64,
    /// On SIGTERM, seconds that queued and running jobs may go on before they are cancelled.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace_seconds: f64,
    /// Logs as one JSON object per line.
    #[arg(long)]
    pub log_json: bool,
    /// Hold the memory plan of a typical request (one image at the served area, the default schedule and steps)
    /// against this much free device memory instead of what the driver reports, before loading.
    #[arg(long, value_name = "BYTES", value_parser = |s: &str| qwen_image_pruning::parse_bytes(s).map_err(|e| e.to_string()))]
    pub device_memory: Option<u64>,
    /// Skip that check: load even when the plan says a typical request will not fit the device's free memory.
    #[arg(long)]
    pub no_memory_check: bool,
}

/// Installs the `tracing` subscriber of the server (stderr; `RUST_LOG`, default `info`); library `log` records
/// are forwarded to it.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs the server until SIGTERM or Ctrl-C.
pub fn run(args: &ServeArgs) -> Result<(), CliError> {
    crate::on_device(args.device, Serve(args))
}

/// [`run`] on a backend.
struct Serve<'a>(&'a ServeArgs);

impl crate::BackendTask for Serve<'_> {
    fn run<B: QwenBackend>(self, device: &B::Device, probe: MemoryProbe) -> Result<(), CliError> {
        serve_on::<B>(self.0, device.clone(), probe)
    }
}

/// [`run`] on backend `B`.
fn serve_on<B: QwenBackend>(args: &ServeArgs, device: B::Device, probe: MemoryProbe) -> Result<(), CliError> {
    let served = served_model(args)?;
    let model_name = args.model_name.clone().unwrap_or_else(|| default_model_name(args, &served.model));
    let config = http_config(args, model_name, &served)?;
    let Served { model, options, demo_dir, areas, steps } = served;
    if !args.no_memory_check {
        let available = args.device_memory.or_else(|| probe.read().device_free_bytes());
        let snapshot = Snapshot::locate(&model)?;
        crate::memory_check::check_served(&snapshot, &options, areas, steps, &args.schedule, available)?;
    }
    let loader_dir = demo_dir.as_ref().map(|d| d.0.clone());
    let load = move || {
        let loaded =
            QwenImageEditPipeline::<B>::load(&model, &options, &device, &mut qwen_image_pipeline::NoProgress);
        // The demo snapshot is read (weights copied or mapped): remove its files now, so none are left behind.
        if let Some(dir) = loader_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        let mut pipe = loaded?;
        pipe.set_memory_probe(probe);
        Ok(pipe)
    };
    let service_config =
        ServiceConfig { queue_capacity: args.queue_capacity, reuse_budget_bytes: args.reuse_cache_mib << 20 };
    let service = Arc::new(EditService::start(service_config, load));
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(serve_until_stopped(args, service, config));
    drop(demo_dir); // the demo snapshot, if the load did not remove it
    result
}

/// What the server loads and the settings its requests default to.
struct Served {
    /// The snapshot folder or repo id.
    model: String,
    options: LoadOptions,
    areas: ImageAreas,
    steps: usize,
    /// With `--demo`: the temporary folder of the unpacked demo snapshot (removed once it is loaded, or dropped).
    demo_dir: Option<RemovedOnDrop>,
}

/// A folder that is removed when this is dropped, so that no files are left behind on any path out.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `--model` with the options of the flags, or with `--demo` the demo model ([`DemoModel`], the one
/// `qwen-edit --demo` runs for one input image) unpacked to a temporary folder, with its load options, areas and steps.
fn served_model(args: &ServeArgs) -> Result<Served, CliError> {
    if !args.demo {
        let steps = args.steps.unwrap_or(Defaults::default().steps);
        let options = load_options(args)?;
        return Ok(Served {
            model: args.model.clone(),
            options,
            areas: ImageAreas::default(),
            steps,
            demo_dir: None,
        });
    }
    if !args.lora.is_empty() {
        return Err("--lora applies to --model snapshots, not to the demo model".into());
    }
    let demo = DemoModel::for_variant(Variant::Edit);
    let dir = RemovedOnDrop(std::env::temp_dir().join(format!("qwen-edit-serve-{}", std::process::id())));
    let root = demo.write_snapshot(&dir.0)?;
    tracing::info!(model = %demo.describe(), "serving the demo model");
    let dtype = crate::dtype_for(args.dtype, args.device);
    Ok(Served {
        model: root.to_string_lossy().into_owned(),
        options: args.quantize.apply(LoadOptions {
            modulation: crate::modulation_mode(args.modulation),
            ..demo.load_options(dtype)
        })?,
        areas: demo.areas(),
        steps: args.steps.unwrap_or(demo.steps()),
        demo_dir: Some(dir),
    })
}

/// Binds, announces the address, and serves until a signal (or a failed load, which is an error).
async fn serve_until_stopped(
    args: &ServeArgs,
    service: Arc<EditService>,
    config: HttpConfig,
) -> Result<(), CliError> {
    let listener = tokio::net::TcpListener::bind((args.host, args.port)).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    tracing::info!(%addr, model = config.model_name, "listening");
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
    let waiting = service.clone();
    let shutdown = async move {
        let loaded = tokio::task::spawn_blocking(move || waiting.wait_loaded());
        tokio::select! {
            () = http::shutdown_signal() => {}
            result = loaded => match result {
                Ok(Err(e)) => { let _ = failed_tx.send(e); }
                _ => http::shutdown_signal().await,
            },
        }
    };
    http::serve(listener, service, &config, shutdown).await?;
    match failed_rx.await {
        Ok(e) => Err(format!("the model failed to load: {e}").into()),
        Err(_) => Ok(()),
    }
}

fn default_model_name(args: &ServeArgs, model: &str) -> String {
    if args.demo {
        return "qwen-image-edit-demo".into();
    }
    let path = std::path::Path::new(model);
    path.file_name().map_or_else(|| model.to_owned(), |n| n.to_string_lossy().into_owned())
}

fn http_config(args: &ServeArgs, model_name: String, served: &Served) -> Result<HttpConfig, CliError> {
    let seconds = |name: &str, s: f64| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| -> CliError { format!("--{name} {s} is not a duration").into() })
    };
    Ok(HttpConfig {
        model_name,
        limits: Limits {
            max_body_bytes: args.max_body_mib << 20,
            max_image_pixels: args.max_image_pixels,
            max_prompt_chars: args.max_prompt_chars,
            max_images: args.max_images,
            max_n: args.max_n,
            max_steps: args.max_steps,
        },
        defaults: Defaults {
            steps: served.steps,
            schedule: args.schedule.clone(),
            areas: served.areas,
            ..Defaults::default()
        },
        request_timeout: seconds("timeout-seconds", args.timeout_seconds)?,
        shutdown_grace: seconds("shutdown-grace-seconds", args.shutdown_grace_seconds)?,
    })
}

fn load_options(args: &ServeArgs) -> Result<LoadOptions, CliError> {
    args.quantize.apply(LoadOptions {
        dtype: crate::dtype_for(args.dtype, args.device),
        loras: crate::lora_options(&args.lora, args.lora_scale),
        scheduler: if args.lora.is_empty() { SchedulerChoice::Snapshot } else { SchedulerChoice::Lightning },
        modulation: crate::modulation_mode(args.modulation),
        ..LoadOptions::default()
    })
}
