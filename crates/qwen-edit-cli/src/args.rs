//! Command-line arguments (clap).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use qwen_image_pruning::ScheduleSpec;

/// Where the networks run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The CPU (burn's Flex backend).
    Cpu,
    /// An NVIDIA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// Weights and activations dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    /// bfloat16 (the checkpoints' dtype; the default on CUDA).
    Bf16,
    /// float32 (the default on the CPU).
    F32,
}

/// Which scheduler config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SchedulerArg {
    /// Lightning with `--lora`, otherwise the snapshot's.
    Auto,
    /// The snapshot's `scheduler/scheduler_config.json`.
    Snapshot,
    /// Qwen-Image-Lightning (static shift 3, no terminal stretch).
    Lightning,
}

/// Which demo model `--demo` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DemoSizeArg {
    /// The trained proxy model (crate `qwen-image-proxy`: the Qwen-Image-Edit architecture at 6 blocks, trained on
    /// generated scenes of coloured shapes): a real edit of a held-out scene, on the CPU in seconds.
    Proxy,
    /// The tiny model with bundled random weights (CPU, seconds).
    Tiny,
    /// The published architecture (20 B DiT, Qwen2.5-VL-7B, VAE) with random bf16 weights created on the GPU,
    /// at 1024² on a square crop of the sample image: real sizes, real timings, noise images.
    Full,
}

/// Which pipeline variant `--demo` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VariantArg {
    /// Qwen-Image-Edit (`QwenImageEditPipeline`): one input image.
    Edit,
    /// Qwen-Image-Edit-2509 / 2511 (`QwenImageEditPlusPipeline`): 1 to 3 input images.
    EditPlus,
}

/// Rotary positions of the text encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TextPositions {
    /// M-RoPE positions from the image grids (as Qwen2.5-VL was trained).
    Multimodal,
    /// 0, 1, 2, … (what diffusers computes with transformers 5).
    Sequential,
}

/// Where the DiT's modulation weights live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModulationArg {
    /// On the host; their outputs for the timesteps seen so far in a table on the GPU (12.7 GiB less GPU memory
    /// at full size, same images).
    Table,
    /// On the GPU with every other weight.
    Resident,
}

/// Quantization of the DiT's and the text encoder's weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    /// Weights in the model's dtype (--dtype).
    #[default]
    None,
    /// The DiT's and the text encoder's linear layers as e4m3 weights with one scale per output channel, quantized at
    /// load time (LoRAs merged first), and per-token dynamic e4m3 activations: about half the weight memory of both
    /// (docs/fp8.md).
    Fp8,
    /// As fp8, the DiT only: the text encoder stays in the model's dtype (6.3 GiB more at full size).
    Fp8Dit,
}

/// Which stages of an edit allocate device memory exactly (`--exact-allocation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ExactAllocationArg {
    /// Every stage in the allocator's pooled pages.
    #[default]
    None,
    /// The VAE's stages (encode the condition images, decode the result).
    Vae,
    /// Every stage.
    All,
}

impl From<ExactAllocationArg> for qwen_image_pipeline::ExactAllocation {
    fn from(arg: ExactAllocationArg) -> Self {
        match arg {
            ExactAllocationArg::None => Self::None,
            ExactAllocationArg::Vae => Self::Vae,
            ExactAllocationArg::All => Self::All,
        }
    }
}

/// `--quantize` and its keep list (the edit command, `serve` and `eval` take the same options).
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct QuantizeArgs {
    /// Quantize the linear weights at load time.
    #[arg(long, value_enum, default_value = "none")]
    pub quantize: QuantizeArg,
    /// With --quantize fp8 or fp8-dit (or --low-memory): the DiT layers kept in the model's dtype, comma-separated
    /// checkpoint names or whole dot-separated parts of them (`default`: img_in, txt_in,
    /// time_text_embed.timestep_embedder, norm_out.linear, proj_out, img_mod, txt_mod, img_mlp.net.2;
    /// `default,transformer_blocks.0` adds block 0; `none` quantizes every layer) [default: default; with
    /// --low-memory: default without img_mlp.net.2].
    #[arg(long, value_name = "LAYERS")]
    pub quantize_keep: Option<String>,
    /// With --quantize fp8 or fp8-dit (or --low-memory): the DiT's joint attention in 8 bits too (Q·Kᵀ on int8 with
    /// the keys' mean subtracted, P·V in e4m3; on Hopper our FP8 flash-attention kernel, elsewhere a host emulation;
    /// docs/fp8.md). Slower than the bf16 kernel on an H200 (2.32 against 2.02 ms per joint attention).
    #[arg(long)]
    pub fp8_attention: bool,
    /// With --quantize fp8 or fp8-dit (or --low-memory): the pruning cache's keys and values in 8 bits (e4m3 with
    /// one scale per token, restored to bf16 where a block reuses them): about half the cache (`cat` at 1024²: 1.41
    /// instead of 2.81 GiB), so --cache-budget holds about twice the blocks (docs/fp8.md).
    #[arg(long)]
    pub fp8_cache: bool,
    /// The smallest footprint (aimed at 24 GB cards): FP8 DiT (the keep list above, without img_mlp.net.2) with the
    /// modulation table, the text encoder's linear layers in FP8 with its decoder layers streamed from host memory
    /// for each prompt, a 2 GiB default --cache-budget, exact allocations in every stage (--exact-allocation all),
    /// the pruning cache dropped before the decode (--drop-cache) and VAE tiling when the memory plan says the decode
    /// would not fit (docs/memory.md). Not with --modulation resident.
    #[arg(long)]
    pub low_memory: bool,
    /// Give the device memory the allocator holds but no tensor uses back to the driver after every stage of an
    /// edit: less held between stages, not a lower peak (that is inside the denoise stage), 20–60 ms per VAE stage
    /// on an H100 (implied by --low-memory; docs/memory.md).
    #[arg(long)]
    pub release_memory: bool,
    /// Which stages give each tensor a device allocation of its own size instead of a slice of the allocator's
    /// shared pages (a page is a sixteenth to a quarter of the card's memory), each stage's allocations given back
    /// after it: bounds what the stage reserves beyond what it uses (docs/memory.md).
    #[arg(long, value_enum, default_value = "none")]
    pub exact_allocation: ExactAllocationArg,
    /// Drop the pruning cache when the denoising loop ends instead of keeping it for a next edit's keep_cache: the
    /// VAE decode then runs without it (2–3 GB less at full size with `cat`; implied by --low-memory).
    #[arg(long)]
    pub drop_cache: bool,
}

impl QuantizeArgs {
    /// The FP8 options these arguments ask for (`None` without `--quantize fp8`); the keep list's syntax is checked
    /// here, its names against the model when it is loaded (or dry-run).
    pub fn fp8_options(&self) -> Result<Option<qwen_image::quant::Fp8Options>, crate::CliError> {
        let options = self.fp8_layers()?;
        match options {
            Some(options) => Ok(Some(qwen_image::quant::Fp8Options {
                attention: self.fp8_attention,
                cache: self.fp8_cache,
                ..options
            })),
            None if self.fp8_attention => {
                Err("--fp8-attention applies to --quantize fp8, --quantize fp8-dit or --low-memory".into())
            }
            None if self.fp8_cache => {
                Err("--fp8-cache applies to --quantize fp8, --quantize fp8-dit or --low-memory".into())
            }
            None => Ok(None),
        }
    }

    /// The FP8 layer options (`--quantize` and `--quantize-keep`).
    fn fp8_layers(&self) -> Result<Option<qwen_image::quant::Fp8Options>, crate::CliError> {
        use qwen_image::quant::Fp8Options;
        let quantized = self.quantize != QuantizeArg::None || self.low_memory;
        match &self.quantize_keep {
            Some(_) if !quantized => {
                Err("--quantize-keep applies to --quantize fp8, --quantize fp8-dit or --low-memory".into())
            }
            Some(keep) => Ok(Some(Fp8Options::parse_keep(keep)?)),
            None if self.low_memory => Ok(Some(Fp8Options::low_memory())),
            None if quantized => Ok(Some(Fp8Options::default())),
            None => Ok(None),
        }
    }

    /// `options` with the FP8 options and the memory mode these arguments ask for: the one place every command
    /// (edit, demo, eval, serve) applies them.
    pub fn apply(
        &self,
        options: qwen_image_pipeline::LoadOptions,
    ) -> Result<qwen_image_pipeline::LoadOptions, crate::CliError> {
        Ok(qwen_image_pipeline::LoadOptions {
            fp8: self.fp8_options()?,
            fp8_text_encoder: self.quantize == QuantizeArg::Fp8,
            memory: self.memory_mode(),
            release_memory: self.release_memory,
            exact_allocation: self.exact_allocation.into(),
            drop_cache_after_denoise: self.drop_cache,
            ..options
        })
    }

    /// The memory mode `--low-memory` asks for.
    pub fn memory_mode(&self) -> qwen_image_pipeline::MemoryMode {
        if self.low_memory {
            qwen_image_pipeline::MemoryMode::Low
        } else {
            qwen_image_pipeline::MemoryMode::Resident
        }
    }
}

/// Edit images with Qwen-Image-Edit (v1, 2509, 2511) and token pruning.
///
/// Examples:
///   qwen-edit --demo                                       (the built-in trained proxy edits a scene, no download)
///   qwen-edit --demo -i scene.png -p "Make the red circle blue"
///   qwen-edit eval --limit 24 --schedules none,cat,reuse:2,3,4   (schedules on the proxy's held-out set)
///   qwen-edit --demo --size full --device cuda --compare   (full-size random model on a GPU: timings, memory)
///   qwen-edit -i input.png -p "Make it purple"             (Qwen/Qwen-Image-Edit from the Hugging Face cache)
///   qwen-edit -i in.png -p "Add a hat" --lora Qwen-Image-Edit-Lightning-4steps-V1.0-bf16.safetensors --compare
///   qwen-edit -i in.png -p "Add a hat" --device cuda --quantize fp8 --dry-run   (what FP8 quantizes, bytes saved)
#[derive(Clone, Debug, Parser)]
#[command(name = "qwen-edit", version, verbatim_doc_comment, args_conflicts_with_subcommands = true)]
pub struct Args {
    /// A subcommand instead of an edit.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Input image (PNG or JPEG); repeat for Edit-Plus (2509/2511) with up to 3 images [default: input.png; with
    /// --demo: the held-out scene; with --demo --size tiny|full: the bundled sample image].
    #[arg(short = 'i', long = "input")]
    pub input: Vec<PathBuf>,
    /// The edit instruction [default: Make it purple; with --demo: the scene's instruction].
    #[arg(short = 'p', long = "prompt")]
    pub prompt: Option<String>,
    /// Output folder.
    #[arg(short = 'o', long = "output_dir", alias = "output-dir", default_value = "outputs_pruning")]
    pub output_dir: PathBuf,
    /// Denoising steps.
    #[arg(short = 's', long = "steps", default_value_t = 4)]
    pub steps: usize,
    /// True-CFG scale (CFG runs above 1; the negative prompt defaults to " " then).
    #[arg(short = 'c', long = "cfg", default_value_t = 1.0)]
    pub cfg: f32,
    /// Disable pruning (the baseline, for comparison).
    #[arg(long = "no-pruning")]
    pub no_pruning: bool,
    /// Snapshot folder, or a repo id found in the Hugging Face cache.
    #[arg(long, default_value = "Qwen/Qwen-Image-Edit")]
    pub model: String,
    /// A LoRA file for the DiT (e.g. a Qwen-Image-Lightning LoRA); repeatable.
    #[arg(long)]
    pub lora: Vec<PathBuf>,
    /// Strength of the LoRAs.
    #[arg(long, default_value_t = 1.0)]
    pub lora_scale: f32,
    /// Scheduler config.
    #[arg(long, value_enum, default_value = "auto")]
    pub scheduler: SchedulerArg,
    /// Pruning schedule: none | cat | reuse:S1,S2,… | `region[:T,M,R]` | mask:FILE | `adaptive[:B]`, then
    /// `[/kv|/recompute]` `[@LO-HI]` (docs/schedules.md); steps count from 1, blocks LO-HI from 0.
    #[arg(long, default_value = "cat")]
    pub schedule: ScheduleSpec,
    /// A black/white mask of the region to edit (white = edit): the schedule becomes `mask:FILE` (unmasked target
    /// tokens reused from step 2 on) and the pixels outside the mask are exactly the source's.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Fit the pruning cache to this many bytes (e.g. 2GiB, 512MiB; both CFG branches together); the report's
    /// schedule name says which blocks were dropped.
    #[arg(long, value_parser = parse_budget)]
    pub cache_budget: Option<u64>,
    /// Guard reuse by drift: a reuse step whose velocity changed by more than this (relative L2) runs again with
    /// everything computed, and its step report says so [off by default; e.g. 0.5].
    #[arg(long)]
    pub guardrail: Option<f32>,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Negative prompt for true CFG.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// Weights dtype (default: f32 on the CPU, bf16 on CUDA).
    #[arg(long, value_enum)]
    pub dtype: Option<Dtype>,
    /// Output width (default: from the last input's aspect ratio at ~1 MP).
    #[arg(long)]
    pub width: Option<u32>,
    /// Output height.
    #[arg(long)]
    pub height: Option<u32>,
    /// Pixel area of the resized inputs for the VAE and of the default output (diffusers: 1024²; with --demo:
    /// 128²; the proxy was trained at 128²).
    #[arg(long)]
    pub vae_area: Option<u32>,
    /// Pixel area of Edit-Plus's vision-language condition images (diffusers: 384²; with --demo: 64², the
    /// proxy 128²).
    #[arg(long)]
    pub condition_area: Option<u32>,
    /// Run the baseline and the pruned schedule with the same seed; write both, a difference heat map, a
    /// side-by-side grid and a report with timings, speed-up, PSNR and SSIM.
    #[arg(long)]
    pub compare: bool,
    /// Untimed warm-up edits before the measured ones (each schedule once per warm-up), so that one-time costs
    /// (kernel compilation and autotuning on CUDA) stay out of the timings [default: 0 on the CPU, 1 on CUDA].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Run the edits of a JSONL file in one process (weights loaded once). Each line: {"input": "a.png" or [..],
    /// "prompt": "…"} with optional "seed", "steps", "cfg", "negative_prompt", "schedule", "width", "height".
    /// Every line is checked before the weights are loaded, and all bad lines are reported at once.
    #[arg(long)]
    pub batch: Option<PathBuf>,
    /// With --batch: run the valid edits even when some lines are invalid or fail, instead of stopping; the exit
    /// status is still an error, and the report lists every edit that did not run under `failed`. Without it,
    /// every line is checked first and nothing runs while any is bad.
    #[arg(long)]
    pub keep_going: bool,
    /// Run a built-in model (no download): the trained proxy on a held-out scene and its instruction (or on `-i`
    /// with `-p`), writing a before/after grid; with `--size tiny|full`, a random-weight model on the bundled sample.
    /// Two or more `-i` images run the Edit-Plus variant of either.
    #[arg(long)]
    pub demo: bool,
    /// With --demo: the trained proxy, the tiny random-weight model, or the full-size architecture with random
    /// weights (GPU) [default: proxy].
    #[arg(long, value_enum)]
    pub size: Option<DemoSizeArg>,
    /// With --demo: the pipeline variant, e.g. `edit-plus` to time Edit-Plus on one image [default: edit-plus for
    /// two or more `-i` images, else edit].
    #[arg(long, value_enum)]
    pub variant: Option<VariantArg>,
    /// Allow `--demo --size full` on the CPU (a 20 B-parameter model: ~80 GB of memory, hours per edit).
    #[arg(long)]
    pub allow_full_on_cpu: bool,
    /// Run every edit this many times on the loaded pipeline (after the warm-up) and report the time and the
    /// memory (host resident set; GPU memory in CUDA builds) after each run, e.g. to check that memory does not
    /// grow across consecutive edits.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Rotary positions of the text encoder.
    #[arg(long, value_enum, default_value = "multimodal")]
    pub text_positions: TextPositions,
    /// Encode and decode with the VAE in tiles (saves memory on large images).
    #[arg(long)]
    pub vae_tiling: bool,
    /// Where the DiT's modulation weights (img_mod/txt_mod, a third of its parameters) live.
    #[arg(long, value_enum, default_value = "table")]
    pub modulation: ModulationArg,
    /// Quantization of the DiT's weights.
    #[command(flatten)]
    pub quantize: QuantizeArgs,
    /// Check the edits and the options against the snapshot's configs, say what would be loaded (the DiT's layers:
    /// FP8 or not, weight bytes) and stop, without reading any weights.
    #[arg(long)]
    pub dry_run: bool,
    /// Hold the first edit's memory plan against this much free device memory (e.g. 24GB, 22GiB) instead of what
    /// the driver reports: with --dry-run, whether the edit would fit a card of that size and which memory mode
    /// would. Before loading on a GPU, an edit whose plan exceeds the free memory is refused with the modes that fit.
    #[arg(long, value_name = "BYTES", value_parser = parse_budget)]
    pub device_memory: Option<u64>,
    /// Skip the memory check: load and run even when the memory plan says the first edit will not fit the device's
    /// free memory (the device is not asked).
    #[arg(long)]
    pub no_memory_check: bool,
    /// No progress bars.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// The subcommands.
#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Evaluate pruning schedules on the proxy models' held-out set (docs/quality.md).
    Eval(crate::eval::EvalArgs),
    /// Serve edits over HTTP (OpenAI-compatible `POST /v1/images/edits`); see docs/serving.md.
    Serve(crate::serve::ServeArgs),
}

impl Args {
    /// The instruction: `-p`, else `default`.
    pub fn prompt_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.prompt.as_deref().unwrap_or(default)
    }
}

/// `--cache-budget`'s value: a byte count with an optional unit.
fn parse_budget(text: &str) -> Result<u64, String> {
    qwen_image_pruning::parse_bytes(text).map_err(|e| e.to_string())
}
