//! Benchmark of the full-size networks other than the DiT's denoising steps (feature `cuda`), batch 1, bf16, with
//! random weights created on the GPU (`WeightStore::random`; no checkpoint needed):
//!
//! - the Qwen2.5-VL-7B text encoder at Edit v1's 1024² shapes: 1469 tokens holding a 74×74-patch image (1369
//!   merged image tokens); the vision tower alone, the language model alone (precomputed image embeddings) and the
//!   whole forward;
//! - the VAE encoding a 1024² image and decoding its 128² latents (one frame), whole and part by part
//!   (`vae_parts`); for the text encoder and the VAE, the host's time until each call returns beside its wall time;
//! - with `--load-dir DIR`: weight loading. A random bf16 DiT checkpoint in diffusers' layout (sharded
//!   safetensors + index + config.json; 41 GB at 60 blocks) is written to `DIR/transformer` shard by shard, then
//!   loaded to the GPU by the normal strict loader twice: cold (the files evicted from the page cache with
//!   `posix_fadvise(DONTNEED)`) and warm (from the page cache). Reports seconds, GB/s and host memory (peak resident
//!   set `VmHWM`, and peaks of anonymous memory and of mapped file pages sampled every 10 ms). The checkpoint is
//!   deleted at the end unless `--keep`. With `--modulation table` (the default) the modulation weights stay in
//!   the mapped files at load, and the modulation table of the 4 Lightning timesteps is then built from them (one
//!   layer on the GPU at a time), timed separately: the first edit's extra cost. `--modulation resident` loads
//!   everything onto the GPU, as before the table.
//!
//! - with `--stages`: where the stages around the networks spend their time. The full-size pipeline (random
//!   weights, the full demo at 1024²) runs one warm-up edit, then `QwenImageEditPipeline::profile_stages`: the
//!   preprocessing, prompt-encoding, image-encoding and decoding stages as the edit runs them and part by part
//!   (uploads, each network, host work), medians over `--reps`; each stage's overhead over its networks is
//!   printed (issue 13: within 10 %). Also checks on the GPU that uploading in bf16 converted on the host and
//!   reading back in bf16 give the same bits as the f32 transfer + cast they replace.
//!
//! - with `--reuse`: per-image reuse across edits (`qwen-edit serve`'s cache). The full-size pipeline (random
//!   weights, the full demo at 1024²) edits the same image twice with a `ReuseCache`: the first edit computes the
//!   VAE latents and the vision tower's embeddings, the second takes them from the cache. Reports the stage times
//!   (encode prompt, encode image) and totals of both (medians over `--reps`), the saving, and whether the final
//!   latents are bit-identical.
//!
//! GPU memory is read after each section: the driver's used memory (whole GPU) and burn's pool (in use /
//! reserved; the pool keeps what it reserved, so "reserved" is the section's peak as seen by burn).
//!
//! ```text
//! CARGO_TARGET_DIR=target/cuda cargo bench --features cuda --bench pipeline_bench --no-run
//! <binary> --json out.json [--reps 5] [--skip-text-encoder] [--skip-vae]
//!          [--load-dir /local/disk/dir [--layers 60] [--shard-gib 5] [--loads cold,warm] [--keep]
//!           [--modulation table|resident]]
//!          [--stages] [--reuse [--reuse-steps 4]]
//! ```

mod common;
mod vae_parts;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::{DType, Distribution, Tensor};
use clap::Parser;
use qwen_image::{
    cuda,
    dit::{DitConfig, DitLoadOptions, ModulationMode, QwenImageTransformer},
    synthetic,
    text_encoder::{GridThw, Qwen25VlConfig, Qwen25VlTextEncoder, TextEncoderInput},
    vae::{AutoencoderKLQwenImage, VaeConfig},
    weights::WeightStore,
};
use qwen_image_pipeline::{
    demo,
    memory::{reset_peak, HostMemory, PeakSampler},
    EditRequest, NoProgress, QwenImageEditPipeline,
};
use qwen_image_pruning::ScheduleSpec;
use serde_json::{json, Value};

use common::{dev, fast_path_json, gib, gpu_memory, log_to_stderr, median, sync, ModulationArg, G};

#[derive(Parser, Debug)]
#[command(about = "Full-size text encoder, VAE and weight-loading benchmark (random weights, CUDA)")]
struct Args {
    /// Where to write the JSON results.
    #[arg(long, default_value = "pipeline_bench.json")]
    json: String,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Skip the text-encoder benchmark.
    #[arg(long)]
    skip_text_encoder: bool,
    /// Skip the VAE benchmark.
    #[arg(long)]
    skip_vae: bool,
    /// Run the weight-loading benchmark with a random checkpoint written under this folder (local disk; ~41 GB
    /// free at 60 blocks).
    #[arg(long)]
    load_dir: Option<PathBuf>,
    /// DiT blocks of the written checkpoint (60 = the full model, 41 GB).
    #[arg(long, default_value_t = 60)]
    layers: usize,
    /// Largest shard in GiB (diffusers' shards of the published checkpoint are ~5 GB).
    #[arg(long, default_value_t = 5.0)]
    shard_gib: f64,
    /// Keep the written checkpoint.
    #[arg(long)]
    keep: bool,
    /// Which loads to time, in order: `cold` (page cache evicted first) and/or `warm` (from the page cache).
    #[arg(long, default_value = "cold,warm")]
    loads: String,
    /// Where the DiT's modulation weights go at load.
    #[arg(long, value_enum, default_value = "table")]
    modulation: ModulationArg,
    /// Profile the stages around the networks (loads the whole full-size pipeline: ~45 GB of GPU memory).
    #[arg(long)]
    stages: bool,
    /// Run the per-image reuse benchmark (loads the whole full-size pipeline: ~45 GB of GPU memory).
    #[arg(long)]
    reuse: bool,
    /// Denoising steps of the reuse benchmark's edits (the saving does not depend on them).
    #[arg(long, default_value_t = 4)]
    reuse_steps: usize,
}

/// Four distinct DiT timesteps, as a 4-step Lightning edit has (any four values cost the same).
const LIGHTNING_TIMESTEPS: [f32; 4] = [1.0, 0.75, 0.5, 0.25];

/// Text-encoder tokens of Edit v1 at 1024²: 1369 image tokens of a 74×74-patch image and 100 template/prompt
/// tokens (66 before the image, `<|vision_start|>`, `<|vision_end|>`, 32 after).
const TE_TOKENS: usize = 1469;
const GRID: GridThw = GridThw { t: 1, h: 74, w: 74 };

/// Median wall time in ms of `f` after one warm-up call, and the warm-up call's time (kernel compilation and
/// autotuning included).
fn time_ms(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    let t = Instant::now();
    f();
    sync();
    let first = t.elapsed().as_secs_f64() * 1e3;
    let times = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            sync();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    (median(times), first)
}

/// Median time in ms until `f` returns, the device idle before each call (synchronized after it): the host's
/// share of the work (queueing kernels, burn's server round trips). Near the wall time, the network is bound by the
/// host, not the GPU.
fn enqueue_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    let times = (0..reps.max(1))
        .map(|_| {
            sync();
            let t = Instant::now();
            f();
            let queued = t.elapsed().as_secs_f64() * 1e3;
            sync();
            queued
        })
        .collect();
    median(times)
}

/// GPU memory now: driver's used memory and burn's pool (in use, reserved).
fn randn<const N: usize>(shape: [usize; N], std: f64) -> Tensor<G, N> {
    Tensor::<G, N>::random(shape, Distribution::Normal(0.0, std), (&dev(), DType::BF16))
}

fn text_encoder(reps: usize) -> Value {
    let config = Qwen25VlConfig::from_json(&demo::full_text_encoder_config()).expect("config");
    println!("\n== text encoder (Qwen2.5-VL-7B, random bf16): {TE_TOKENS} tokens, {GRID:?} patches ==");
    let t = Instant::now();
    let mut store = WeightStore::random(DType::BF16, 1);
    let te = Qwen25VlTextEncoder::<G>::from_store(config.clone(), &mut store, &dev()).expect("text encoder");
    sync();
    let create_s = t.elapsed().as_secs_f64();
    println!("created {:.2} GB of weights in {create_s:.1} s", store.total_bytes() as f64 / 1e9);
    let mem_model = gpu_memory("with the text encoder");

    let image_tokens = te.image_tokens(GRID);
    let (before, after) = (66, TE_TOKENS - 66 - 2 - image_tokens);
    let mut seed = 0x1234_5678u64;
    let mut text = |n: usize| -> Vec<i64> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                14 + (seed >> 33) as i64 % 386
            })
            .collect()
    };
    let mut ids = text(before);
    ids.push(config.vision_start_token_id);
    ids.extend(std::iter::repeat_n(config.image_token_id, image_tokens));
    ids.push(config.vision_end_token_id);
    ids.extend(text(after));
    assert_eq!(ids.len(), TE_TOKENS);
    let patches = GRID.num_patches();
    let pixels = randn([patches, config.vision.patch_features()], 1.0);

    let (vision_ms, vision_first) =
        time_ms(reps, || drop(te.vision_forward(pixels.clone(), &[GRID]).expect("vision")));
    let embeds = te.vision_forward(pixels.clone(), &[GRID]).expect("vision");
    let with_embeds = TextEncoderInput::new(ids.clone()).with_image_embeds(embeds, vec![GRID]);
    let (language_ms, language_first) =
        time_ms(reps, || drop(te.forward(&with_embeds).expect("language model")));
    let with_pixels = TextEncoderInput::new(ids).with_images(pixels.clone(), vec![GRID]);
    let (full_ms, full_first) = time_ms(reps, || drop(te.forward(&with_pixels).expect("text encoder")));
    let queued = [
        enqueue_ms(reps, || drop(te.vision_forward(pixels.clone(), &[GRID]).expect("vision"))),
        enqueue_ms(reps, || drop(te.forward(&with_embeds).expect("language model"))),
        enqueue_ms(reps, || drop(te.forward(&with_pixels).expect("text encoder"))),
    ];
    let out = te.forward(&with_pixels).expect("text encoder");
    let finite = qwen_image::tensor_io::to_f32_vec(out).iter().all(|v| v.is_finite());
    println!("vision tower ({patches} patches): {vision_ms:8.1} ms  (first call {vision_first:.0} ms)");
    println!(
        "language model ({TE_TOKENS} tokens): {language_ms:8.1} ms  (first call {language_first:.0} ms)"
    );
    println!(
        "whole text encoder: {full_ms:8.1} ms  (first call {full_first:.0} ms; output finite: {finite})"
    );
    println!(
        "host time until each call returns (queueing): vision {:.1} / language {:.1} / whole {:.1} ms",
        queued[0], queued[1], queued[2]
    );
    let mem_peak = gpu_memory("after the text encoder");
    drop(te);
    json!({
        "tokens": TE_TOKENS, "image_grid_thw": <[usize; 3]>::from(GRID), "image_tokens": image_tokens, "patches": patches,
        "weights_bytes": store.total_bytes(), "create_seconds": create_s,
        "vision_ms": vision_ms, "language_model_ms": language_ms, "forward_ms": full_ms, "output_finite": finite,
        "enqueue_ms": {"vision": queued[0], "language_model": queued[1], "forward": queued[2]},
        "first_call_ms": {"vision": vision_first, "language_model": language_first, "forward": full_first},
        "memory_with_model": mem_model, "memory_after": mem_peak,
    })
}

fn vae(reps: usize) -> Value {
    let config = VaeConfig::from_json(demo::FULL_VAE_CONFIG).expect("config");
    println!("\n== VAE (random bf16): encode 1024², decode 128² latents ==");
    let mut store = WeightStore::random(DType::BF16, 2);
    let vae = AutoencoderKLQwenImage::<G>::from_store(config, &mut store, &dev()).expect("vae");
    sync();
    let mem_model = gpu_memory("with the VAE");
    let x =
        Tensor::<G, 4>::random([1, 3, 1024, 1024], Distribution::Uniform(-1.0, 1.0), (&dev(), DType::BF16));
    let (encode_ms, encode_first) = time_ms(reps, || drop(vae.encode_mode(x.clone()).expect("encode")));
    let mem_encode = gpu_memory("after encoding");
    let z = randn([1, vae.z_dim(), 128, 128], 1.0);
    let (decode_ms, decode_first) = time_ms(reps, || drop(vae.decode(z.clone()).expect("decode")));
    let queued = [
        enqueue_ms(reps, || drop(vae.encode_mode(x.clone()).expect("encode"))),
        enqueue_ms(reps, || drop(vae.decode(z.clone()).expect("decode"))),
    ];
    let out = vae.decode(z.clone()).expect("decode");
    assert_eq!(out.dims(), [1, 3, 1024, 1024]);
    println!("encode 1024²: {encode_ms:8.1} ms  (first call {encode_first:.0} ms; host {:.1} ms)", queued[0]);
    println!("decode 1024²: {decode_ms:8.1} ms  (first call {decode_first:.0} ms; host {:.1} ms)", queued[1]);
    let mem_decode = gpu_memory("after decoding");
    let parts = vae_parts::vae_parts(&vae, x, z, &|f| time_ms(reps, f).0, &|f| enqueue_ms(reps, f));
    json!({
        "weights_bytes": store.total_bytes(), "encode_ms": encode_ms, "decode_ms": decode_ms,
        "enqueue_ms": {"encode": queued[0], "decode": queued[1]}, "parts": parts,
        "first_call_ms": {"encode": encode_first, "decode": decode_first},
        "memory_with_model": mem_model, "memory_after_encode": mem_encode, "memory_after_decode": mem_decode,
    })
}

/// Drops `path` from the page cache (its pages are clean: the writer synced them); false if the kernel refused.
#[cfg(target_os = "linux")]
fn evict_page_cache(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    extern "C" {
        fn posix_fadvise(fd: i32, offset: i64, len: i64, advice: i32) -> i32;
    }
    const POSIX_FADV_DONTNEED: i32 = 4;
    let Ok(file) = std::fs::File::open(path) else { return false };
    // SAFETY: a plain system call on an open descriptor; offset 0 and length 0 mean the whole file.
    unsafe { posix_fadvise(file.as_raw_fd(), 0, 0, POSIX_FADV_DONTNEED) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn evict_page_cache(_path: &Path) -> bool {
    false
}

fn load(args: &Args, root: &Path) -> Value {
    let config = DitConfig { num_layers: args.layers, ..DitConfig::default() };
    let tensors = synthetic::dit_checkpoint_tensors(&config).expect("tensors");
    let dir = root.join("transformer");
    println!("\n== weight loading: random {}-block DiT checkpoint in {} ==", args.layers, dir.display());
    let shard_bytes = (args.shard_gib * (1u64 << 30) as f64) as u64;
    let t = Instant::now();
    let written =
        synthetic::write_random_checkpoint(&dir, "diffusion_pytorch_model", &tensors, shard_bytes, 0)
            .expect("write");
    std::fs::write(dir.join("config.json"), synthetic::dit_config_json(&config)).expect("config");
    let write_s = t.elapsed().as_secs_f64();
    let gb = written.bytes as f64 / 1e9;
    println!(
        "wrote {gb:.2} GB in {} shards in {write_s:.1} s ({:.2} GB/s, generation included)",
        written.shards.len(),
        gb / write_s
    );
    let after_write = HostMemory::read().unwrap_or_default();
    // In table mode the modulation weights stay in the files at load.
    let options = DitLoadOptions { modulation: args.modulation.mode(), ..Default::default() };
    let deferred: u64 = tensors
        .iter()
        .filter(|(k, _)| k.contains("_mod.1."))
        .map(|(_, s)| 2 * s.iter().product::<usize>() as u64)
        .sum();
    let loaded_gb = match options.modulation {
        ModulationMode::Table => (written.bytes - deferred) as f64 / 1e9,
        ModulationMode::Resident => gb,
    };

    let mut loads = Vec::new();
    for label in args.loads.split(',') {
        let cold = match label {
            "cold" => true,
            "warm" => false,
            other => panic!("unknown load mode `{other}` (cold, warm)"),
        };
        let evicted = cold && written.shards.iter().all(|s| evict_page_cache(s));
        loads.push(timed_load(args, &dir, &options, label, (cold, evicted), loaded_gb));
    }
    if !args.keep {
        std::fs::remove_dir_all(&dir).expect("delete the checkpoint");
        println!("deleted {}", dir.display());
    }
    json!({
        "layers": args.layers, "bytes": written.bytes, "shards": written.shards.len(), "write_seconds": write_s,
        "host_rss_after_write_bytes": after_write.rss, "loads": loads, "kept": args.keep,
    })
}

/// One load of the written checkpoint (`label`: cold or warm; `cold_evicted`: whether it is cold and the page cache
/// was evicted): time, throughput, host and GPU memory, then the first edit's modulation table in table mode.
fn timed_load(
    args: &Args,
    dir: &Path,
    options: &DitLoadOptions,
    label: &str,
    (cold, evicted): (bool, bool),
    loaded_gb: f64,
) -> Value {
    reset_peak();
    let before = HostMemory::read().unwrap_or_default();
    let gpu_before = cuda::device_memory_used(0).unwrap_or(0);
    let sampler = PeakSampler::start(Duration::from_millis(10));
    let t = Instant::now();
    let model = QwenImageTransformer::<G>::load_with(dir, DType::BF16, options, &dev()).expect("load");
    sync();
    let secs = t.elapsed().as_secs_f64();
    let peak = sampler.finish();
    let after = HostMemory::read().unwrap_or_default();
    let gpu_after = cuda::device_memory_used(0).unwrap_or(0);
    println!(
        "{label} load{}: {secs:6.2} s, {:.2} GB/s; host peak RSS {:.2} GiB (VmHWM), peaks anon {:.2} GiB / \
         mapped files {:.2} GiB; RSS {:.2} → {:.2} GiB; GPU +{:.2} GiB",
        if cold && !evicted { " (page cache NOT evicted)" } else { "" },
        loaded_gb / secs,
        gib(after.peak_rss),
        gib(peak.anon),
        gib(peak.file),
        gib(before.rss),
        gib(after.rss),
        gib(gpu_after.saturating_sub(gpu_before)),
    );
    let table = (options.modulation == ModulationMode::Table).then(|| first_table(&model, label, gpu_after));
    let out = json!({
        "mode": label, "page_cache_evicted": evicted, "seconds": secs, "gb_per_s": loaded_gb / secs,
        "loaded_bytes": loaded_gb * 1e9,
        "host_peak_rss_bytes": after.peak_rss, "host_peak_anon_bytes": peak.anon, "host_peak_file_bytes": peak.file,
        "host_rss_before_bytes": before.rss, "host_rss_after_bytes": after.rss,
        "gpu_used_before_bytes": gpu_before, "gpu_used_after_bytes": gpu_after,
        "modulation": format!("{:?}", args.modulation), "modulation_table": table,
    });
    drop(model);
    sync();
    out
}

/// The first edit's modulation table: each modulation layer read from the mapped files and uploaded once.
fn first_table(model: &QwenImageTransformer<G>, label: &str, gpu_after_load: u64) -> Value {
    let t = Instant::now();
    let calls: Vec<&[f32]> = LIGHTNING_TIMESTEPS.iter().map(std::slice::from_ref).collect();
    let mut table = qwen_image::dit::ModulationTable::new();
    let update = model.extend_modulation_table(&mut table, &calls).expect("modulation table");
    sync();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{label} modulation table ({} timesteps): {secs:6.2} s, {:.2} GB uploaded one layer at a time \
         ({:.2} GB/s), table {:.1} MB; GPU +{:.2} GiB over the loaded model",
        update.added,
        update.uploaded_bytes as f64 / 1e9,
        update.uploaded_bytes as f64 / 1e9 / secs,
        table.size_bytes() as f64 / 1e6,
        gib(cuda::device_memory_used(0).unwrap_or(0).saturating_sub(gpu_after_load)),
    );
    json!({"seconds": secs, "timesteps": update.added, "uploaded_bytes": update.uploaded_bytes,
           "table_bytes": table.size_bytes(), "gpu_used_bytes": cuda::device_memory_used(0)})
}

/// The full-size pipeline (random bf16 weights, the full demo's configs) and the demo's 1024² request with `steps`
/// denoising steps.
fn full_pipeline(args: &Args, steps: usize) -> (QwenImageEditPipeline<G>, EditRequest) {
    use qwen_image_pipeline::{LoadOptions, Snapshot};
    let dir = std::env::temp_dir().join(format!("qwen-pipeline-bench-{}", std::process::id()));
    let root = demo::DemoSize::Full.write_snapshot(&dir).expect("demo snapshot");
    let snapshot = Snapshot::locate(root.to_str().expect("utf-8 path")).expect("snapshot");
    let options =
        LoadOptions { dtype: DType::BF16, modulation: args.modulation.mode(), ..LoadOptions::default() };
    let pipe =
        QwenImageEditPipeline::<G>::from_snapshot_random(snapshot, &options, 0, &dev(), &mut NoProgress)
            .expect("load");
    let _ = std::fs::remove_dir_all(&dir);
    let mut req =
        EditRequest::new(vec![demo::DemoSize::Full.sample_image().expect("image")], "Make it purple");
    req.num_steps = steps;
    (pipe, req)
}

/// The stages around the networks, as the edit runs them and part by part (see the module docs).
fn stages(args: &Args, pipe: &mut QwenImageEditPipeline<G>, req: &EditRequest) -> Value {
    println!("\n== stages around the networks: full-size pipeline (random bf16), 1024² ==");
    let t = Instant::now();
    let warm = pipe.edit(req, &ScheduleSpec::None, &mut NoProgress).expect("warm-up edit");
    println!("warm-up edit: {:.2} s ({} text tokens)", t.elapsed().as_secs_f64(), warm.report.text_tokens);
    let profile = pipe.profile_stages(req, args.reps).expect("profile");
    println!("{:<16} {:<34} {:>10} {:>10}", "stage", "part", "ms", "network");
    for s in &profile.stages {
        for p in &s.parts {
            let net = if p.network { "yes" } else { "" };
            println!("{:<16} {:<34} {:>10.2} {net:>10}", s.stage.label(), p.part, p.seconds * 1e3);
        }
        let overhead = s
            .overhead_fraction()
            .map_or(String::new(), |f| format!(" ({:+.1} % over the networks)", f * 1e2));
        println!(
            "{:<16} {:<34} {:>10.2}   networks {:.2} ms, overhead {:.2} ms{overhead}",
            s.stage.label(),
            "= whole stage, as the edit runs it",
            s.seconds * 1e3,
            s.network_seconds() * 1e3,
            s.overhead_seconds() * 1e3
        );
    }
    let overhead =
        profile.encodings_overhead_fraction().map_or(String::new(), |f| format!(" ({:+.1} %)", f * 1e2));
    println!(
        "{:<16} {:<34} {:>10.2}   networks {:.2} ms{overhead}",
        "encode both",
        "= image queued, then prompt (as the edit)",
        profile.encodings_seconds * 1e3,
        profile.encodings_network_seconds() * 1e3
    );
    let transfer = transfer_check(&demo::DemoSize::Full.sample_image().expect("image"));
    println!("bf16 upload / read-back converted on the host vs f32 transfer + cast: {transfer}");
    json!({
        "profile": profile, "prompt_tokens": profile.prompt_tokens, "transfer_check": transfer,
        "memory": gpu_memory("after profiling the stages"),
    })
}

/// Whether `transfer::upload_as` (bf16, converted on the host) and `transfer::read_f32` give the same bits as the
/// f32 upload + device cast and the device cast + f32 read-back they replaced, on the VAE input of `image` (every
/// 8-bit level) and on 2²⁰ random normal f32 values (magnitudes 2⁻¹⁵ … 2¹⁷, every mantissa pattern).
fn transfer_check(image: &qwen_image::processor::RgbImage) -> Value {
    use burn::tensor::TensorData;
    use qwen_image::transfer::{read_f32, upload_as};
    let mut values = qwen_image_pipeline::latents::image_values(image);
    values.extend((0..=255u8).map(|l| 2.0 * (l as f32 / 255.0) - 1.0));
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    values.extend((0..1 << 20).map(|_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let r = (state >> 32) as u32;
        f32::from_bits((r & 0x8000_0000) | ((0x70 + (r >> 23) % 32) << 23) | (r & 0x007f_ffff))
    }));
    let shape = [1, values.len()];
    let fast = upload_as::<G, 2>(&values, shape, DType::BF16, &dev());
    let cast = Tensor::<G, 2>::from_data(TensorData::new(values.clone(), shape), (&dev(), DType::F32))
        .cast(DType::BF16);
    let (a, b) = (fast.clone().into_data(), cast.into_data());
    let upload_mismatches =
        a.as_bytes().chunks(2).zip(b.as_bytes().chunks(2)).filter(|(x, y)| x != y).count();
    let read: Vec<f32> = fast.clone().cast(DType::F32).into_data().to_vec().expect("f32");
    let got = read_f32(fast).expect("read back");
    let read_mismatches = got.iter().zip(&read).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    json!({"values": values.len(), "upload_mismatches": upload_mismatches, "read_back_mismatches": read_mismatches,
           "bit_identical": upload_mismatches == 0 && read_mismatches == 0})
}

/// Per-image reuse: the same 1024² image edited with and without the VAE latents and vision embeddings cached.
fn reuse(args: &Args, pipe: &mut QwenImageEditPipeline<G>, req: &EditRequest) -> Value {
    use qwen_image_pipeline::{ReuseCache, Stage};
    println!("\n== per-image reuse: full-size pipeline (random bf16), 1024², {} steps ==", args.reuse_steps);
    let mut req = req.clone();
    req.num_steps = args.reuse_steps;
    let req = &req;
    let schedule = ScheduleSpec::None;
    let warm = pipe.edit(req, &schedule, &mut NoProgress).expect("warm-up edit"); // kernels compiled
    let encode = |r: &qwen_image_pipeline::EditReport| {
        (r.stage_seconds(Stage::EncodePrompt) + r.stage_seconds(Stage::EncodeImage)) * 1e3
    };
    let (mut miss, mut hit) = (Vec::new(), Vec::new());
    let mut identical = true;
    for _ in 0..args.reps.max(1) {
        let mut cache = ReuseCache::<G>::new(8 << 30);
        let first = pipe.edit_with(req, &schedule, &mut NoProgress, &mut cache).expect("edit");
        let second = pipe.edit_with(req, &schedule, &mut NoProgress, &mut cache).expect("edit");
        assert_eq!((first.report.image_reuse.misses, second.report.image_reuse.hits), (2, 2));
        identical &= first.latents == second.latents && second.latents == warm.latents;
        miss.push((encode(&first.report), first.report.total_seconds * 1e3));
        hit.push((encode(&second.report), second.report.total_seconds * 1e3));
    }
    let med = |v: &[(f64, f64)], i: usize| median(v.iter().map(|p| if i == 0 { p.0 } else { p.1 }).collect());
    let (miss_encode, hit_encode, miss_total, hit_total) =
        (med(&miss, 0), med(&hit, 0), med(&miss, 1), med(&hit, 1));
    println!("encode prompt + encode image: {miss_encode:.1} ms computed, {hit_encode:.1} ms reused");
    println!(
        "edit total: {miss_total:.1} ms first, {hit_total:.1} ms second (saving {:.1} ms)",
        miss_total - hit_total
    );
    println!("final latents bit-identical: {identical}");
    json!({
        "steps": args.reuse_steps, "reps": args.reps,
        "encode_ms_computed": miss_encode, "encode_ms_reused": hit_encode,
        "total_ms_first": miss_total, "total_ms_second": hit_total, "saving_ms": miss_total - hit_total,
        "latents_bit_identical": identical, "memory": gpu_memory("after reuse"),
    })
}

fn main() {
    let args = Args::parse();
    log_to_stderr();
    // burn's compiled kernels and autotune results persist across runs (before any CUDA tensor exists).
    println!("burn kernel caches: {:?}", qwen_image::cuda::configure_runtime_caches(None));
    let mut results = serde_json::Map::new();
    results.insert("memory_at_start".into(), gpu_memory("at start"));
    if !args.skip_text_encoder {
        results.insert("text_encoder".into(), text_encoder(args.reps));
    }
    if !args.skip_vae {
        results.insert("vae".into(), vae(args.reps));
    }
    if let Some(dir) = &args.load_dir {
        results.insert("load".into(), load(&args, dir));
    }
    if args.stages || args.reuse {
        let (mut pipe, req) = full_pipeline(&args, 4);
        if args.stages {
            results.insert("stages".into(), stages(&args, &mut pipe, &req));
        }
        if args.reuse {
            results.insert("reuse".into(), reuse(&args, &mut pipe, &req));
        }
    }
    results.insert("fast_path".into(), fast_path_json());
    std::fs::write(&args.json, serde_json::to_string_pretty(&Value::Object(results)).expect("json"))
        .expect("write json");
    println!("\nwrote {}", args.json);
}
