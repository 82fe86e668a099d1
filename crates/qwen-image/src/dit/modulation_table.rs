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

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Distribution, Tensor};

    use super::*;
    use crate::{
        dit::{DitConfig, DitLoadOptions, ImageShape},
        synthetic,
        weights::WeightStore,
        CpuBackend,
    };

    type B = CpuBackend;

    fn config(zero_cond_t: bool) -> DitConfig {
        DitConfig {
            num_layers: 2,
            attention_head_dim: 16,
            num_attention_heads: 2,
            joint_attention_dim: 24,
            in_channels: 16,
            out_channels: Some(4),
            axes_dims_rope: vec![4, 6, 6],
            zero_cond_t,
            ..DitConfig::default()
        }
    }

    fn options(modulation: ModulationMode) -> DitLoadOptions {
        DitLoadOptions { modulation, ..Default::default() }
    }

    /// A random checkpoint of `config` written to a folder of its own.
    fn checkpoint(name: &str, config: &DitConfig) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("qwen-modulation-table-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tensors = synthetic::dit_checkpoint_tensors(config).unwrap();
        synthetic::write_random_checkpoint(&dir, "diffusion_pytorch_model", &tensors, 1 << 16, 11).unwrap();
        std::fs::write(dir.join("config.json"), synthetic::dit_config_json(config)).unwrap();
        dir
    }

    /// The same weights in resident and table mode: from a checkpoint's files, and from a random store.
    fn model_pairs(name: &str, zero_cond_t: bool, dtype: DType) -> Vec<[QwenImageTransformer<B>; 2]> {
        let config = config(zero_cond_t);
        let dir = checkpoint(name, &config);
        let dev = Default::default();
        let files = |m| QwenImageTransformer::<B>::load_with(&dir, dtype, &options(m), &dev).unwrap();
        let random = |m| {
            let mut store = WeightStore::random(dtype, 5);
            QwenImageTransformer::<B>::from_store_with(config.clone(), &mut store, &options(m), &dev).unwrap()
        };
        use ModulationMode::{Resident, Table};
        vec![[files(Resident), files(Table)], [random(Resident), random(Table)]]
    }

    fn bytes<const D: usize>(t: &Tensor<B, D>) -> (Vec<usize>, Vec<u8>) {
        let data = t.clone().into_data();
        (data.shape.to_vec(), data.as_bytes().to_vec())
    }

    fn assert_bit_identical(got: &BlockModulation<B>, want: &BlockModulation<B>, what: &str) {
        for (g, w) in [
            (&got.img1, &want.img1),
            (&got.img2, &want.img2),
            (&got.txt1, &want.txt1),
            (&got.txt2, &want.txt2),
        ] {
            for (a, b) in [(&g.shift, &w.shift), (&g.scale, &w.scale), (&g.gate, &w.gate)] {
                assert_eq!(bytes(a), bytes(b), "{what}");
            }
        }
    }

    fn input(config: &DitConfig, timestep: Vec<f32>) -> DitInput<B> {
        let dev = Default::default();
        let batch = timestep.len();
        let normal = Distribution::Normal(0.0, 1.0);
        DitInput {
            hidden_states: Tensor::random([batch, 16, config.in_channels], normal, &dev),
            encoder_hidden_states: Tensor::random([batch, 5, config.joint_attention_dim], normal, &dev),
            encoder_hidden_states_mask: None,
            timestep,
            img_shapes: vec![ImageShape::new(2, 4), ImageShape::new(2, 4)],
            modulation: None,
        }
    }

    #[test]
    fn rows_are_bit_identical_to_the_modulation_computed_in_a_forward_pass() {
        let calls: [&[f32]; 4] = [&[1.0], &[0.75], &[0.3, 0.9], &[0.0]];
        for zero_cond_t in [false, true] {
            for dtype in [DType::F32, DType::BF16] {
                let name = format!("rows-{zero_cond_t}-{dtype:?}");
                for [resident, deferred] in model_pairs(&name, zero_cond_t, dtype) {
                    let table = deferred.modulation_table(&calls).unwrap();
                    assert_eq!(table.len(), calls.len());
                    let rows = resident.modulation_rows();
                    assert_eq!(rows, if zero_cond_t { 2 } else { 1 });
                    for call in calls {
                        let rounded: Vec<f32> = call.iter().map(|&t| resident.round_timestep(t)).collect();
                        let got = table.rows(deferred.weights_id(), &call_key(&rounded), &rounded).unwrap();
                        // What a forward pass of the resident model computes for this call, block by block.
                        let temb = resident.temb_act(&rounded);
                        assert_eq!(temb.dims()[0], rows * call.len());
                        assert_eq!(got.len(), resident.num_layers());
                        for (block, got) in resident.blocks.iter().zip(got.iter()) {
                            let want = block.modulation(&temb, rows).unwrap();
                            assert_bit_identical(got, &want, &format!("{name} {call:?}"));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn forward_passes_with_the_table_are_bit_identical() {
        for zero_cond_t in [false, true] {
            let config = config(zero_cond_t);
            for [resident, deferred] in
                model_pairs(&format!("forward-{zero_cond_t}"), zero_cond_t, DType::BF16)
            {
                let mut input = input(&config, vec![0.6, 0.2]);
                // Today's path: the resident model computes its rows in the forward pass.
                let want = bytes(&resident.forward(&input).unwrap());
                // Table mode without a table: each layer is made on the device for this call.
                assert_eq!(bytes(&deferred.forward(&input).unwrap()), want);
                input.modulation = Some(deferred.modulation_table(&[&[0.6, 0.2]]).unwrap());
                assert_eq!(bytes(&deferred.forward(&input).unwrap()), want);
                input.modulation = Some(resident.modulation_table(&[&[0.6, 0.2]]).unwrap());
                assert_eq!(bytes(&resident.forward(&input).unwrap()), want);
            }
        }
    }

    #[test]
    fn new_timesteps_are_appended_and_the_old_rows_kept() {
        let [_, model] = model_pairs("append", true, DType::BF16).swap_remove(0);
        let dim = model.config.inner_dim();
        let per_use = model.num_layers() * 2 * (6 * dim * dim + 6 * dim) * DType::BF16.size();
        let mut table = ModulationTable::new();
        let update = model.extend_modulation_table(&mut table, &[&[1.0], &[0.75]]).unwrap();
        assert_eq!(update, ModulationTableUpdate { added: 2, invalidated: false, uploaded_bytes: per_use });
        let before = table.entries.clone();
        // 0.7501 rounds to 0.75 in bf16: the same row.
        let update = model.extend_modulation_table(&mut table, &[&[0.7501], &[0.5], &[0.5]]).unwrap();
        assert_eq!(update, ModulationTableUpdate { added: 1, invalidated: false, uploaded_bytes: per_use });
        assert_eq!(table.timesteps(), vec![vec![0.5], vec![0.75], vec![1.0]]);
        for (key, rows) in &before {
            assert!(Arc::ptr_eq(&table.entries[key], rows), "an existing row was recomputed");
        }
        let update = model.extend_modulation_table(&mut table, &[&[1.0]]).unwrap();
        assert_eq!(update, ModulationTableUpdate::default(), "nothing new: nothing uploaded");
        // blocks × calls × (img: 2 rows + txt: 1 row) × 6·dim values.
        assert_eq!(table.size_bytes(), 2 * 3 * 3 * 6 * dim * DType::BF16.size());
        table.clear();
        assert!(table.is_empty() && table.size_bytes() == 0);
        let err = model.extend_modulation_table(&mut table, &[&[f32::NAN]]).unwrap_err();
        assert!(err.to_string().contains("finite"), "{err}");
        assert!(model.extend_modulation_table(&mut table, &[&[]]).is_err());
    }

    #[test]
    fn tables_of_other_weights_or_timesteps_are_refused() {
        let [resident, mut model] = model_pairs("refused", false, DType::F32).swap_remove(1);
        let mut input = input(&model.config, vec![0.5]);
        let mut table = model.modulation_table(&[&[0.5]]).unwrap();
        input.modulation = Some(table.clone());
        let want = bytes(&model.forward(&input).unwrap());
        // Another model's table.
        input.modulation = Some(resident.modulation_table(&[&[0.5]]).unwrap());
        let err = model.forward(&input).unwrap_err();
        assert!(err.to_string().contains("other weights"), "{err}");
        // The mutable visitor (LoRA) gives the model new weights: the old table is refused, then rebuilt.
        model.visit_linears_mut(|_, _| {});
        input.modulation = Some(table.clone());
        assert!(model.forward(&input).unwrap_err().to_string().contains("other weights"));
        let update = model.extend_modulation_table(&mut table, &[&[0.5]]).unwrap();
        assert!(update.invalidated && update.added == 1);
        input.modulation = Some(table);
        assert_eq!(bytes(&model.forward(&input).unwrap()), want);
        // A timestep the table does not hold.
        input.timestep = vec![0.25];
        let err = model.forward(&input).unwrap_err();
        assert!(err.to_string().contains("no rows for timesteps [0.25]"), "{err}");
    }

    #[test]
    fn the_loader_leaves_the_modulation_weights_on_the_host() {
        let config = config(true);
        let dim = config.inner_dim();
        let modulation_bytes = config.num_layers * 2 * (6 * dim * dim + 6 * dim) * DType::F32.size();
        let dir = checkpoint("loader", &config);
        let dev = Default::default();
        let mut loaded = Vec::new();
        for mode in [ModulationMode::Resident, ModulationMode::Table] {
            for mut store in [
                WeightStore::random(DType::F32, 1),
                WeightStore::open_dir(&dir, "diffusion_pytorch_model", DType::F32).unwrap(),
            ] {
                let model = QwenImageTransformer::<B>::from_store_with(
                    config.clone(),
                    &mut store,
                    &options(mode),
                    &dev,
                )
                .unwrap();
                store.finish().unwrap();
                assert_eq!(model.modulation_mode(), mode);
                let keys: Vec<String> = store.keys().iter().map(|k| k.to_string()).collect();
                assert!(keys.contains(&"transformer_blocks.1.txt_mod.1.bias".to_string()));
                loaded.push((mode, store.device_bytes(), keys));
            }
        }
        let (resident, table) = (&loaded[..2], &loaded[2..]);
        for (r, t) in resident.iter().zip(table) {
            assert_eq!(
                r.1 - t.1,
                modulation_bytes,
                "table mode puts exactly the modulation weights off the device"
            );
            assert_eq!(r.2, t.2, "the same keys are read in both modes");
        }
    }
}
