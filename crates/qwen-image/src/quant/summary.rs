//! [`LinearWeightSummary`]: how a model's linear layers hold their weights (FP8, dense, on the host) and the device
//! bytes that saves, for reports and dry runs.

use burn::tensor::DType;
use serde::{Deserialize, Serialize};

use crate::nn::WeightFormat;

/// How a model's linear layers hold their weights. Counts weights only (biases and norms stay in the model's dtype).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearWeightSummary {
    /// The model's dtype (`F32`, `BF16`).
    pub dtype: String,
    /// Layers with e4m3 weights on the device.
    pub fp8_layers: usize,
    /// Layers with weights in a float dtype on the device.
    pub dense_layers: usize,
    /// Layers whose weights stay on the host until used (the modulation layers in table mode).
    pub host_layers: usize,
    /// Device bytes of the FP8 layers' weights: one per weight plus an f32 scale per output channel.
    pub fp8_bytes: u64,
    /// What the FP8 layers' weights would take in the model's dtype.
    pub fp8_unquantized_bytes: u64,
    /// Device bytes of the dense layers' weights.
    pub dense_bytes: u64,
    /// The layers kept in the model's dtype (the FP8 keep list), when the model was quantized at load time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<Vec<String>>,
    /// Whether the joint attention runs in 8 bits too ([`Fp8Options::attention`](super::Fp8Options)).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fp8_attention: bool,
    /// Whether the pruning cache holds its keys and values in 8 bits ([`Fp8Options::cache`](super::Fp8Options)).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fp8_cache: bool,
}

impl LinearWeightSummary {
    /// An empty summary of a model in `dtype`.
    pub fn new(dtype: DType) -> Self {
        LinearWeightSummary { dtype: format!("{dtype:?}"), ..Default::default() }
    }

    /// Adds one layer of `shape` (`[out, in]`) held as `format`, on the device when `resident`, to a summary of a
    /// model in `dtype`.
    pub fn add(&mut self, shape: [usize; 2], format: WeightFormat, resident: bool, dtype: DType) {
        let [out, inp] = shape.map(|d| d as u64);
        match (resident, format) {
            (false, _) => self.host_layers += 1,
            (true, WeightFormat::Fp8E4M3) => {
                self.fp8_layers += 1;
                self.fp8_bytes += out * inp + 4 * out;
                self.fp8_unquantized_bytes += out * inp * dtype.size() as u64;
            }
            (true, WeightFormat::Dense(d)) => {
                self.dense_layers += 1;
                self.dense_bytes += out * inp * d.size() as u64;
            }
        }
    }

    /// Records the FP8 options the model was loaded with (its keep list, and whether its attention is 8-bit).
    pub fn set_fp8_options(&mut self, options: Option<&super::Fp8Options>) {
        self.keep = options.map(|o| o.keep.clone());
        self.fp8_attention = options.is_some_and(|o| o.attention);
        self.fp8_cache = options.is_some_and(|o| o.cache);
    }

    /// Device bytes FP8 saves: [`fp8_unquantized_bytes`](Self::fp8_unquantized_bytes) − [`fp8_bytes`](Self::fp8_bytes).
    pub fn saved_bytes(&self) -> u64 {
        self.fp8_unquantized_bytes.saturating_sub(self.fp8_bytes)
    }

    /// One line for people: `FP8 (e4m3, per-channel scales): 660 layers, 21.09 GiB → 10.56 GiB (10.54 GiB saved); …`.
    pub fn describe(&self) -> String {
        let gib = |b: u64| human_bytes(b);
        let mut line = if self.fp8_layers == 0 {
            format!(
                "no FP8 layers; {} layers in {}: {}",
                self.dense_layers,
                self.dtype,
                gib(self.dense_bytes)
            )
        } else {
            format!(
                "FP8 (e4m3, per-channel scales): {} layers, {} → {} ({} saved); {} layers in {}: {}",
                self.fp8_layers,
                gib(self.fp8_unquantized_bytes),
                gib(self.fp8_bytes),
                gib(self.saved_bytes()),
                self.dense_layers,
                self.dtype,
                gib(self.dense_bytes)
            )
        };
        if self.host_layers > 0 {
            line.push_str(&format!("; {} on the host (modulation table)", self.host_layers));
        }
        if let Some(keep) = self.keep.as_ref().filter(|k| !k.is_empty()) {
            line.push_str(&format!("; kept in {}: {}", self.dtype, keep.join(", ")));
        }
        if self.fp8_attention {
            line.push_str("; joint attention in 8 bits (int8 Q·Kᵀ, e4m3 P·V)");
        }
        if self.fp8_cache {
            line.push_str("; pruning cache's keys and values in 8 bits (e4m3, per-token scales)");
        }
        line
    }
}

/// `b` bytes in GiB, MiB or KiB (two decimals).
fn human_bytes(b: u64) -> String {
    let b = b as f64;
    match b {
        _ if b >= f64::from(1u32 << 30) => format!("{:.2} GiB", b / f64::from(1u32 << 30)),
        _ if b >= f64::from(1u32 << 20) => format!("{:.2} MiB", b / f64::from(1u32 << 20)),
        _ => format!("{:.2} KiB", b / 1024.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_per_format() {
        let mut s = LinearWeightSummary::new(DType::BF16);
        s.add([8, 4], WeightFormat::Fp8E4M3, true, DType::BF16);
        s.add([2, 4], WeightFormat::Dense(DType::BF16), true, DType::BF16);
        s.add([8, 4], WeightFormat::Dense(DType::BF16), false, DType::BF16);
        assert_eq!((s.fp8_layers, s.dense_layers, s.host_layers), (1, 1, 1));
        assert_eq!((s.fp8_bytes, s.fp8_unquantized_bytes, s.dense_bytes), (32 + 32, 64, 16));
        assert_eq!(s.saved_bytes(), 0);
        assert!(
            s.describe().starts_with("FP8 (e4m3, per-channel scales): 1 layers, 0.06 KiB"),
            "{}",
            s.describe()
        );
        assert_eq!(human_bytes(3 << 29), "1.50 GiB");
        assert_eq!(human_bytes(5 << 20), "5.00 MiB");
    }
}
