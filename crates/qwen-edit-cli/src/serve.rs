//! `qwen-edit serve`: the OpenAI-compatible edit server ([`qwen_image_serve`]) on the demo model or a snapshot.
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
    demo, ImageAreas, LoadOptions, MemoryProbe, QwenImageEditPipeline, SchedulerChoice,
};
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
    /// Serve the built-in demo model (no download; CPU).
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
    /// Default denoising steps.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
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
    let (model, areas, demo_dir) = if args.demo {
        let dir = std::env::temp_dir().join(format!("qwen-edit-serve-{}", std::process::id()));
        let root = demo::write_demo_snapshot(&dir)?;
        (root.to_string_lossy().into_owned(), demo::demo_areas(), Some(dir))
    } else {
        (args.model.clone(), ImageAreas::default(), None)
    };
    let model_name = args.model_name.clone().unwrap_or_else(|| default_model_name(args, &model));
    let options = load_options(args)?;
    let loader_dir = demo_dir.clone();
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
    let config = http_config(args, model_name, areas)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(serve_until_stopped(args, service, config));
    if let Some(dir) = demo_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
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

fn http_config(args: &ServeArgs, model_name: String, areas: ImageAreas) -> Result<HttpConfig, CliError> {
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
            steps: args.steps,
            schedule: args.schedule.clone(),
            areas,
            ..Defaults::default()
        },
        request_timeout: seconds("timeout-seconds", args.timeout_seconds)?,
        shutdown_grace: seconds("shutdown-grace-seconds", args.shutdown_grace_seconds)?,
    })
}

fn load_options(args: &ServeArgs) -> Result<LoadOptions, CliError> {
    Ok(LoadOptions {
        dtype: crate::dtype_for(args.dtype, args.device),
        loras: crate::lora_options(&args.lora, args.lora_scale),
        scheduler: if args.lora.is_empty() { SchedulerChoice::Snapshot } else { SchedulerChoice::Lightning },
        modulation: crate::modulation_mode(args.modulation),
        fp8: args.quantize.fp8_options()?,
        ..LoadOptions::default()
    })
}
