//! Synthetic weights, for running and benchmarking the full-size networks without their checkpoints.
//!
//! - [`init_for`]: the values a random weight gets, from its key and shape (used by
//!   [`WeightStore::random`](crate::weights::WeightStore::random)): projection and convolution weights
//!   `N(0, gain²/fan_in)` (`fan_in` = product of all dimensions but the first; gain ½ for the DiT's modulation
//!   projections), biases `N(0, 0.02²)`, norm weights (rank 1) and VAE `gamma`s 1. With these every network stays
//!   finite through all its layers (60 DiT blocks, 28 language-model layers, 32 vision blocks).
//! - [`key_seed`], [`fill_f32`], [`fill_bf16_bytes`]: a fast, deterministic host generator (SplitMix64) keyed by
//!   a seed and the weight's name, so that the same seed gives the same weights whatever the loading order.
//! - [`expected_tensors`]: the key and shape list of the checkpoint a loader expects, from the loader itself run on
//!   a [shape-only store](crate::weights::WeightStore::shape_only) ([`dit_checkpoint_tensors`],
//!   [`vae_checkpoint_tensors`], [`text_encoder_checkpoint_tensors`]).
//! - [`write_random_checkpoint`]: a random bf16 checkpoint (e.g. of the DiT's tensors) in diffusers'
//!   layout (`diffusion_pytorch_model-0000i-of-0000n.safetensors` shards and their
//!   `diffusion_pytorch_model.safetensors.index.json`), written shard by shard with a small buffer (the full-size
//!   41 GB checkpoint needs no 41 GB of memory), to measure loading.
//!
//! How to use:
//!
//! ```no_run
//! use qwen_image::{dit::DitConfig, synthetic};
//! # fn main() -> qwen_image::Result<()> {
//! let config = DitConfig { num_layers: 2, ..DitConfig::default() };
//! let dir = std::path::Path::new("/tmp/random-dit");
//! let written = synthetic::write_random_checkpoint(
//!     dir,
//!     "diffusion_pytorch_model",
//!     &synthetic::dit_checkpoint_tensors(&config)?,
//!     5 << 30,
//!     0,
//! )?;
//! std::fs::write(dir.join("config.json"), synthetic::dit_config_json(&config)).unwrap();
//! println!("{} bytes in {} shards", written.bytes, written.shards.len());
//! # Ok(()) }
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::DType;

use crate::{
    dit::{DitConfig, QwenImageTransformer},
    text_encoder::{Qwen25VlConfig, Qwen25VlTextEncoder},
    vae::{AutoencoderKLQwenImage, VaeConfig},
    weights::WeightStore,
    CpuBackend, ModelError, Result,
};

/// How a synthetic weight is initialized.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All ones (norm scales).
    Ones,
    /// Zero-mean with this standard deviation (normal on the device; uniform with the same deviation on the host).
    Random {
        /// Standard deviation.
        std: f64,
    },
}

/// The initialization of the weight `key` of shape `shape` (see the [module docs](self)).
pub fn init_for(key: &str, shape: &[usize]) -> Init {
    let name = key.rsplit('.').next().unwrap_or(key);
    if name == "bias" {
        return Init::Random { std: 0.02 };
    }
    if name == "gamma" || shape.len() <= 1 {
        return Init::Ones;
    }
    let fan_in: usize = shape[1..].iter().product();
    let gain = if key.contains("_mod.") { 0.5 } else { 1.0 };
    Init::Random { std: gain / (fan_in.max(1) as f64).sqrt() }
}

/// SplitMix64 step: advances `state` and returns 64 well-mixed bits.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed for the weight `key` under the store seed `seed` (FNV-1a of the key, mixed with the seed).
pub fn key_seed(seed: u64, key: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    let mut s = h ^ seed.rotate_left(17);
    splitmix(&mut s)
}

/// Fills `out` with uniform values of standard deviation `std` (in `[-√3·std, √3·std]`) from `seed`.
pub fn fill_f32(seed: u64, std: f64, out: &mut [f32]) {
    let scale = (std * 3f64.sqrt() / 32768.0) as f32;
    let mut state = seed;
    for chunk in out.chunks_mut(4) {
        let r = splitmix(&mut state);
        for (i, v) in chunk.iter_mut().enumerate() {
            *v = f32::from((r >> (16 * i)) as u16 as i16) * scale;
        }
    }
}

/// Bytes per independently seeded block of [`fill_bf16_bytes`] (the values do not depend on the thread count).
const BLOCK_BYTES: usize = 1 << 20;

/// Fills `out` (little-endian bf16 values, even length) like [`fill_f32`], or with ones for [`Init::Ones`].
/// `first_block` numbers the 1 MiB blocks of `out` within the whole tensor (each block has its own stream), so a
/// tensor can be generated in pieces of whole blocks with the same result. Uses every core.
pub fn fill_bf16_bytes(seed: u64, init: Init, first_block: u64, out: &mut [u8]) {
    let std = match init {
        Init::Ones => {
            let one = half::bf16::ONE.to_le_bytes();
            for pair in out.chunks_exact_mut(2) {
                pair.copy_from_slice(&one);
            }
            return;
        }
        Init::Random { std } => std,
    };
    let scale = (std * 3f64.sqrt() / 32768.0) as f32;
    let fill_block = |block: u64, bytes: &mut [u8]| {
        let mut state = seed ^ block.wrapping_mul(0xD1B5_4A32_D192_ED03);
        for chunk in bytes.chunks_mut(8) {
            let r = splitmix(&mut state);
            for (i, pair) in chunk.chunks_exact_mut(2).enumerate() {
                let v = f32::from((r >> (16 * i)) as u16 as i16) * scale;
                pair.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
        }
    };
    let blocks: Vec<(u64, &mut [u8])> =
        out.chunks_mut(BLOCK_BYTES).enumerate().map(|(i, b)| (first_block + i as u64, b)).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(blocks.len().max(1));
    if threads <= 1 {
        for (i, b) in blocks {
            fill_block(i, b);
        }
        return;
    }
    let mut per_thread: Vec<Vec<(u64, &mut [u8])>> = (0..threads).map(|_| Vec::new()).collect();
    for (n, block) in blocks.into_iter().enumerate() {
        per_thread[n % threads].push(block);
    }
    std::thread::scope(|s| {
        for work in per_thread {
            s.spawn(move || {
                for (i, b) in work {
                    fill_block(i, b);
                }
            });
        }
    });
}

/// Key and shape of every tensor `build` reads from a [shape-only store](WeightStore::shape_only), in reading
/// order: the checkpoint a loader expects, listed by the same code that loads it (nothing is allocated).
pub fn expected_tensors<T>(
    build: impl FnOnce(&mut WeightStore) -> Result<T>,
) -> Result<Vec<(String, Vec<usize>)>> {
    let mut store = WeightStore::shape_only(DType::F32);
    build(&mut store)?;
    Ok(store.created().to_vec())
}

/// Every tensor of a diffusers `QwenImageTransformer2DModel` checkpoint for `config`, with its shape, in the order
/// the loader reads them (top-level input layers, the blocks, the output layers).
pub fn dit_checkpoint_tensors(config: &DitConfig) -> Result<Vec<(String, Vec<usize>)>> {
    expected_tensors(|store| {
        QwenImageTransformer::<CpuBackend>::from_store(config.clone(), store, &Default::default())
    })
}

/// Every tensor of a diffusers `AutoencoderKLQwenImage` checkpoint for `config` that the loader reads (all of
/// them, including the resamplers' `time_conv`s it checks and skips), with its shape.
pub fn vae_checkpoint_tensors(config: &VaeConfig) -> Result<Vec<(String, Vec<usize>)>> {
    expected_tensors(|store| {
        AutoencoderKLQwenImage::<CpuBackend>::from_store(config.clone(), store, &Default::default())
    })
}

/// Every tensor of a `Qwen2_5_VLForConditionalGeneration` checkpoint for `config` in the legacy key naming
/// (`model.*`, `visual.*`) that the text encoder reads, with its shape: all of them but `lm_head.weight`.
pub fn text_encoder_checkpoint_tensors(config: &Qwen25VlConfig) -> Result<Vec<(String, Vec<usize>)>> {
    expected_tensors(|store| {
        Qwen25VlTextEncoder::<CpuBackend>::from_store(config.clone(), store, &Default::default())
    })
}

/// A diffusers `transformer/config.json` for `config`.
pub fn dit_config_json(config: &DitConfig) -> String {
    let json = serde_json::json!({
        "_class_name": "QwenImageTransformer2DModel",
        "attention_head_dim": config.attention_head_dim,
        "axes_dims_rope": config.axes_dims_rope,
        "guidance_embeds": config.guidance_embeds,
        "in_channels": config.in_channels,
        "joint_attention_dim": config.joint_attention_dim,
        "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_layers,
        "out_channels": config.out_features() / (config.patch_size * config.patch_size),
        "patch_size": config.patch_size,
        "zero_cond_t": config.zero_cond_t,
        "use_additional_t_cond": config.use_additional_t_cond,
        "use_layer3d_rope": config.use_layer3d_rope,
    });
    serde_json::to_string_pretty(&json).expect("a JSON value serializes")
}

/// What [`write_random_checkpoint`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct WrittenCheckpoint {
    /// The shard files, in order.
    pub shards: Vec<PathBuf>,
    /// The `{stem}.safetensors.index.json` file.
    pub index: PathBuf,
    /// Bytes of tensor data (the index's `total_size`).
    pub bytes: u64,
}

/// The safetensors header of `tensors` (bf16, contiguous in order), padded with spaces to a multiple of 8 bytes.
fn safetensors_header(tensors: &[&(String, Vec<usize>)]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (key, shape) in tensors {
        let bytes = 2 * shape.iter().product::<usize>();
        map.insert(
            key.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::Value::Object(map).to_string().into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    header
}

/// Writes `tensors` with random bf16 values (see [`init_for`], seeded by `seed` and each key) as
/// `dir/{stem}-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes` of data each (a larger tensor gets
/// a shard of its own), plus `dir/{stem}.safetensors.index.json`, as diffusers and transformers save sharded
/// checkpoints. Streams through a 64 MiB buffer; every file is written under a temporary name and renamed when
/// complete.
pub fn write_random_checkpoint(
    dir: &Path,
    stem: &str,
    tensors: &[(String, Vec<usize>)],
    max_shard_bytes: u64,
    seed: u64,
) -> Result<WrittenCheckpoint> {
    if tensors.is_empty() {
        return Err(ModelError::invalid("a checkpoint needs at least one tensor"));
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let size = |s: &[usize]| 2 * s.iter().product::<usize>() as u64;
    let mut groups: Vec<Vec<&(String, Vec<usize>)>> = vec![Vec::new()];
    let mut in_group = 0u64;
    for t in tensors {
        let bytes = size(&t.1);
        let last = groups.last_mut().expect("one group");
        if !last.is_empty() && in_group + bytes > max_shard_bytes {
            groups.push(Vec::new());
            in_group = 0;
        }
        groups.last_mut().expect("one group").push(t);
        in_group += bytes;
    }
    let n = groups.len();
    let mut shards = Vec::with_capacity(n);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut buffer = vec![0u8; 64 << 20];
    for (i, group) in groups.iter().enumerate() {
        let name = format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1);
        let path = dir.join(&name);
        let partial = dir.join(format!("{name}.partial"));
        let file = std::fs::File::create(&partial).map_err(|e| ModelError::io(&partial, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let header = safetensors_header(group);
        let io = |e| ModelError::io(&partial, e);
        w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for (key, shape) in group {
            let init = init_for(key, shape);
            let kseed = key_seed(seed, key);
            let mut left = size(shape) as usize;
            let mut block = 0u64;
            while left > 0 {
                let len = left.min(buffer.len());
                fill_bf16_bytes(kseed, init, block, &mut buffer[..len]);
                w.write_all(&buffer[..len]).map_err(io)?;
                block += (len / BLOCK_BYTES) as u64;
                left -= len;
            }
            weight_map.insert(key.clone(), name.clone().into());
            total += size(shape);
        }
        let file = w.into_inner().map_err(|e| ModelError::io(&partial, e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&partial, &path).map_err(|e| ModelError::io(&path, e))?;
        shards.push(path);
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    let json = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    crate::tensor_io::write_atomic(&index, json.to_string().as_bytes())?;
    Ok(WrittenCheckpoint { shards, index, bytes: total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_rules_follow_names_and_shapes() {
        assert_eq!(init_for("a.bias", &[8]), Init::Random { std: 0.02 });
        assert_eq!(init_for("txt_norm.weight", &[8]), Init::Ones);
        assert_eq!(init_for("decoder.norm_out.gamma", &[8, 1, 1, 1]), Init::Ones);
        assert_eq!(init_for("x.weight", &[8, 4, 3, 3]), Init::Random { std: 1.0 / 6.0 });
        assert_eq!(init_for("transformer_blocks.0.img_mod.1.weight", &[24, 4]), Init::Random { std: 0.25 });
    }

    #[test]
    fn host_values_have_the_asked_deviation_and_depend_on_seed_and_block() {
        let mut v = vec![0f32; 1 << 16];
        fill_f32(7, 0.5, &mut v);
        let var = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((var.sqrt() - 0.5).abs() < 0.01, "{}", var.sqrt());
        let mut a = vec![0u8; 3 * BLOCK_BYTES];
        fill_bf16_bytes(1, Init::Random { std: 1.0 }, 0, &mut a);
        // Generating the second and third blocks alone gives the same bytes.
        let mut b = vec![0u8; 2 * BLOCK_BYTES];
        fill_bf16_bytes(1, Init::Random { std: 1.0 }, 1, &mut b);
        assert_eq!(&a[BLOCK_BYTES..], &b[..]);
        assert_ne!(&a[..BLOCK_BYTES], &a[BLOCK_BYTES..2 * BLOCK_BYTES]);
        let mut c = vec![0u8; BLOCK_BYTES];
        fill_bf16_bytes(2, Init::Random { std: 1.0 }, 0, &mut c);
        assert_ne!(&a[..BLOCK_BYTES], &c[..]);
        let mut ones = vec![0u8; 4];
        fill_bf16_bytes(0, Init::Ones, 0, &mut ones);
        assert_eq!(ones, [0x80, 0x3f, 0x80, 0x3f]);
        assert_ne!(key_seed(0, "a"), key_seed(0, "b"));
        assert_ne!(key_seed(0, "a"), key_seed(1, "a"));
    }
}
