//! The modulation table: the outputs of every block's `img_mod.1` and `txt_mod.1` for the timesteps a caller needs,
//! computed once and looked up by the forward passes.
//!
//! The two modulation layers of each block hold a third of the DiT's parameters (6.8 B of 20.4 B, 12.7 GiB in
//! bf16), yet their only input is the timestep embedding: for one DiT call (its batch's timesteps) the whole output
//! is `blocks × (rows·batch + batch) × 6·dim` values, 6.6 MB in bf16 at full size. A sampler uses a few timesteps
//! (the Lightning schedule the same 4 in every edit), so the table is small and built once per process.
//!
//! - [`ModulationMode::Table`] (the default) leaves those weights on the host at load time ([`DeferredLinear`]:
//!   memory-mapped from the checkpoint, or made again by a random store). Building rows for new timesteps puts one
//!   layer at a time on the device (`[6·dim, dim]`, 113 MB at full size), computes every new timestep with it and
//!   drops it. [`ModulationMode::Resident`] keeps them on the device (rows can then also be computed per call,
//!   for any timestep, at no extra cost).
//! - **Exact**: each entry is computed by the same [`TransformerBlock::modulations`] code, on exactly the input
//!   tensor the forward pass would build for that call (same shape, same dtype), so the rows are bit-identical to
//!   the ones computed inside a forward pass on every backend (the CUDA GEMM picks its algorithm from the shape
//!   alone). LoRA updates of these layers are applied when a layer is made on the device (merged ones with the same
//!   operations as a merge into a resident weight, runtime adapters as such).
//! - **Stateless model**: the caller owns the table ([`QwenImageTransformer::extend_modulation_table`]) and hands
//!   it to a call in [`DitInput::modulation`]. A table remembers which weights it was built from: the mutable
//!   layer visitor (LoRA attach, detach, merge) gives the model new weights, after which its forward passes refuse
//!   the old table and `extend_modulation_table` empties it before adding rows.
//!
//! [`DeferredLinear`]: crate::nn::DeferredLinear

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::tensor::{backend::Backend, Tensor};

use super::{
    block::{BlockModulation, TransformerBlock},
    transformer::{DitInput, QwenImageTransformer},
};
use crate::{ops::QwenBackend, ModelError, Result};

/// Where the DiT's modulation weights (`img_mod.1`, `txt_mod.1`) live, chosen at load time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ModulationMode {
    /// On the host (memory-mapped), put on the device one layer at a time only to compute the
    /// [table](ModulationTable) rows of new timesteps: 12.7 GiB less device memory at full size in bf16.
    #[default]
    Table,
    /// On the device, as every other weight: rows for any timestep cost nothing extra to compute.
    Resident,
}

/// The key of one DiT call: the bits of its timesteps as the model rounds them.
type CallKey = Vec<u32>;

/// The modulations of every block for the DiT calls (timestep sets) seen so far; see the [module](self) docs.
///
/// Cheap to clone (entries are shared), so that each [`DitInput`] can carry one.
#[derive(Clone, Debug)]
pub struct ModulationTable<B: Backend> {
    /// Which weights of which model the rows were computed from (`None`: empty, not built yet).
    weights: Option<u64>,
    entries: BTreeMap<CallKey, Arc<[BlockModulation<B>]>>,
}

impl<B: Backend> Default for ModulationTable<B> {
    fn default() -> Self {
        ModulationTable { weights: None, entries: BTreeMap::new() }
    }
}

/// What [`QwenImageTransformer::extend_modulation_table`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModulationTableUpdate {
    /// Calls (timestep sets) whose rows were computed.
    pub added: usize,
    /// Whether the table was emptied first, because it was built from other weights (another model, or before a
    /// LoRA was attached, detached or merged).
    pub invalidated: bool,
    /// Bytes of deferred weights put on the device (one layer at a time) to compute the new rows.
    pub uploaded_bytes: usize,
}

impl<B: Backend> ModulationTable<B> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of calls (timestep sets) it holds rows for.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no rows.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The timesteps of each call it holds rows for, as the model rounded them, in ascending order of their bits.
    pub fn timesteps(&self) -> Vec<Vec<f32>> {
        self.entries.keys().map(|k| k.iter().map(|&b| f32::from_bits(b)).collect()).collect()
    }

    /// Device bytes of the rows it holds.
    pub fn size_bytes(&self) -> usize {
        self.entries.values().flat_map(|blocks| blocks.iter()).map(BlockModulation::size_bytes).sum()
    }

    /// Drops every row.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.weights = None;
    }

    /// The rows of the call `key` (timesteps `rounded`) of a model whose weights are `weights`.
    fn rows(&self, weights: u64, key: &CallKey, rounded: &[f32]) -> Result<Arc<[BlockModulation<B>]>> {
        if self.weights.is_some_and(|w| w != weights) {
            return Err(ModelError::invalid(
                "the modulation table was built from other weights (another model, or before a LoRA was attached, \
                 detached or merged): bring it up to date with `extend_modulation_table`",
            ));
        }
        self.entries.get(key).cloned().ok_or_else(|| {
            ModelError::invalid(format!(
                "the modulation table has no rows for timesteps {rounded:?}: add them with `extend_modulation_table`"
            ))
        })
    }
}

/// Where one call's modulations come from.
#[derive(Clone, Debug)]
pub(crate) enum CallModulation<B: Backend> {
    /// Looked up in a table: one entry per block.
    Table(Arc<[BlockModulation<B>]>),
    /// Computed per block from the call's `silu(temb)` (deferred layers are made on the device per block).
    Computed,
}

impl<B: QwenBackend> CallModulation<B> {
    /// The modulations of block `layer` for this call.
    pub fn block(
        &self,
        layer: usize,
        block: &TransformerBlock<B>,
        temb_act: &Tensor<B, 2>,
        rows: usize,
    ) -> Result<BlockModulation<B>> {
        match self {
            CallModulation::Table(blocks) => blocks
                .get(layer)
                .cloned()
                .ok_or_else(|| ModelError::invalid(format!("the modulation table has no block {layer}"))),
            CallModulation::Computed => block.modulation(temb_act, rows),
        }
    }
}

fn call_key(rounded: &[f32]) -> CallKey {
    rounded.iter().map(|t| t.to_bits()).collect()
}

impl<B: QwenBackend> QwenImageTransformer<B> {
    /// A table with the rows of `calls` (each the timesteps of one DiT call, as [`DitInput::timestep`] holds them).
    pub fn modulation_table(&self, calls: &[&[f32]]) -> Result<ModulationTable<B>> {
        let mut table = ModulationTable::new();
        self.extend_modulation_table(&mut table, calls)?;
        Ok(table)
    }

    /// Adds to `table` the rows of the `calls` it does not hold yet (each call the timesteps of one DiT call, as
    /// [`DitInput::timestep`] holds them). A table built from other weights is emptied first.
    ///
    /// In [table mode](ModulationMode::Table) this puts each modulation layer on the device once, for all new
    /// calls together, and drops it before the next one; nothing is uploaded when every call is already there.
    pub fn extend_modulation_table(
        &self,
        table: &mut ModulationTable<B>,
        calls: &[&[f32]],
    ) -> Result<ModulationTableUpdate> {
        let mut update = ModulationTableUpdate::default();
        if table.weights != Some(self.weights_id()) {
            update.invalidated = !table.is_empty();
            table.entries.clear();
            table.weights = Some(self.weights_id());
        }
        let mut new: Vec<(CallKey, Vec<f32>)> = Vec::new();
        for call in calls {
            if call.is_empty() || call.iter().any(|t| !t.is_finite()) {
                return Err(ModelError::invalid(format!(
                    "each call needs at least one finite timestep, got {call:?}"
                )));
            }
            let rounded: Vec<f32> = call.iter().map(|&t| self.round_timestep(t)).collect();
            let key = call_key(&rounded);
            if !table.entries.contains_key(&key) && !new.iter().any(|(k, _)| *k == key) {
                new.push((key, rounded));
            }
        }
        if new.is_empty() {
            return Ok(update);
        }
        let rows = self.modulation_rows();
        let tembs: Vec<Tensor<B, 2>> = new.iter().map(|(_, rounded)| self.temb_act(rounded)).collect();
        let mut per_call: Vec<Vec<BlockModulation<B>>> =
            vec![Vec::with_capacity(self.blocks.len()); new.len()];
        for block in &self.blocks {
            for (call, m) in per_call.iter_mut().zip(block.modulations(&tembs, rows)?) {
                call.push(m);
            }
            update.uploaded_bytes += block.img_mod.deferred_bytes() + block.txt_mod.deferred_bytes();
        }
        update.added = new.len();
        for ((key, _), blocks) in new.into_iter().zip(per_call) {
            table.entries.insert(key, blocks.into());
        }
        Ok(update)
    }

    /// Where the modulations of the call `input` (timesteps `rounded`) come from: its table, or computed per block.
    pub(crate) fn call_modulation(&self, input: &DitInput<B>, rounded: &[f32]) -> Result<CallModulation<B>> {
        Ok(match &input.modulation {
            Some(table) => {
                CallModulation::Table(table.rows(self.weights_id(), &call_key(rounded), rounded)?)
            }
            None => CallModulation::Computed,
        })
    }
}
