//! LoRA for the DiT (e.g. the Qwen-Image-Lightning LoRAs): merged into the weights at load time, or attached at run
//! time so that several LoRAs can be swapped without reloading the model.
//!
//! How to use:
//!
//! ```no_run
//! # use qwen_image::{dit::QwenImageTransformer, CpuBackend};
//! # use qwen_image_pipeline::lora::LoraWeights;
//! # fn demo(model: &mut QwenImageTransformer<CpuBackend>) -> qwen_image_pipeline::Result<()> {
//! let lora = LoraWeights::load("Qwen-Image-Edit-Lightning-4steps-V1.0.safetensors".as_ref(), model.num_layers())?;
//! // Either bake it in (W + alpha/rank · up·down, computed in f32, stored in the model dtype) …
//! lora.merge_into(model, 1.0)?;
//! // … or attach it at run time and detach it later (y = W·x + b + alpha/rank · up(down(x))).
//! let id = lora.attach(model, 1.0)?;
//! lora.detach(model, id);
//! # Ok(()) }
//! ```
//!
//! Accepted key conventions (the same conversions as diffusers' `_convert_non_diffusers_qwen_lora_to_diffusers`,
//! <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/loaders/lora_conversion_utils.py#L2221>): `{module}.lora_down.weight` / `.lora_up.weight`,
//! `{module}.lora_A.weight` / `.lora_B.weight` (also with a `.default` infix: `lora_A.default.weight`), optional
//! `{module}.alpha` (scale `alpha / rank`; without it the scale is 1), an optional `diffusion_model.`,
//! `transformer.` or `base_model.model.` prefix, and kohya names (`lora_unet_transformer_blocks_0_attn_to_q.…`).
//! `{module}` is any linear layer of the DiT (`transformer_blocks.{i}.attn.to_q`, `….img_mlp.net.0.proj`,
//! `proj_out`, …). A key that names no layer of the model, a missing half of a pair or a wrong shape is an error
//! that lists the offending keys; nothing is changed then.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::{DType, Tensor, TensorData};
use qwen_image::{
    dit::{dit_linear_names, DitConfig, QwenImageTransformer},
    nn::{LinearLayer, LowRankAdapter, LowRankUpdate},
    ops::QwenBackend,
    weights::WeightStore,
};

use crate::{PipelineError, Result};

/// The low-rank update of one linear layer, on the host in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModule {
    /// `[rank, in_features]`, row-major.
    pub down: Vec<f32>,
    /// `[out_features, rank]`, row-major.
    pub up: Vec<f32>,
    /// Rank.
    pub rank: usize,
    /// Input features of the layer.
    pub in_features: usize,
    /// Output features of the layer.
    pub out_features: usize,
    /// `alpha` from the file, if present.
    pub alpha: Option<f32>,
}

impl LoraModule {
    /// `alpha / rank` (1 without alpha), the factor of `up·down`.
    pub fn scale(&self) -> f32 {
        self.alpha.map_or(1.0, |a| a / self.rank as f32)
    }
}

/// A LoRA file, parsed and mapped onto the DiT's linear layers.
#[derive(Clone, Debug)]
pub struct LoraWeights {
    /// The file it was read from.
    pub path: PathBuf,
    /// Module path (diffusers naming, e.g. `transformer_blocks.3.attn.to_q`) → update.
    pub modules: BTreeMap<String, LoraModule>,
}

/// Every linear layer of `model` with its diffusers path (the model's [visitor](QwenImageTransformer::visit_linears_mut)).
fn linears_mut<B: QwenBackend>(
    model: &mut QwenImageTransformer<B>,
) -> Vec<(String, &mut dyn LinearLayer<B>)> {
    let mut layers = Vec::new();
    model.visit_linears_mut(|name, layer| layers.push((name.to_string(), layer)));
    layers
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Splits a normalized key into (module, part).
fn split_key(key: &str) -> Option<(&str, Part)> {
    for (suffix, part) in [
        (".lora_down.weight", Part::Down),
        (".lora_A.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".lora_B.weight", Part::Up),
        (".alpha", Part::Alpha),
    ] {
        if let Some(module) = key.strip_suffix(suffix) {
            return Some((module, part));
        }
    }
    None
}

/// Maps a key of any accepted convention to diffusers naming (`module.lora_down.weight` etc.).
fn normalize_key(key: &str, kohya: &HashMap<String, String>) -> String {
    let mut k = key.to_string();
    loop {
        let before = k.len();
        for prefix in ["diffusion_model.", "transformer.", "base_model.model."] {
            if let Some(rest) = k.strip_prefix(prefix) {
                k = rest.to_string();
            }
        }
        if k.len() == before {
            break;
        }
    }
    k = k.replace(".default.", ".");
    if let Some(rest) = k.strip_prefix("lora_unet_") {
        let (flat, suffix) = rest.split_once('.').unwrap_or((rest, ""));
        if let Some(path) = kohya.get(flat) {
            k = if suffix.is_empty() { path.clone() } else { format!("{path}.{suffix}") };
        }
    }
    k
}

fn lora_err(path: &Path, reason: impl Into<String>) -> PipelineError {
    PipelineError::Lora { path: path.to_path_buf(), reason: reason.into() }
}

fn list(keys: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = keys.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(" and {} more", keys.len() - SHOWN));
    }
    s
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl LoraWeights {
    /// Reads a LoRA safetensors file for a DiT with `num_layers` blocks and maps every key onto a layer.
    ///
    /// Errors (listing the keys) when a key names no layer of such a DiT or is not a LoRA tensor, when a
    /// `down`/`up` pair is incomplete, when ranks disagree within a pair, or when the file holds no LoRA at all.
    pub fn load(path: &Path, num_layers: usize) -> Result<Self> {
        let mut store = WeightStore::open_files(&[path.to_path_buf()], DType::F32)?;
        let paths = dit_linear_names(&DitConfig { num_layers, ..DitConfig::default() })?;
        let kohya: HashMap<String, String> = paths.iter().map(|p| (p.replace('.', "_"), p.clone())).collect();
        let known: std::collections::HashSet<&str> = paths.iter().map(String::as_str).collect();

        type Parts = (Option<(Vec<f32>, Vec<usize>)>, Option<(Vec<f32>, Vec<usize>)>, Option<f32>);
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let mut unmatched = Vec::new();
        let keys: Vec<String> = store.keys().into_iter().map(String::from).collect();
        for key in keys {
            let norm = normalize_key(&key, &kohya);
            let Some((module, part)) = split_key(&norm) else {
                unmatched.push(key);
                continue;
            };
            if !known.contains(module) {
                unmatched.push(key);
                continue;
            }
            let entry = parts.entry(module.to_string()).or_default();
            match part {
                Part::Down => entry.0 = Some(store.host_f32(&key)?),
                Part::Up => entry.1 = Some(store.host_f32(&key)?),
                Part::Alpha => {
                    // A scalar of any numeric dtype: the Lightning authors' merge code reads it with `float(t)`, so
                    // an integer alpha (I64/I32, 0-d or one element) is as valid as a float one.
                    let shape = store.shape(&key).unwrap_or_default();
                    if shape.iter().product::<usize>() != 1 {
                        return Err(lora_err(path, format!("`{key}` must be a scalar, has shape {shape:?}")));
                    }
                    entry.2 = Some(store.scalar(&key)? as f32);
                }
            }
        }
        if !unmatched.is_empty() {
            return Err(lora_err(
                path,
                format!(
                    "{} key(s) match no linear layer of a {num_layers}-block Qwen-Image DiT (is it a LoRA for \
                     another model?): {}",
                    unmatched.len(),
                    list(&unmatched)
                ),
            ));
        }
        let mut modules = BTreeMap::new();
        let mut incomplete = Vec::new();
        for (module, (down, up, alpha)) in parts {
            let (Some((down, ds)), Some((up, us))) = (down, up) else {
                incomplete.push(module);
                continue;
            };
            if ds.len() != 2 || us.len() != 2 || ds[0] != us[1] || ds[0] == 0 {
                return Err(lora_err(
                    path,
                    format!("`{module}`: down {ds:?} and up {us:?} are not [rank, in] and [out, rank]"),
                ));
            }
            let m = LoraModule { rank: ds[0], in_features: ds[1], out_features: us[0], down, up, alpha };
            modules.insert(module, m);
        }
        if !incomplete.is_empty() {
            return Err(lora_err(path, format!("incomplete down/up pairs for: {}", list(&incomplete))));
        }
        if modules.is_empty() {
            return Err(lora_err(path, "the file holds no LoRA weights"));
        }
        Ok(LoraWeights { path: path.to_path_buf(), modules })
    }

    /// Checks every module against the model's layer shapes (and, to `merge`, that the layers can take a merge) before
    /// anything is changed.
    fn check<B: QwenBackend>(&self, layers: &[(String, &mut dyn LinearLayer<B>)], merge: bool) -> Result<()> {
        let shapes: HashMap<&str, [usize; 2]> = layers.iter().map(|(p, l)| (p.as_str(), l.shape())).collect();
        let mergeable: std::collections::HashSet<&str> =
            layers.iter().filter(|(_, l)| l.can_merge()).map(|(p, _)| p.as_str()).collect();
        let mut bad = Vec::new();
        for (module, m) in &self.modules {
            match shapes.get(module.as_str()) {
                Some(_) if merge && !mergeable.contains(module.as_str()) => bad
                    .push(format!("{module} (FP8 weights read already quantized: attach the LoRA instead)")),
                Some([out, inp]) if *out == m.out_features && *inp == m.in_features => {}
                Some([out, inp]) => bad
                    .push(format!("{module} (LoRA {}x{}, layer {out}x{inp})", m.out_features, m.in_features)),
                None => bad.push(format!("{module} (no such layer)")),
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(lora_err(&self.path, format!("does not match the model: {}", list(&bad))))
        }
    }

    /// Merges the LoRA into the weights: `W ← W + multiplier · alpha/rank · up·down`, computed in f32 and stored in
    /// the model dtype (see [`LinearLayer::merge_low_rank`]; a layer deferred on the host, such as a modulation
    /// layer in table mode, applies it whenever its weight is made on the device; an FP8 layer merges it into its
    /// unquantized weight and quantizes again, so the model holds `quantize(W + update)`). Errors before changing
    /// anything when a targeted layer holds FP8 weights read already quantized. Returns the number of layers changed.
    pub fn merge_into<B: QwenBackend>(
        &self,
        model: &mut QwenImageTransformer<B>,
        multiplier: f32,
    ) -> Result<usize> {
        let mut layers = linears_mut(model);
        self.check(&layers, true)?;
        let mut n = 0;
        for (path, lin) in layers.iter_mut() {
            let Some(m) = self.modules.get(path.as_str()) else { continue };
            lin.merge_low_rank(LowRankUpdate {
                down: TensorData::new(m.down.clone(), [m.rank, m.in_features]),
                up: TensorData::new(m.up.clone(), [m.out_features, m.rank]),
                scale: m.scale() * multiplier,
            })?;
            n += 1;
        }
        Ok(n)
    }

    /// Attaches the LoRA as runtime adapters (`y = W·x + b + multiplier · alpha/rank · up(down(x))`, in the model
    /// dtype); returns the id that [`detach`](Self::detach) takes.
    pub fn attach<B: QwenBackend>(
        &self,
        model: &mut QwenImageTransformer<B>,
        multiplier: f32,
    ) -> Result<u64> {
        let dtype = model.dtype();
        let device = model.device().clone();
        let mut layers = linears_mut(model);
        self.check(&layers, false)?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        for (path, lin) in layers.iter_mut() {
            let Some(m) = self.modules.get(path.as_str()) else { continue };
            let (down, up) = self.tensors::<B>(m, dtype, &device);
            lin.adapters_mut().push(LowRankAdapter { id, down, up, scale: m.scale() * multiplier });
        }
        Ok(id)
    }

    /// Removes the runtime adapters attached under `id`; returns how many layers had one.
    pub fn detach<B: QwenBackend>(&self, model: &mut QwenImageTransformer<B>, id: u64) -> usize {
        detach_adapters(model, id)
    }

    fn tensors<B: QwenBackend>(
        &self,
        m: &LoraModule,
        dtype: DType,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let down = TensorData::new(m.down.clone(), [m.rank, m.in_features]);
        let up = TensorData::new(m.up.clone(), [m.out_features, m.rank]);
        // Through `QwenBackend::upload`: burn's own upload would keep a pinned host copy of every adapter.
        (B::upload::<2>(down, device).cast(dtype), B::upload::<2>(up, device).cast(dtype))
    }

    /// Number of layers the LoRA changes.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether the LoRA changes no layer (never true for a loaded file).
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

/// Removes every runtime adapter attached under `id` from `model`; returns how many layers had one.
pub fn detach_adapters<B: QwenBackend>(model: &mut QwenImageTransformer<B>, id: u64) -> usize {
    let mut n = 0;
    for (_, lin) in linears_mut(model) {
        let adapters = lin.adapters_mut();
        let before = adapters.len();
        adapters.retain(|a| a.id != id);
        n += usize::from(adapters.len() != before);
    }
    n
}

/// Ids of the runtime adapters attached to `model`, in attachment order.
pub fn attached_adapters<B: QwenBackend>(model: &QwenImageTransformer<B>) -> Vec<u64> {
    let mut ids: Vec<u64> = Vec::new();
    model.visit_linears(|_, lin| {
        for a in lin.adapters() {
            if !ids.contains(&a.id) {
                ids.push(a.id);
            }
        }
    });
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_every_convention_normalize_to_diffusers_names() {
        let paths = dit_linear_names(&DitConfig { num_layers: 2, ..DitConfig::default() }).unwrap();
        let kohya: HashMap<String, String> = paths.iter().map(|p| (p.replace('.', "_"), p.clone())).collect();
        let cases = [
            (
                "transformer_blocks.1.attn.to_q.lora_down.weight",
                "transformer_blocks.1.attn.to_q.lora_down.weight",
            ),
            (
                "diffusion_model.transformer_blocks.0.attn.to_out.0.lora_A.default.weight",
                "transformer_blocks.0.attn.to_out.0.lora_A.weight",
            ),
            (
                "transformer.transformer_blocks.0.img_mlp.net.2.lora_B.weight",
                "transformer_blocks.0.img_mlp.net.2.lora_B.weight",
            ),
            (
                "lora_unet_transformer_blocks_1_attn_add_k_proj.alpha",
                "transformer_blocks.1.attn.add_k_proj.alpha",
            ),
            (
                "lora_unet_transformer_blocks_0_txt_mlp_net_0_proj.lora_up.weight",
                "transformer_blocks.0.txt_mlp.net.0.proj.lora_up.weight",
            ),
            ("lora_unet_norm_out_linear.lora_down.weight", "norm_out.linear.lora_down.weight"),
            ("base_model.model.proj_out.lora_A.weight", "proj_out.lora_A.weight"),
        ];
        for (key, want) in cases {
            assert_eq!(normalize_key(key, &kohya), want, "{key}");
        }
        assert_eq!(split_key("a.b.lora_up.weight"), Some(("a.b", Part::Up)));
        assert_eq!(split_key("a.b.dora_scale"), None);
        assert_eq!(paths.len(), 6 + 2 * 14);
    }
}
