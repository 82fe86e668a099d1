//! Benchmark of the CUDA fast path (feature `cuda`): kernels (cuBLASLt GEMMs, our flash attention), the cost of
//! ordering our stream against burn's, and the full-size DiT (60 blocks, D = 3072, random bf16 weights created on
//! the GPU) at Edit v1 and Edit-Plus 1024²: full step, condition-K/V reuse step, 4-step totals of `none`, `cat`
//! and `reuse:2,3,4` through the real denoising loop, achieved TFLOP/s, memory and cache size.
//!
//! The modulation weights stay off the GPU by default (`--modulation table`): the rows of the 4 timesteps used are
//! built once into a table before the cases, timed separately (the first edit's extra cost; with random weights
//! each layer is regenerated on the GPU rather than uploaded, see `pipeline_bench --load-dir` for the upload from a
//! checkpoint). `--modulation resident` keeps them on the GPU and computes the rows in every forward pass, as
//! before the table. GPU memory (driver and burn pool) is reported after the load and at the end; run once per
//! mode (the pool keeps what it reserved, so one process cannot measure both).
//!
//! ```text
//! CARGO_TARGET_DIR=target/cuda cargo bench --features cuda --bench dit_bench --no-run
//! <binary> --json out.json [--cases v1,plus] [--layers 60] [--reps 5] [--skip-kernels] [--skip-dit] [--vision-only]
//!          [--modulation table|resident] [--forced-region 0.1,0.25,0.5] [--region-refresh 3]
//! ```
//!
//! `--forced-region F,…` adds, per fraction F, a `region` run whose edit region is forced to a centred rectangle of
//! F of the target tokens (a `mask` schedule with margin 0: step 1 computes and caches everything, steps 2–4 compute
//! only those target tokens and the text, the rest of the target and the condition image attend as cached K/V);
//! `--region-refresh R` times each again with a full step R (what `region:T,M,R` costs).
//! Every 4-step run reports its FLOP ceiling: the FLOP of `none` over the FLOP of its plans. `--cache-budget 2GiB`
//! adds a `cat` run fitted to that cache budget (its peak cache and time show what the budget costs).
//! `tools/bench/torch_dit_bench.py` measures the PyTorch reference on the same shapes and
//! `tools/bench/compare.py` puts both side by side; `docs/performance.md` has the results.

mod common;
mod dit_kernels;

use std::time::Instant;

use burn::tensor::{DType, Distribution, Tensor};
use clap::Parser;
use qwen_image::{
    cuda::{self, CudaDevice, FastError, FastPathConfig, OrderingMode},
    dit::{
        DitConfig, DitInput, DitLoadOptions, ImageShape, ModulationMode, ModulationTable,
        QwenImageTransformer,
    },
    ops::QwenBackend,
    tensor_io::{rel_l2, to_f32_vec},
    weights::WeightStore,
};
use qwen_image_eval::flops::executed_flops;
use qwen_image_pipeline::{denoise, DenoiseCaches, DenoiseInputs, TextConditioning};
use qwen_image_pruning::{
    from_fn, CacheBudget, Cat, EditRegion, GroupAction, LayerPlan, PixelMask, RegionSource, ReuseMode,
    ScheduleFactory, ScheduleSpec, StepPlan, StepStats, TokenPruningCache,
};
use serde_json::{json, Value};

use common::{dev, fast_path_json, gib, gpu_memory, log_to_stderr, median, sync, ModulationArg, G};
use dit_kernels::kernels;

#[derive(Parser, Debug)]
#[command(about = "CUDA fast-path benchmark of the Qwen-Image DiT")]
struct Args {
    /// Where to write the JSON results.
    #[arg(long, default_value = "dit_bench.json")]
    json: String,
    /// Cases: `v1` (1399 text tokens) and/or `plus` (236), both with 4096 target + 4096 condition tokens.
    #[arg(long, default_value = "v1,plus")]
    cases: String,
    /// DiT blocks.
    #[arg(long, default_value_t = 60)]
    layers: usize,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Skip the kernel micro-benchmarks.
    #[arg(long)]
    skip_kernels: bool,
    /// Skip the DiT benchmarks.
    #[arg(long)]
    skip_dit: bool,
    /// In the kernel section, only the attention kernels (for profiling).
    #[arg(long)]
    attention_only: bool,
    /// Only the vision tower's kernels (`dit_kernels::vision`), nothing else.
    #[arg(long)]
    vision_only: bool,
    /// Also time a full step with host-synchronized ordering.
    #[arg(long)]
    host_sync_step: bool,
    /// Where the DiT's modulation weights live.
    #[arg(long, value_enum, default_value = "table")]
    modulation: ModulationArg,
    /// Fractions of the target tokens to force as the edit region of extra `region` runs (e.g. `0.1,0.25,0.5`).
    #[arg(long, value_delimiter = ',')]
    forced_region: Vec<f64>,
    /// Also time each forced region with a full refresh at this step (e.g. `3`: what `region:0.2,1,3` costs).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=4))]
    region_refresh: Option<usize>,
    /// Also run `cat` fitted to this cache budget (e.g. `2GiB`), to measure what the budget costs.
    #[arg(long, value_parser = |s: &str| qwen_image_pruning::parse_bytes(s).map_err(|e| e.to_string()))]
    cache_budget: Option<u64>,
}

/// A region schedule computing a centred rectangle of `fraction` of a `rows × cols` target grid after step 1 (and
/// everything again at step `refresh`).
fn forced_region(fraction: f64, rows: usize, cols: usize, refresh: Option<usize>) -> EditRegion {
    let side = fraction.clamp(0.0, 1.0).sqrt();
    let (h, w) =
        (((rows as f64 * side).round() as usize).max(1), ((cols as f64 * side).round() as usize).max(1));
    let (top, left) = ((rows - h) / 2, (cols - w) / 2);
    let edit = (0..rows * cols)
        .map(|i| (top..top + h).contains(&(i / cols)) && (left..left + w).contains(&(i % cols)));
    let mask = PixelMask::new(cols, rows, edit.collect()).expect("mask");
    EditRegion::new(RegionSource::Mask(mask), 0, refresh, ReuseMode::KeyValue).expect("region")
}

/// The timestep of the single-step measurements.
const STEP_TIMESTEP: f32 = 0.5;

/// σ of the 4-step denoising runs (their first four are the DiT timesteps).
const SIGMAS: [f32; 5] = [1.0, 0.75, 0.5, 0.25, 0.0];

const D: usize = 3072;

/// Median wall time in ms of `inner` back-to-back calls of `f` (after one warm-up call), divided by `inner`.
fn time_ms(reps: usize, inner: usize, mut f: impl FnMut()) -> f64 {
    f();
    sync();
    let times = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..inner {
                f();
            }
            sync();
            t.elapsed().as_secs_f64() * 1e3 / inner as f64
        })
        .collect();
    median(times)
}

/// Changes the benchmarked GPU's fast-path configuration.
fn configure(change: impl FnOnce(&mut FastPathConfig)) -> Result<(), FastError> {
    let mut config = cuda::config(&dev());
    change(&mut config);
    cuda::configure(&dev(), config)
}

/// The fast-path calls of the benchmarked GPU per kind, and whether any fell back.
fn fast_path_counts() -> (Vec<u64>, Vec<u64>) {
    let report = G::fast_path_report(&dev()).unwrap_or_default();
    (report.kinds.iter().map(|k| k.calls).collect(), report.kinds.iter().map(|k| k.fallbacks).collect())
}

fn randn<const N: usize>(shape: [usize; N], std: f64) -> Tensor<G, N> {
    Tensor::<G, N>::random(shape, Distribution::Normal(0.0, std), &dev()).cast(DType::BF16)
}

/// FLOPs of one DiT step in which `text` text tokens and `computed` image tokens are computed at every block and
/// attend to `keys` keys, by the eval's cost model (`executed_flops`) on the stats such a step reports (a plain
/// `forward` reports none).
fn step_flop(config: &DitConfig, text: usize, computed: usize, keys: usize) -> f64 {
    let layers = config.num_layers;
    let stats = StepStats {
        text_tokens: text * layers,
        computed_tokens: computed * layers,
        attention_pairs: (text + computed) * keys * layers,
        ..StepStats::default()
    };
    executed_flops(config, &stats)
}

/// One DiT case: single full and reuse steps, then 4-step schedules through the denoising loop.
fn dit_case(
    model: &QwenImageTransformer<G>,
    table: Option<&ModulationTable<G>>,
    name: &str,
    text: usize,
    args: &Args,
) -> Value {
    let (target, cond) = (4096usize, 4096usize);
    let shapes = vec![ImageShape::new(64, 64), ImageShape::new(64, 64)];
    let input = DitInput {
        hidden_states: randn([1, target + cond, 64], 1.0),
        encoder_hidden_states: randn([1, text, 3584], 1.0),
        encoder_hidden_states_mask: None,
        timestep: vec![STEP_TIMESTEP],
        img_shapes: shapes.clone(),
        modulation: table.cloned(),
    };
    let layers = model.num_layers();
    println!("\n== DiT {name}: {text} text + {target} target + {cond} condition tokens, {layers} blocks ==");
    let mut out = single_steps(model, &input, text, (target, cond), args);
    let sigmas = SIGMAS.to_vec();
    let inputs = DenoiseInputs {
        latents: randn([1, target, 64], 1.0),
        image_latents: randn([1, cond, 64], 1.0),
        prompt: TextConditioning { embeds: input.encoder_hidden_states.clone(), mask: None },
        negative: None,
        cfg_scale: 1.0,
        img_shapes: shapes,
        timesteps: sigmas[..4].to_vec(),
        sigmas: sigmas.clone(),
        modulation: table.cloned(),
    };
    drop(input);
    out["schedules"] = schedule_runs(model, &inputs, args);
    out
}

/// A full step, optionally with host-synchronized ordering, then a caching step and a reuse step (the condition
/// image's K/V cached at every block): their times, achieved TFLOP/s and the reuse step's error against the full one.
fn single_steps(
    model: &QwenImageTransformer<G>,
    input: &DitInput<G>,
    text: usize,
    (target, cond): (usize, usize),
    args: &Args,
) -> Value {
    let layers = model.num_layers();
    let keys = text + target + cond;
    let full_flop = step_flop(&model.config, text, target + cond, keys);
    let reuse_flop = step_flop(&model.config, text, target, keys);

    cuda::reset_stats(&dev());
    let full_ms = time_ms(args.reps, 1, || drop(model.forward(input).expect("forward")));
    let (calls, fallbacks) = fast_path_counts();
    let ops_per_step: u64 = calls.iter().sum::<u64>() / (args.reps as u64 + 1);
    println!(
        "full step: {full_ms:8.1} ms  {:6.1} TFLOP/s ({:.1} TFLOP); fast ops per step {ops_per_step}, fallbacks {:?}",
        full_flop / (full_ms * 1e-3) / 1e12,
        full_flop / 1e12,
        fallbacks
    );
    let mut host_sync_ms = None;
    if args.host_sync_step && configure(|c| c.ordering = OrderingMode::HostSync).is_ok() {
        let ms = time_ms(args.reps.min(3), 1, || drop(model.forward(input).expect("forward")));
        configure(|c| c.ordering = OrderingMode::ContextEvents).ok();
        println!("full step with host-synchronized ordering: {ms:8.1} ms");
        host_sync_ms = Some(ms);
    }

    // Reuse step: step 0 computes and caches the condition image at every block, step 1 reuses its K/V.
    let n_cond = 1;
    let cache_plan =
        StepPlan::new(vec![LayerPlan::with_conditions(n_cond, GroupAction::ComputeAndCache); layers]);
    let reuse_plan =
        StepPlan::new(vec![
            LayerPlan::with_conditions(n_cond, GroupAction::Reuse(ReuseMode::KeyValue));
            layers
        ]);
    let mut cache = TokenPruningCache::new();
    let cache_ms = time_ms(args.reps.min(3), 1, || {
        drop(model.forward_planned(input, &cache_plan, 0, &mut cache).expect("caching step"))
    });
    let cache_bytes = cache.size_bytes();
    let reuse_ms = time_ms(args.reps, 1, || {
        drop(model.forward_planned(input, &reuse_plan, 1, &mut cache).expect("reuse step"))
    });
    // With K/V cached from the same inputs, the reuse step's target prediction equals the full step's.
    let (want, _) = model.forward_planned(input, &cache_plan, 0, &mut cache).expect("caching step");
    let (got, _) = model.forward_planned(input, &reuse_plan, 1, &mut cache).expect("reuse step");
    let reuse_err = rel_l2(&to_f32_vec(got), &to_f32_vec(want));
    println!(
        "caching step: {cache_ms:8.1} ms; cache {:.2} GiB; reuse vs full rel L2 {reuse_err:.1e}",
        gib(cache_bytes as u64)
    );
    println!(
        "reuse step: {reuse_ms:8.1} ms  {:6.1} TFLOP/s ({:.1} TFLOP)",
        reuse_flop / (reuse_ms * 1e-3) / 1e12,
        reuse_flop / 1e12
    );
    json!({
        "text_tokens": text, "target_tokens": target, "condition_tokens": cond, "layers": layers,
        "full_step_ms": full_ms, "full_step_tflop": full_flop / 1e12, "full_step_tflops": full_flop / (full_ms * 1e-3) / 1e12,
        "full_step_host_sync_ms": host_sync_ms,
        "caching_step_ms": cache_ms,
        "reuse_step_ms": reuse_ms, "reuse_step_tflop": reuse_flop / 1e12, "reuse_step_tflops": reuse_flop / (reuse_ms * 1e-3) / 1e12,
        "cache_bytes": cache_bytes, "fast_ops_per_step": ops_per_step, "reuse_vs_full_rel_l2": reuse_err,
    })
}

/// The schedules to time over 4 steps: `none`, `cat`, `reuse:2,3,4`, the forced regions and the cache budget.
fn schedules_to_time(args: &Args) -> Vec<(String, Box<dyn ScheduleFactory>)> {
    let mut runs: Vec<(String, Box<dyn ScheduleFactory>)> = ["none", "cat", "reuse:2,3,4"]
        .into_iter()
        .map(|s| {
            (
                s.to_string(),
                Box::new(s.parse::<ScheduleSpec>().expect("schedule")) as Box<dyn ScheduleFactory>,
            )
        })
        .collect();
    for &f in &args.forced_region {
        runs.push((format!("region {:.0}%", f * 100.0), Box::new(forced_region(f, 64, 64, None))));
        if let Some(r) = args.region_refresh {
            let label = format!("region {:.0}% refresh {r}", f * 100.0);
            runs.push((label, Box::new(forced_region(f, 64, 64, Some(r)))));
        }
    }
    if let Some(bytes) = args.cache_budget {
        // K and V per cached token, bf16 (cat never reads the block inputs: they are not kept).
        let per_token = 2 * D as u64 * 2;
        let fitted = from_fn(move || CacheBudget::new(Cat::default(), bytes, per_token).expect("budget"));
        runs.push((format!("cat budget {:.1}GiB", gib(bytes)), Box::new(fitted)));
    }
    runs
}

/// Each schedule of [`schedules_to_time`] through the denoising loop twice (the second run is reported): total and
/// per-step times, speed-up against `none`, the FLOPs of the plans that ran and their ceiling against `none`'s
/// (`qwen_image_eval::flops::executed_flops`, the cost model of `qwen-edit eval`), the cache's peak size.
fn schedule_runs(model: &QwenImageTransformer<G>, inputs: &DenoiseInputs<G>, args: &Args) -> Value {
    let mut schedules = serde_json::Map::new();
    let (mut none_total, mut none_flop) = (None, None);
    for (spec, parsed) in &schedules_to_time(args) {
        let spec = spec.as_str();
        let mut runs = Vec::new();
        let mut last_reports = Vec::new();
        for _ in 0..2 {
            let mut schedule = parsed.build().expect("schedule");
            let mut caches = DenoiseCaches::default();
            sync();
            let t = Instant::now();
            let (x, reports) =
                denoise(model, inputs, schedule.as_mut(), &mut caches, &mut |_| {}).expect("denoise");
            drop(x);
            sync();
            runs.push(t.elapsed().as_secs_f64() * 1e3);
            last_reports = reports;
        }
        let total = runs[1];
        let steps: Vec<f64> = last_reports.iter().map(|r| r.time.as_secs_f64() * 1e3).collect();
        let cache = last_reports.iter().map(|r| r.cache_bytes).max().unwrap_or(0);
        let flop: f64 = last_reports.iter().map(|r| executed_flops(&model.config, &r.stats)).sum();
        let speedup = none_total.map(|n: f64| n / total);
        if spec == "none" {
            (none_total, none_flop) = (Some(total), Some(flop));
        }
        let ceiling = none_flop.map(|n| n / flop);
        println!(
            "4 steps {spec:12}: {total:8.1} ms (steps {}){}; FLOP ceiling {:.2}x; cache {:.2} GiB",
            steps.iter().map(|s| format!("{s:.1}")).collect::<Vec<_>>().join(" / "),
            speedup.map(|s| format!(", {s:.2}x vs none")).unwrap_or_default(),
            ceiling.unwrap_or(1.0),
            gib(cache as u64)
        );
        schedules.insert(
            spec.into(),
            json!({"total_ms": total, "first_run_ms": runs[0], "step_ms": steps, "cache_bytes": cache,
                   "speedup_vs_none": speedup, "tflop": flop / 1e12, "flop_ceiling_vs_none": ceiling}),
        );
    }
    Value::Object(schedules)
}

/// The DiT cases of `args` on a random full-size DiT: its creation, the modulation table, each case
/// ([`dit_case`]) and the GPU memory.
fn dit_cases(args: &Args, device: &CudaDevice, mem0: u64, results: &mut Vec<(String, Value)>) {
    let config = DitConfig { num_layers: args.layers, zero_cond_t: false, ..DitConfig::default() };
    let t = Instant::now();
    let options = DitLoadOptions { modulation: args.modulation.mode(), ..Default::default() };
    let mut store = WeightStore::random(DType::BF16, 42);
    let model =
        QwenImageTransformer::<G>::from_store_with(config, &mut store, &options, device).expect("model");
    sync();
    let params: usize = model.blocks.len() * (2 * 6 * D * D + 8 * D * D + 4 * 4 * D * D);
    println!(
        "\nrandom DiT: {:.2} B block parameters, created in {:.1} s",
        params as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    let mem_model = cuda::device_memory_used(0).unwrap_or(0);
    let memory_with_model = gpu_memory(&format!("with the model ({:?} modulation)", args.modulation));
    // The table of every timestep the cases use, built once before them (as in a process's first edit).
    let (table, table_json) = modulation_table(&model, options.modulation);
    let mut cases = serde_json::Map::new();
    for case in args.cases.split(',') {
        let text = match case {
            "v1" => 1399,
            "plus" => 236,
            other => panic!("unknown case {other}"),
        };
        cases.insert(case.into(), dit_case(&model, table.as_ref(), case, text, args));
    }
    let mem_peak = cuda::device_memory_used(0).unwrap_or(0);
    let pool = cuda::pool_usage(device);
    println!(
        "\nGPU memory ({:?} modulation): {:.1} GiB before, {:.1} GiB with the model, {:.1} GiB peak (burn pool in \
         use / reserved: {:?})",
        args.modulation,
        gib(mem0),
        gib(mem_model),
        gib(mem_peak),
        pool.map(|(a, b)| (gib(a), gib(b)))
    );
    results.push(("dit".into(), Value::Object(cases)));
    results
        .push(("modulation".into(), json!({"mode": format!("{:?}", args.modulation), "table": table_json})));
    results.push((
        "memory".into(),
        json!({"before_bytes": mem0, "model_bytes": mem_model, "peak_bytes": mem_peak, "pool": pool,
               "with_model": memory_with_model}),
    ));
}

/// In table mode, the modulation table of every timestep the cases use (the 4 Lightning steps and the single-step
/// timestep), built once, and its build time and size.
fn modulation_table(
    model: &QwenImageTransformer<G>,
    modulation: ModulationMode,
) -> (Option<ModulationTable<G>>, Value) {
    match modulation {
        ModulationMode::Resident => (None, Value::Null),
        ModulationMode::Table => {
            let mut timesteps = SIGMAS[..4].to_vec();
            timesteps.push(STEP_TIMESTEP);
            let calls: Vec<&[f32]> = timesteps.iter().map(std::slice::from_ref).collect();
            sync();
            let t = Instant::now();
            let mut table = ModulationTable::new();
            let update = model.extend_modulation_table(&mut table, &calls).expect("modulation table");
            sync();
            let ms = t.elapsed().as_secs_f64() * 1e3;
            println!(
                "modulation table: {} timesteps in {ms:.1} ms ({:.2} GB of modulation weights made on the GPU one \
                 layer at a time), {:.1} MB",
                update.added,
                update.uploaded_bytes as f64 / 1e9,
                table.size_bytes() as f64 / 1e6
            );
            let memory = gpu_memory("with the model and the table");
            let json = json!({"build_ms": ms, "timesteps": update.added, "uploaded_bytes": update.uploaded_bytes,
                              "table_bytes": table.size_bytes(), "memory_after": memory});
            (Some(table), json)
        }
    }
}

fn main() {
    let args = Args::parse();
    log_to_stderr();
    // burn's compiled kernels and autotune results persist across runs (before any CUDA tensor exists).
    println!("burn kernel caches: {:?}", cuda::configure_runtime_caches(None));
    let device = dev();
    let mut results: Vec<(String, Value)> = Vec::new();
    let ordering = cuda::ordering_mode(&device)
        .map(|m| format!("{m:?}"))
        .unwrap_or_else(|e| format!("unavailable: {e}"));
    println!("fast path {:?}, ordering {ordering}", cuda::config(&device));
    results.push(("ordering_mode".into(), json!(ordering)));
    let mem0 = cuda::device_memory_used(0).unwrap_or(0);

    if args.vision_only {
        results.push(("vision".into(), dit_kernels::vision::vision_kernels(args.reps)));
    } else if !args.skip_kernels {
        kernels(args.reps, args.attention_only, &mut results);
    }
    if !args.skip_dit && !args.vision_only {
        dit_cases(&args, &device, mem0, &mut results);
    }
    results.push(("fast_path".into(), fast_path_json()));
    let doc = Value::Object(results.into_iter().collect());
    std::fs::write(&args.json, serde_json::to_string_pretty(&doc).expect("json")).expect("write json");
    println!("\nwrote {}", args.json);
}
