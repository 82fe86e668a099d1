//! Memory-mapped safetensors checkpoints: one file or shards with an `*.safetensors.index.json`.
//!
//! Tensors are read straight out of the memory map: a tensor stored in the requested dtype reaches the device
//! without a heap copy (the host never holds a second full copy of the weights). The store remembers which keys
//! the model took, so that leftover keys (a checkpoint of another model) are reported by [`WeightStore::finish`].
//!
//! [`WeightStore::random`] is a store without files: every tensor a loader asks for is created with random values
//! of the asked shape (on the device, never on the host for device tensors), so that a model of any size can be
//! built from its config alone, e.g. to benchmark the full-size networks (see [`crate::synthetic`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{backend::Backend, AllocationProperty, Bytes, DType, Distribution, Tensor, TensorData};

use crate::{
    ops::QwenBackend,
    synthetic::{self, Init},
    ModelError, Result,
};

/// Location and type of one tensor inside a mapped file.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    range: Range<usize>,
}

#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
}

/// A shared memory map seen as bytes (the owner of the zero-copy tensor slices).
struct SharedMap(Arc<memmap2::Mmap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The state of a random store: its seed and what it created.
#[derive(Debug)]
struct RandomSource {
    seed: u64,
    created: BTreeMap<String, Vec<usize>>,
    bytes: usize,
}

/// A set of memory-mapped safetensors files seen as one key → tensor map (or a random store, see
/// [`WeightStore::random`]).
#[derive(Debug)]
pub struct WeightStore {
    files: Vec<MappedFile>,
    entries: HashMap<String, Entry>,
    used: BTreeSet<String>,
    ignored_prefixes: Vec<String>,
    dtype: DType,
    random: Option<RandomSource>,
}

fn file_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F64 => Some(DType::F64),
        safetensors::Dtype::I64 => Some(DType::I64),
        safetensors::Dtype::I32 => Some(DType::I32),
        _ => None,
    }
}

impl WeightStore {
    /// Opens `dir/{stem}.safetensors`, or the shards listed in `dir/{stem}.safetensors.index.json`.
    ///
    /// Float tensors are converted to `dtype` when they are read (no conversion if the file already holds it).
    pub fn open_dir(dir: &Path, stem: &str, dtype: DType) -> Result<Self> {
        let single = dir.join(format!("{stem}.safetensors"));
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::config(&index, e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::config(&index, "no `weight_map` object"))?;
            let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            let store = Self::open_files(&paths, dtype)?;
            for key in map.keys() {
                if !store.entries.contains_key(key) {
                    return Err(ModelError::MissingKey { key: key.clone(), files: store.file_list() });
                }
            }
            Ok(store)
        } else if single.is_file() {
            Self::open_files(&[single], dtype)
        } else {
            Err(ModelError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "neither {stem}.safetensors nor {stem}.safetensors.index.json exists in the folder"
                    ),
                ),
            ))
        }
    }

    /// Opens the given safetensors files (their key sets must not overlap).
    pub fn open_files(paths: &[PathBuf], dtype: DType) -> Result<Self> {
        let mut store = WeightStore {
            files: Vec::new(),
            entries: HashMap::new(),
            used: BTreeSet::new(),
            ignored_prefixes: Vec::new(),
            dtype,
            random: None,
        };
        for path in paths {
            store.add_file(path)?;
        }
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; a checkpoint modified while mapped is the caller's problem, as with any
        // memory-mapped loader.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?);
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), reason: format!("{e:?}") })?;
        let base = 8 + header_len;
        let file_idx = self.files.len();
        for (name, info) in meta.tensors() {
            let dtype = file_dtype(info.dtype).ok_or_else(|| ModelError::Dtype {
                key: name.clone(),
                file: path.display().to_string(),
                dtype: format!("{:?}", info.dtype),
            })?;
            let (a, b) = info.data_offsets;
            let entry = Entry { file: file_idx, dtype, shape: info.shape.clone(), range: base + a..base + b };
            if self.entries.insert(name.clone(), entry).is_some() {
                return Err(ModelError::Safetensors {
                    path: path.to_path_buf(),
                    reason: format!("key `{name}` appears in more than one file"),
                });
            }
        }
        self.files.push(MappedFile { path: path.to_path_buf(), map });
        Ok(())
    }

    /// A store without files that answers every request with random values of the requested shape, in `dtype`
    /// (see [`synthetic::init_for`] for the scales). Device tensors are created on the device with the backend's
    /// generator, seeded from `seed` and the key; host data ([`WeightStore::data`]) comes from
    /// [`synthetic::fill_f32`]. The same seed gives the same weights on a given backend whatever the loading order.
    ///
    /// Loaders build the real architecture from their config with it: [`WeightStore::contains`] is true for every
    /// key, [`WeightStore::keys`] and [`WeightStore::shape`] list what was created so far, and
    /// [`WeightStore::finish`] never finds leftovers.
    pub fn random(dtype: DType, seed: u64) -> Self {
        WeightStore {
            files: Vec::new(),
            entries: HashMap::new(),
            used: BTreeSet::new(),
            ignored_prefixes: Vec::new(),
            dtype,
            random: Some(RandomSource { seed, created: BTreeMap::new(), bytes: 0 }),
        }
    }

    /// Whether this is a [random store](WeightStore::random).
    pub fn is_random(&self) -> bool {
        self.random.is_some()
    }

    /// The float dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Renames every key (e.g. to accept another naming of the same checkpoint). Must be called before reading.
    pub fn rename_keys(&mut self, f: impl Fn(&str) -> String) {
        self.entries = std::mem::take(&mut self.entries).into_iter().map(|(k, v)| (f(&k), v)).collect();
    }

    /// Keys starting with `prefix` are neither loaded nor reported as unexpected (e.g. `lm_head.`).
    pub fn ignore_prefix(&mut self, prefix: &str) {
        self.ignored_prefixes.push(prefix.to_string());
    }

    /// Whether the checkpoint holds `key` (always true for a random store).
    pub fn contains(&self, key: &str) -> bool {
        self.random.is_some() || self.entries.contains_key(key)
    }

    /// The stored shape of `key` (for a random store: of a tensor created so far).
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        if let Some(r) = &self.random {
            return r.created.get(key).map(Vec::as_slice);
        }
        self.entries.get(key).map(|e| e.shape.as_slice())
    }

    /// All keys, sorted (for a random store: the tensors created so far).
    pub fn keys(&self) -> Vec<&str> {
        if let Some(r) = &self.random {
            return r.created.keys().map(String::as_str).collect();
        }
        let mut keys: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    fn file_list(&self) -> String {
        if self.random.is_some() {
            return "a random store".into();
        }
        let names: Vec<String> = self.files.iter().map(|f| f.path.display().to_string()).collect();
        names.join(", ")
    }

    fn entry(&self, key: &str) -> Result<&Entry> {
        self.entries
            .get(key)
            .ok_or_else(|| ModelError::MissingKey { key: key.to_string(), files: self.file_list() })
    }

    fn file_name(&self, entry: &Entry) -> String {
        self.files[entry.file].path.display().to_string()
    }

    /// The raw data of `key` converted to the store's float dtype, checked against `expected` (if given).
    pub fn data(&mut self, key: &str, expected: Option<&[usize]>) -> Result<TensorData> {
        if self.random.is_some() {
            return self.random_data(key, expected);
        }
        let entry = self.entry(key)?.clone();
        if let Some(expected) = expected {
            if entry.shape != expected {
                return Err(ModelError::ShapeMismatch {
                    key: key.to_string(),
                    file: self.file_name(&entry),
                    expected: expected.to_vec(),
                    found: entry.shape.clone(),
                });
            }
        }
        if !entry.dtype.is_float() {
            return Err(ModelError::Dtype {
                key: key.to_string(),
                file: self.file_name(&entry),
                dtype: format!("{:?}", entry.dtype),
            });
        }
        self.used.insert(key.to_string());
        let file = &self.files[entry.file];
        // Ask the kernel to read the whole tensor now (one large request instead of page-by-page faults while it is
        // copied); only a hint, so a failure is ignored.
        #[cfg(unix)]
        let _ = file.map.advise_range(memmap2::Advice::WillNeed, entry.range.start, entry.range.len());
        let slice = bytes::Bytes::from_owner(SharedMap(file.map.clone())).slice(entry.range.clone());
        let aligned = (slice.as_ptr() as usize) % entry.dtype.size() == 0;
        let data = if aligned {
            TensorData::from_bytes(
                Bytes::from_shared(slice, AllocationProperty::File),
                entry.shape.clone(),
                entry.dtype,
            )
        } else {
            TensorData::from_bytes_vec(slice.to_vec(), entry.shape.clone(), entry.dtype)
        };
        Ok(if entry.dtype == self.dtype { data } else { data.convert_dtype(self.dtype) })
    }

    /// The tensor `key` of shape `expected`, on `device`, in the store's dtype, uploaded with
    /// [`QwenBackend::upload`] (straight from the memory map where the backend can).
    pub fn tensor<B: QwenBackend, const D: usize>(
        &mut self,
        key: &str,
        expected: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        if self.random.is_some() {
            return Ok(self.random_tensor(key, expected, device));
        }
        let data = self.data(key, Some(&expected))?;
        Ok(B::upload(data, device))
    }

    /// Records a tensor created by the random store; returns its seed and initialization.
    fn record_random(&mut self, key: &str, shape: &[usize]) -> (u64, Init) {
        let size = self.dtype.size() * shape.iter().product::<usize>();
        let r = self.random.as_mut().expect("a random store");
        r.created.insert(key.to_string(), shape.to_vec());
        r.bytes += size;
        let seed = synthetic::key_seed(r.seed, key);
        self.used.insert(key.to_string());
        (seed, synthetic::init_for(key, shape))
    }

    fn random_tensor<B: Backend, const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Tensor<B, D> {
        let (seed, init) = self.record_random(key, &shape);
        match init {
            Init::Ones => Tensor::ones(shape, (device, self.dtype)),
            Init::Random { std } => {
                // The backend's generator is process-wide: seeding and drawing must not interleave with another
                // thread's, or the same seed would not give the same weights.
                static SEEDED_DRAW: std::sync::Mutex<()> = std::sync::Mutex::new(());
                let _guard = SEEDED_DRAW.lock().unwrap_or_else(|e| e.into_inner());
                B::seed(device, seed);
                Tensor::random(shape, Distribution::Normal(0.0, std), (device, self.dtype))
            }
        }
    }

    fn random_data(&mut self, key: &str, expected: Option<&[usize]>) -> Result<TensorData> {
        let shape = expected
            .ok_or_else(|| {
                ModelError::invalid(format!("a random store needs the shape of `{key}` to create it"))
            })?
            .to_vec();
        let (seed, init) = self.record_random(key, &shape);
        let mut values = vec![1f32; shape.iter().product()];
        if let Init::Random { std } = init {
            synthetic::fill_f32(seed, std, &mut values);
        }
        Ok(TensorData::new(values, shape).convert_dtype(self.dtype))
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

    /// Errors if the checkpoint holds keys that the model did not read (outside the ignored prefixes).
    pub fn finish(&self) -> Result<()> {
        if self.random.is_some() {
            return Ok(());
        }
        let unused: Vec<&String> = self
            .entries
            .keys()
            .filter(|k| !self.used.contains(*k) && !self.ignored_prefixes.iter().any(|p| k.starts_with(p)))
            .collect::<BTreeSet<_>>()
            .into_iter()
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

    /// Number of bytes of tensor data in all files (for a random store: of the tensors created so far).
    pub fn total_bytes(&self) -> usize {
        if let Some(r) = &self.random {
            return r.bytes;
        }
        self.entries.values().map(|e| e.range.len()).sum()
    }

    /// Keys grouped by their first dotted component (diagnostics).
    pub fn key_summary(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for k in self.entries.keys() {
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
