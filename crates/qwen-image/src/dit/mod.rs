//! The Qwen-Image MMDiT (`QwenImageTransformer2DModel`), generic over the burn backend.
//!
//! - [`config`](mod@config): `config.json`.
//! - [`rope`]: the 3-axis interleaved RoPE.
//! - [`timestep`]: sinusoidal timestep embedding.
//! - [`modulation`]: adaLN shift/scale/gate and `zero_cond_t` rows.
//! - [`modulation_table`]: the modulation layers' outputs per timestep, computed once ([`ModulationTable`]), and
//!   where their weights live ([`ModulationMode`]).
//! - [`attention`]: joint-attention projections with QK-RMSNorm.
//! - [`block`]: one double-stream block.
//! - [`linears`]: the linear layers by checkpoint name (LoRA targets, key lists).
//! - [`transformer`]: the model and its plain forward pass.
//! - [`planned`]: the forward pass under a pruning plan.

pub mod attention;
pub mod block;
pub mod config;
pub mod linears;
pub mod modulation;
pub mod modulation_table;
pub mod planned;
pub mod rope;
mod target_subset;
pub mod timestep;
pub mod transformer;

pub use config::DitConfig;
pub use linears::{dit_linear_names, dit_linear_plan};
pub use modulation_table::{ModulationMode, ModulationTable, ModulationTableUpdate};
pub use rope::ImageShape;
pub use transformer::{DitInput, DitLoadOptions, QwenImageTransformer};
