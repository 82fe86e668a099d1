//! Checkpoint weights by key, with strict key and shape checks: [`WeightStore`] and the key prefix [`WeightPath`]
//! that loaders use to build nested modules.
//!
//! A store has one of two sources:
//! - **files** ([`WeightStore::open_dir`], [`WeightStore::open_files`]): memory-mapped safetensors checkpoints, one
//!   file or shards with an `*.safetensors.index.json` (see `mapped.rs`). The store remembers which keys the model
//!   took, so that leftover keys (a checkpoint of another model) are reported by [`WeightStore::finish`];
//! - **generated** ([`WeightStore::random`], [`WeightStore::shape_only`]): no files; every tensor a loader asks for
//!   is made up with the asked shape (random values, or no elements at all) and recorded (see `generated.rs`). A
//!   model of any size can be built from its config alone this way (e.g. to benchmark the full-size networks, see
//!   [`crate::synthetic`]), and the checkpoint a loader expects can be listed without allocating it.
//!
//! A loader takes each tensor onto the device ([`WeightStore::tensor`]) or leaves it off as a [`DeferredTensor`]
//! ([`WeightStore::deferred`]), made on a device only when needed (see `deferred.rs`).

mod deferred;
mod fp8;
mod generated;
mod host;
mod mapped;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::{ops::QwenBackend, quant::Fp8Options, ModelError, Result};
pub use deferred::DeferredTensor;
use generated::{Fill, Generated};
pub use host::{HostMemory, HostTensor};
use mapped::MappedFiles;

/// Weight bytes of a load by where they live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightBytes {
    /// On the device.
    pub device: u64,
    /// Left on the host until used (memory-mapped from the checkpoint, or made again from a seed: the DiT's
    /// modulation layers in table mode), or parked there after loading (the text encoder's streamed layers).
    pub host: u64,
}

/// Where the tensors of a [`WeightStore`] come from.
#[derive(Debug)]
enum Source {
    /// Memory-mapped safetensors files.
    Files(MappedFiles),
    /// No files: tensors are made up on request and recorded.
    Generated(Generated),
}

/// A checkpoint seen as one key → tensor map: memory-mapped safetensors files, or a store without files that
/// makes tensors up on request ([`WeightStore::random`], [`WeightStore::shape_only`]).
#[derive(Debug)]
pub struct WeightStore {
    source: Source,
    used: BTreeSet<String>,
    ignored_prefixes: Vec<String>,
    dtype: DType,
    /// Bytes of the tensors put on a device by [`WeightStore::tensor`] and by the linear layers' FP8 loads, counted
    /// from the tensors made.
    device_bytes: usize,
    /// The same at the shapes the loader asked for, and the bytes it left on the host ([`WeightStore::deferred`]).
    planned: WeightBytes,
    /// Which linear layers [`Linear::load`](crate::nn::Linear::load) quantizes ([`WeightStore::quantize_linears`]).
    fp8: Option<Fp8Options>,
}

impl WeightStore {
    fn with_source(source: Source, dtype: DType) -> Self {
        WeightStore {
            source,
            used: BTreeSet::new(),
            ignored_prefixes: Vec::new(),
            dtype,
            device_bytes: 0,
            planned: WeightBytes::default(),
            fp8: None,
        }
    }

    /// Opens `dir/{stem}.safetensors`, or the shards listed in `dir/{stem}.safetensors.index.json`.
    ///
    /// Float tensors are converted to `dtype` when they are read (no conversion if the file already holds it).
    pub fn open_dir(dir: &Path, stem: &str, dtype: DType) -> Result<Self> {
        Ok(Self::with_source(Source::Files(MappedFiles::open_dir(dir, stem)?), dtype))
    }

    /// Opens the given safetensors files (their key sets must not overlap).
    pub fn open_files(paths: &[PathBuf], dtype: DType) -> Result<Self> {
        Ok(Self::with_source(Source::Files(MappedFiles::open(paths)?), dtype))
    }

    /// A store without files that answers every request with random values of the requested shape, in `dtype`
    /// (see [`synthetic::init_for`](crate::synthetic::init_for) for the scales). Device tensors are created on the
    /// device with the backend's generator, seeded from `seed` and the key; host data ([`WeightStore::data`]) comes
    /// from [`synthetic::fill_f32`](crate::synthetic::fill_f32). The same seed gives the same weights on a given
    /// backend whatever the loading order.
    ///
    /// Loaders build the real architecture from their config with it: [`WeightStore::contains`] is true for every
    /// key, [`WeightStore::keys`], [`WeightStore::shape`] and [`WeightStore::created`] list what was created so far,
    /// and [`WeightStore::finish`] never finds leftovers.
    pub fn random(dtype: DType, seed: u64) -> Self {
        Self::with_source(Source::Generated(Generated::new(Fill::Random { seed })), dtype)
    }

    /// A store without files that answers every request with a tensor of the requested rank without elements (its
    /// leading dimension is 0; no memory is allocated) and records the requested key and shape.
    ///
    /// Running a loader on it lists the checkpoint that loader expects, keys and shapes in reading order
    /// ([`WeightStore::created`]), for any model size: the list comes from the same code that loads. The module it
    /// builds holds empty tensors; it can be inspected (e.g. its layer names), not run.
    pub fn shape_only(dtype: DType) -> Self {
        Self::with_source(Source::Generated(Generated::new(Fill::Empty)), dtype)
    }

    /// Whether this is a [random store](WeightStore::random).
    pub fn is_random(&self) -> bool {
        matches!(&self.source, Source::Generated(g) if matches!(g.fill, Fill::Random { .. }))
    }

    /// The float dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Renames every key of a store of files (e.g. to accept another naming of the same checkpoint). Must be called
    /// before reading; a store without files has no keys to rename.
    pub fn rename_keys(&mut self, f: impl Fn(&str) -> String) {
        if let Source::Files(files) = &mut self.source {
            files.rename_keys(f);
        }
    }

    /// Keys starting with `prefix` are neither loaded nor reported as unexpected (e.g. `lm_head.`).
    pub fn ignore_prefix(&mut self, prefix: &str) {
        self.ignored_prefixes.push(prefix.to_string());
    }

    /// Whether the checkpoint holds `key` (always true for a store without files).
    pub fn contains(&self, key: &str) -> bool {
        match &self.source {
            Source::Files(files) => files.contains(key),
            Source::Generated(_) => true,
        }
    }

    /// The stored shape of `key` (for a store without files: of a tensor created so far).
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        match &self.source {
            Source::Files(files) => files.shape(key),
            Source::Generated(g) => g.shape(key),
        }
    }

    /// All keys, sorted (for a store without files: the tensors created so far).
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = match &self.source {
            Source::Files(files) => files.keys().collect(),
            Source::Generated(g) => g.created().iter().map(|(k, _)| k.as_str()).collect(),
        };
        keys.sort_unstable();
        keys
    }

    /// Key and requested shape of every tensor a store without files has created, in request order (empty for a
    /// store of files).
    pub fn created(&self) -> &[(String, Vec<usize>)] {
        match &self.source {
            Source::Files(_) => &[],
            Source::Generated(g) => g.created(),
        }
    }

    /// The raw data of `key` converted to the store's float dtype, checked against `expected` (if given; a store
    /// without files needs it to create the data).
    pub fn data(&mut self, key: &str, expected: Option<&[usize]>) -> Result<TensorData> {
        let data = match &mut self.source {
            Source::Files(files) => files.data(key, expected, self.dtype)?,
            Source::Generated(g) => {
                let shape = expected.ok_or_else(|| {
                    ModelError::invalid(format!(
                        "a store without files needs the shape of `{key}` to create it"
                    ))
                })?;
                g.data(key, shape, self.dtype)
            }
        };
        self.used.insert(key.to_string());
        Ok(data)
    }

    /// The tensor `key` of shape `expected`, on `device`, in the store's dtype, uploaded with
    /// [`QwenBackend::upload`] (straight from the memory map where the backend can).
    pub fn tensor<B: QwenBackend, const D: usize>(
        &mut self,
        key: &str,
        expected: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let t = if let Source::Generated(g) = &mut self.source {
            let t = g.tensor(key, expected, self.dtype, device);
            self.used.insert(key.to_string());
            t
        } else {
            let data = self.data(key, Some(&expected))?;
            B::upload(data, device)
        };
        self.device_bytes += t.shape().num_elements() * self.dtype.size();
        self.planned.device += (expected.iter().product::<usize>() * self.dtype.size()) as u64;
        Ok(t)
    }

    /// The tensor `key` of shape `expected` left off the device: checked and recorded like [`WeightStore::tensor`],
    /// made on a device only by [`DeferredTensor::to_device`] (a checkpoint's file stays mapped meanwhile).
    pub fn deferred(&mut self, key: &str, expected: &[usize]) -> Result<DeferredTensor> {
        let dtype = self.dtype;
        let t = match &mut self.source {
            Source::Files(files) => {
                DeferredTensor::mapped(key, expected, dtype, files.tensor(key, Some(expected))?)
            }
            Source::Generated(g) => {
                g.record(key, expected, dtype);
                DeferredTensor::generated(key, expected, dtype, g.fill)
            }
        };
        self.used.insert(key.to_string());
        self.planned.host += (expected.iter().product::<usize>() * dtype.size()) as u64;
        Ok(t)
    }

    /// Bytes of the weights this store's loads have put on a device so far, counted from the tensors made
    /// ([`WeightStore::tensor`] and the FP8 weights of [`Linear::load`](crate::nn::Linear::load); none for the
    /// [deferred](WeightStore::deferred) ones, nor for the empty tensors of a shape-only store).
    pub fn device_bytes(&self) -> usize {
        self.device_bytes
    }

    /// The weight bytes of this store's loads so far at the shapes the loaders asked for: on the device (in the
    /// store's dtype, FP8 layers at one byte per weight plus an f32 scale per row) and left on the host. On a
    /// [shape-only](WeightStore::shape_only) store this is what the same load from files would hold, without
    /// allocating anything (the memory plan's weight part).
    pub fn planned_bytes(&self) -> WeightBytes {
        self.planned
    }

    /// Counts a linear weight a loader put on the device outside [`WeightStore::tensor`] (an FP8 weight):
    /// `planned` bytes at the asked shape, `actual` bytes of the tensors made, and `from_host` bytes that were
    /// counted as left on the host when its source was [deferred](WeightStore::deferred).
    pub(crate) fn count_placed(&mut self, from_host: u64, planned: u64, actual: usize) {
        self.planned.host -= from_host.min(self.planned.host);
        self.planned.device += planned;
        self.device_bytes += actual;
    }

    /// Counts weights a loader put on the device and then parked in host memory (streamed layers,
    /// [`HostTensor`]): `planned` bytes at the asked shapes and `actual` bytes of the tensors made move from the
    /// device's count to the host's.
    pub(crate) fn count_parked(&mut self, planned: u64, actual: usize) {
        self.planned.device -= planned.min(self.planned.device);
        self.planned.host += planned;
        self.device_bytes -= actual.min(self.device_bytes);
    }

    /// The value of the scalar `key`: a 0-d or one-element tensor of a float or integer dtype (e.g. a LoRA's
    /// `alpha`, saved as a float or an int), as f64. A store without files has no scalars.
    pub fn scalar(&mut self, key: &str) -> Result<f64> {
        let value = match &self.source {
            Source::Files(files) => files.scalar(key)?,
            Source::Generated(_) => {
                return Err(ModelError::invalid(format!("a store without files holds no scalar `{key}`")))
            }
        };
        self.used.insert(key.to_string());
        Ok(value)
    }

    /// The tensor `key` as f32 values on the host with its shape (for load-time transforms).
    pub fn host_f32(&mut self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let data = self.data(key, None)?;
        let shape = data.shape.to_vec();
        let values = data
            .convert_dtype(DType::F32)
            .into_vec::<f32>()
            .map_err(|e| ModelError::Safetensors { path: key.into(), reason: format!("{e:?}") })?;
        Ok((values, shape))
    }

    /// Marks `key` as consumed without reading it.
    pub fn mark_used(&mut self, key: &str) {
        self.used.insert(key.to_string());
    }

    /// A view of the store with a key prefix, for building nested modules.
    pub fn root(&mut self) -> WeightPath<'_> {
        WeightPath { store: self, prefix: String::new() }
    }

    /// Errors if the checkpoint holds keys that the model did not read (outside the ignored prefixes; never for a
    /// store without files).
    pub fn finish(&self) -> Result<()> {
        let Source::Files(files) = &self.source else {
            return Ok(());
        };
        let unused: BTreeSet<&str> = files
            .keys()
            .filter(|k| !self.used.contains(*k) && !self.ignored_prefixes.iter().any(|p| k.starts_with(p)))
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        const SHOWN: usize = 8;
        Err(ModelError::UnexpectedKeys {
            keys: unused.iter().take(SHOWN).map(|k| k.to_string()).collect(),
            more: unused.len().saturating_sub(SHOWN),
        })
    }

    /// Number of bytes of tensor data in all files (for a store without files: of the tensors created so far, at
    /// their requested shapes).
    pub fn total_bytes(&self) -> usize {
        match &self.source {
            Source::Files(files) => files.total_bytes(),
            Source::Generated(g) => g.bytes(),
        }
    }

    /// Keys grouped by their first dotted component (diagnostics).
    pub fn key_summary(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for k in self.keys() {
            *m.entry(k.split('.').next().unwrap_or("").to_string()).or_insert(0) += 1;
        }
        m
    }
}

/// A prefix into a [`WeightStore`]: `path.pp("attn").tensor("to_q.weight", ..)` reads `attn.to_q.weight`.
#[derive(Debug)]
pub struct WeightPath<'a> {
    store: &'a mut WeightStore,
    prefix: String,
}

impl WeightPath<'_> {
    /// The prefix itself (e.g. `transformer_blocks.3.attn.to_q`; empty at the root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A view one level deeper.
    pub fn pp(&mut self, name: impl std::fmt::Display) -> WeightPath<'_> {
        let prefix = self.key(&name.to_string());
        WeightPath { store: self.store, prefix }
    }

    /// The tensor `name` of shape `expected`.
    pub fn tensor<B: QwenBackend, const D: usize>(
        &mut self,
        name: &str,
        expected: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let key = self.key(name);
        self.store.tensor(&key, expected, device)
    }

    /// The tensor `name` of shape `expected`, left off the device (see [`WeightStore::deferred`]).
    pub fn deferred(&mut self, name: &str, expected: &[usize]) -> Result<DeferredTensor> {
        let key = self.key(name);
        self.store.deferred(&key, expected)
    }

    /// Whether `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.key(name))
    }

    /// The underlying store.
    pub fn store(&mut self) -> &mut WeightStore {
        self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn write(path: &Path, tensors: &[(&str, Vec<f32>, Vec<usize>)]) {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(k, v, s)| {
                let bytes: &[u8] = bytemuck_cast(v);
                (
                    k.to_string(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn bytemuck_cast(v: &[f32]) -> &[u8] {
        // SAFETY: f32 has no invalid bit patterns and u8 has alignment 1.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qwen-image-weights-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn loads_shards_and_reports_errors() {
        let dir = tmp("shards");
        write(&dir.join("a.safetensors"), &[("x.weight", vec![1.0, 2.0, 3.0, 4.0], vec![2, 2])]);
        write(&dir.join("b.safetensors"), &[("y.bias", vec![5.0, 6.0], vec![2]), ("z", vec![0.0], vec![1])]);
        std::fs::write(
            dir.join("m.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"x.weight":"a.safetensors","y.bias":"b.safetensors","z":"b.safetensors"}}"#,
        )
        .unwrap();
        let dev = Default::default();
        let mut store = WeightStore::open_dir(&dir, "m", DType::BF16).unwrap();
        let x: Tensor<Flex, 2> = store.root().pp("x").tensor("weight", [2, 2], &dev).unwrap();
        assert_eq!(x.dtype(), DType::BF16);
        assert_eq!(x.cast(DType::F32).into_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        let err = store.tensor::<Flex, 1>("y.bias", [3], &dev).unwrap_err();
        assert!(err.to_string().contains("`y.bias`") && err.to_string().contains("[2]"), "{err}");
        let err = store.tensor::<Flex, 1>("nope", [3], &dev).unwrap_err();
        assert!(matches!(err, ModelError::MissingKey { .. }), "{err}");
        let err = store.finish().unwrap_err();
        assert!(err.to_string().contains("y.bias") && err.to_string().contains('z'), "{err}");
        store.ignore_prefix("y.");
        store.mark_used("z");
        store.finish().unwrap();
    }

    #[test]
    fn a_random_store_creates_what_is_asked_deterministically() {
        let dev = Default::default();
        let mut store = WeightStore::random(DType::F32, 3);
        assert!(store.is_random() && store.contains("anything"));
        let w: Tensor<Flex, 2> = store.root().pp("lin").tensor("weight", [64, 256], &dev).unwrap();
        let b: Tensor<Flex, 1> = store.tensor("lin.bias", [64], &dev).unwrap();
        let n: Tensor<Flex, 1> = store.tensor("norm.weight", [5], &dev).unwrap();
        let host = store.data("conv.weight", Some(&[4, 2, 3, 3, 3])).unwrap();
        assert!(store.data("conv.bias", None).is_err());
        let w = w.into_data().to_vec::<f32>().unwrap();
        let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
        assert!((std - 1.0 / 16.0).abs() < 0.005, "{std}");
        assert!(b.into_data().to_vec::<f32>().unwrap().iter().all(|x| x.abs() < 0.2));
        assert_eq!(n.into_data().to_vec::<f32>().unwrap(), vec![1.0; 5]);
        assert_eq!(host.shape.to_vec(), vec![4, 2, 3, 3, 3]);
        assert_eq!(store.keys(), vec!["conv.weight", "lin.bias", "lin.weight", "norm.weight"]);
        assert_eq!(store.shape("lin.weight"), Some(&[64usize, 256][..]));
        assert_eq!(store.total_bytes(), 4 * (64 * 256 + 64 + 5 + 4 * 2 * 27));
        store.finish().unwrap();
        // Same seed, same values whatever the order; another seed, other values.
        let again = |seed: u64| {
            let mut s = WeightStore::random(DType::F32, seed);
            let _: Tensor<Flex, 1> = s.tensor("lin.bias", [64], &dev).unwrap();
            let w: Tensor<Flex, 2> = s.tensor("lin.weight", [64, 256], &dev).unwrap();
            w.into_data().to_vec::<f32>().unwrap()
        };
        assert_eq!(again(3), w);
        assert_ne!(again(4), w);
    }

    #[test]
    fn deferred_tensors_are_made_with_the_values_a_device_load_gives() {
        let dev = Default::default();
        let dir = tmp("deferred");
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.37 - 2.0).collect();
        write(&dir.join("d.safetensors"), &[("w", values, vec![3, 4]), ("b", vec![1.0, 2.0, 3.0], vec![3])]);
        let stores =
            || [WeightStore::open_dir(&dir, "d", DType::BF16).unwrap(), WeightStore::random(DType::BF16, 9)];
        for (mut loaded, mut deferring) in stores().into_iter().zip(stores()) {
            let want: Tensor<Flex, 2> = loaded.tensor("w", [3, 4], &dev).unwrap();
            let _: Tensor<Flex, 1> = loaded.tensor("b", [3], &dev).unwrap();
            assert_eq!(loaded.device_bytes(), 2 * (12 + 3));
            let w = deferring.deferred("w", &[3, 4]).unwrap();
            let b: Tensor<Flex, 1> = deferring.tensor("b", [3], &dev).unwrap();
            assert_eq!(b.dims(), [3]);
            // Only the tensor taken onto the device counts; the deferred one is recorded and marked as read.
            assert_eq!(deferring.device_bytes(), 2 * 3);
            assert_eq!((w.key(), w.shape(), w.dtype(), w.size_bytes()), ("w", &[3, 4][..], DType::BF16, 24));
            deferring.finish().unwrap();
            assert_eq!(deferring.keys(), vec!["b", "w"]);
            // Made twice, the same values as the device load, bit for bit.
            for _ in 0..2 {
                let got: Tensor<Flex, 2> = w.to_device(&dev).unwrap();
                assert_eq!(got.dtype(), DType::BF16);
                assert_eq!(got.into_data().as_bytes(), want.clone().into_data().as_bytes());
            }
            assert!(w.to_device::<Flex, 1>(&dev).is_err(), "the rank is checked");
        }
        let mut store = WeightStore::open_dir(&dir, "d", DType::F32).unwrap();
        assert!(matches!(store.deferred("w", &[4, 3]).unwrap_err(), ModelError::ShapeMismatch { .. }));
        assert!(matches!(store.deferred("x", &[1]).unwrap_err(), ModelError::MissingKey { .. }));
    }

    #[test]
    fn a_shape_only_store_records_requests_without_allocating() {
        let dev = Default::default();
        let mut store = WeightStore::shape_only(DType::BF16);
        assert!(!store.is_random() && store.contains("anything"));
        let w: Tensor<Flex, 2> = store.root().pp("lin").tensor("weight", [3072, 12288], &dev).unwrap();
        assert_eq!(w.dims(), [0, 12288]);
        let host = store.data("conv.weight", Some(&[4, 2, 3, 3, 3])).unwrap();
        assert_eq!(host.shape.to_vec(), vec![0, 2, 3, 3, 3]);
        let _: Tensor<Flex, 2> = store.tensor("lin.weight", [3072, 12288], &dev).unwrap();
        assert_eq!(
            store.created(),
            &[
                ("lin.weight".to_string(), vec![3072, 12288]),
                ("conv.weight".to_string(), vec![4, 2, 3, 3, 3])
            ]
        );
        assert_eq!(store.total_bytes(), 2 * (3072 * 12288 + 4 * 2 * 27));
        assert!(store.scalar("alpha").is_err());
        store.finish().unwrap();
    }

    #[test]
    fn scalars_of_any_numeric_dtype_read_as_f64() {
        let dir = tmp("scalars");
        let path = dir.join("s.safetensors");
        let i64_bytes = 8i64.to_le_bytes();
        let i32_bytes = (-3i32).to_le_bytes();
        let bf16_bytes = half::bf16::from_f32(0.5).to_le_bytes();
        let f32_bytes = [1.5f32, 2.5].map(f32::to_le_bytes).concat();
        fn view(
            dtype: safetensors::Dtype,
            shape: Vec<usize>,
            bytes: &[u8],
        ) -> safetensors::tensor::TensorView<'_> {
            safetensors::tensor::TensorView::new(dtype, shape, bytes).unwrap()
        }
        let tensors = vec![
            ("a.alpha".to_string(), view(safetensors::Dtype::I64, vec![], &i64_bytes)),
            ("b.alpha".to_string(), view(safetensors::Dtype::I32, vec![1], &i32_bytes)),
            ("c.alpha".to_string(), view(safetensors::Dtype::BF16, vec![1, 1], &bf16_bytes)),
            ("d.alpha".to_string(), view(safetensors::Dtype::F32, vec![2], &f32_bytes)),
        ];
        safetensors::serialize_to_file(tensors, None, &path).unwrap();
        let mut store = WeightStore::open_files(&[path], DType::F32).unwrap();
        assert_eq!(store.scalar("a.alpha").unwrap(), 8.0);
        assert_eq!(store.scalar("b.alpha").unwrap(), -3.0);
        assert_eq!(store.scalar("c.alpha").unwrap(), 0.5);
        let err = store.scalar("d.alpha").unwrap_err();
        assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err}");
        assert!(matches!(store.scalar("e.alpha").unwrap_err(), ModelError::MissingKey { .. }));
        // Integer tensors are still refused where float weights are expected.
        assert!(matches!(store.data("a.alpha", None).unwrap_err(), ModelError::Dtype { .. }));
    }

    #[test]
    fn truncated_and_missing_files_are_errors() {
        let dir = tmp("trunc");
        let path = dir.join("model.safetensors");
        write(&path, &[("w", vec![1.0; 64], vec![64])]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = WeightStore::open_dir(&dir, "model", DType::F32).unwrap_err();
        assert!(matches!(err, ModelError::Safetensors { .. }), "{err}");
        assert!(err.to_string().contains("model.safetensors"));
        let err = WeightStore::open_dir(&dir.join("nothing"), "model", DType::F32).unwrap_err();
        assert!(matches!(err, ModelError::Io { .. }), "{err}");
    }
}
