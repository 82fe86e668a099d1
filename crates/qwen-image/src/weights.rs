//! Memory-mapped safetensors checkpoints: one file or shards with an `*.safetensors.index.json`.
//!
//! Tensors are read straight out of the memory map: a tensor stored in the requested dtype reaches the device
//! without a heap copy (the host never holds a second full copy of the weights). The store remembers which keys
//! the model took, so that leftover keys (a checkpoint of another model) are reported by [`WeightStore::finish`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, AllocationProperty, Bytes, DType, Tensor, TensorData};

use crate::{ModelError, Result};

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
    bytes: bytes::Bytes,
}

/// A set of memory-mapped safetensors files seen as one key → tensor map.
#[derive(Debug)]
pub struct WeightStore {
    files: Vec<MappedFile>,
    entries: HashMap<String, Entry>,
    used: BTreeSet<String>,
    ignored_prefixes: Vec<String>,
    dtype: DType,
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
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let bytes = bytes::Bytes::from_owner(mmap);
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes)
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
        self.files.push(MappedFile { path: path.to_path_buf(), bytes });
        Ok(())
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

    /// Whether the checkpoint holds `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The stored shape of `key`.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.entries.get(key).map(|e| e.shape.as_slice())
    }

    /// All keys, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    fn file_list(&self) -> String {
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
        let slice = self.files[entry.file].bytes.slice(entry.range.clone());
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

    /// The tensor `key` of shape `expected`, on `device`, in the store's dtype.
    pub fn tensor<B: Backend, const D: usize>(
        &mut self,
        key: &str,
        expected: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let data = self.data(key, Some(&expected))?;
        Ok(Tensor::from_data(data, (device, self.dtype)))
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

    /// Number of bytes of tensor data in all files.
    pub fn total_bytes(&self) -> usize {
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
    pub fn tensor<B: Backend, const D: usize>(
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
