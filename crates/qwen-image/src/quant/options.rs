//! [`Fp8Options`]: which linear layers of the DiT get FP8 weights, as a list of the layers kept in the model's dtype.

use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

/// The layers published ablations keep in bf16 (ModelOpt's Qwen-Image recipe in sglang, the vLLM-Omni quality fix):
/// the input and output projections, the timestep embedder, the modulation layers and the image MLP's second layer.
pub const DEFAULT_KEEP: [&str; 8] = [
    "img_in",
    "txt_in",
    "time_text_embed.timestep_embedder",
    "norm_out.linear",
    "proj_out",
    "img_mod",
    "txt_mod",
    "img_mlp.net.2",
];

/// The entry of [`DEFAULT_KEEP`] that low-memory mode quantizes too ([`Fp8Options::low_memory`]): its FP8 weights
/// take 2.1 GiB less at full size and changed no edit of the proxy benchmark (docs/fp8.md: 0 of 120, −0.01 dB mean
/// against the default list).
pub const LOW_MEMORY_QUANTIZES: &str = "img_mlp.net.2";

/// FP8 weights for the DiT's linear layers: e4m3 with one f32 scale per output channel, quantized at load time from
/// the checkpoint (after merging LoRAs), every layer but those [`keep`](Self::keep) names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fp8Options {
    /// Layers kept in the model's dtype. An entry names every layer whose checkpoint name (`img_in`,
    /// `transformer_blocks.3.attn.to_q`, …) contains it as whole dot-separated parts: `img_mod` keeps every block's
    /// `img_mod.1`, `attn.to_out` every `attn.to_out.0`, `transformer_blocks.0` all of block 0. An entry that names
    /// no layer of the model is an error. Default: [`DEFAULT_KEEP`].
    pub keep: Vec<String>,
    /// The DiT's joint attention in 8 bits too: Q·Kᵀ on int8 with the keys' mean subtracted, P·V in e4m3
    /// ([`quant::attention`](crate::quant::attention)). Off by default.
    #[serde(default)]
    pub attention: bool,
    /// The pruning cache's keys and values in 8 bits: e4m3 with one f32 scale per token, as an FP8 layer's
    /// activations are quantized ([`QwenBackend::quantize_activation_fp8`](crate::ops::QwenBackend)), restored to
    /// the model's dtype where a block reuses them. A little more than half the cache's bytes (`cat` at full size:
    /// 1.41 instead of 2.81 GiB), so a cache budget holds almost twice the blocks. Off by default.
    #[serde(default)]
    pub cache: bool,
}

impl Default for Fp8Options {
    fn default() -> Self {
        Fp8Options {
            keep: DEFAULT_KEEP.iter().map(|s| s.to_string()).collect(),
            attention: false,
            cache: false,
        }
    }
}

impl Fp8Options {
    /// Options keeping exactly `keep` (no default entries).
    pub fn keeping<S: Into<String>>(keep: impl IntoIterator<Item = S>) -> Self {
        Fp8Options { keep: keep.into_iter().map(Into::into).collect(), attention: false, cache: false }
    }

    /// The options of low-memory mode: [`DEFAULT_KEEP`] but [`LOW_MEMORY_QUANTIZES`], attention in the model's
    /// dtype.
    pub fn low_memory() -> Self {
        Fp8Options::keeping(DEFAULT_KEEP.into_iter().filter(|&name| name != LOW_MEMORY_QUANTIZES))
    }

    /// Options from a comma-separated keep list as the command line takes it: `default` stands for
    /// [`DEFAULT_KEEP`] (so `default,transformer_blocks.0` adds to it) and `none` (alone) quantizes every layer.
    pub fn parse_keep(list: &str) -> Result<Self> {
        let entries: Vec<&str> = list.split(',').map(str::trim).collect();
        if entries == ["none"] {
            return Ok(Fp8Options::keeping(Vec::<String>::new()));
        }
        let mut keep = Vec::new();
        for entry in entries {
            match entry {
                "" => return Err(ModelError::invalid(format!("empty entry in the FP8 keep list `{list}`"))),
                "none" => {
                    return Err(ModelError::invalid(format!(
                        "`none` in the FP8 keep list `{list}` must stand alone (it quantizes every layer)"
                    )))
                }
                "default" => keep.extend(DEFAULT_KEEP.iter().map(|s| s.to_string())),
                name => keep.push(name.to_string()),
            }
        }
        Ok(Fp8Options { keep, attention: false, cache: false })
    }

    /// Whether the layer `name` (a checkpoint name such as `transformer_blocks.3.img_mlp.net.2`) stays in the
    /// model's dtype.
    pub fn keeps(&self, name: &str) -> bool {
        self.keep.iter().any(|entry| names_part(entry, name))
    }

    /// Checks the keep list against the model's layer names: every entry must name at least one layer.
    pub fn check(&self, layers: &[String]) -> Result<()> {
        let unknown: Vec<&str> = self
            .keep
            .iter()
            .filter(|entry| !layers.iter().any(|layer| names_part(entry, layer)))
            .map(String::as_str)
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        Err(ModelError::invalid(format!(
            "the FP8 keep list names no layer of the model: {} (entries are checkpoint names or whole dot-separated \
             parts of them, such as `img_in`, `img_mlp.net.2`, `attn.to_out` or `transformer_blocks.0`)",
            unknown.join(", ")
        )))
    }
}

/// Whether `entry`'s dot-separated parts appear, consecutively and whole, in `name`'s.
fn names_part(entry: &str, name: &str) -> bool {
    let want: Vec<&str> = entry.split('.').collect();
    let have: Vec<&str> = name.split('.').collect();
    !entry.is_empty() && have.windows(want.len()).any(|w| w == want.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_match_whole_parts_of_layer_names() {
        let options = Fp8Options::default();
        for kept in [
            "img_in",
            "txt_in",
            "time_text_embed.timestep_embedder.linear_1",
            "norm_out.linear",
            "proj_out",
            "transformer_blocks.7.img_mod.1",
            "transformer_blocks.0.txt_mod.1",
            "transformer_blocks.2.img_mlp.net.2",
        ] {
            assert!(options.keeps(kept), "{kept}");
        }
        for quantized in [
            "transformer_blocks.2.img_mlp.net.0.proj",
            "transformer_blocks.2.txt_mlp.net.2",
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.to_out.0",
        ] {
            assert!(!options.keeps(quantized), "{quantized}");
        }
        // Parts are whole: `img` names nothing, `blocks.1` is not `transformer_blocks.1`, `1` is not `10`.
        let layers = ["transformer_blocks.10.attn.to_q".to_string(), "img_in".to_string()];
        for entry in ["img", "blocks.10", "transformer_blocks.1"] {
            assert!(Fp8Options::keeping([entry]).check(&layers).is_err(), "{entry}");
        }
        assert!(Fp8Options::keeping(["transformer_blocks.10", "attn.to_q"]).check(&layers).is_ok());
    }

    #[test]
    fn the_command_line_list_expands_default_and_rejects_empty_entries() {
        assert_eq!(Fp8Options::parse_keep("default").unwrap(), Fp8Options::default());
        let more = Fp8Options::parse_keep("default, transformer_blocks.0").unwrap();
        assert_eq!(more.keep.len(), DEFAULT_KEEP.len() + 1);
        assert_eq!(more.keep.last().unwrap(), "transformer_blocks.0");
        assert!(Fp8Options::parse_keep("none").unwrap().keep.is_empty());
        for bad in ["img_in,,proj_out", "", "none,img_in"] {
            assert!(Fp8Options::parse_keep(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unknown_entries_are_listed_in_the_error() {
        let layers = vec!["img_in".to_string(), "transformer_blocks.0.attn.to_q".to_string()];
        let err = Fp8Options::keeping(["img_in", "img_out", "to_k"]).check(&layers).unwrap_err().to_string();
        assert!(err.contains("img_out, to_k") && !err.contains("img_in,"), "{err}");
    }
}
