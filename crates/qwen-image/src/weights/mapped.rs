//! Memory-mapped safetensors files seen as one key → tensor map: the source of a [`WeightStore`](super::WeightStore)
//! that reads a checkpoint.
//!
//! Tensors are read straight out of the memory map: a tensor stored in the requested dtype reaches the device
//! without a heap copy (the host never holds a second full copy of the weights).

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{AllocationProperty, Bytes, DType, TensorData};

use crate::{ModelError, Result};

/// Location and type of one tensor inside a mapped file.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    /// The dtype (`U8` for e4m3 bytes, see `fp8`).
    dtype: DType,
    /// Whether the file stores e4m3 (`F8_E4M3`, PyTorch's `float8_e4m3fn`): bytes read as they are.
    fp8: bool,
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

/// One float tensor of a mapped file, apart from the index: it keeps its file mapped and reads the bytes only when
/// asked (the source of a [`DeferredTensor`](super::DeferredTensor) of a checkpoint).
#[derive(Clone, Debug)]
pub(super) struct MappedTensor {
    map: Arc<memmap2::Mmap>,
    dtype: DType,
    shape: Vec<usize>,
    range: Range<usize>,
}

impl MappedTensor {
    /// The stored values converted to `dtype`: zero-copy out of the memory map when the file holds `dtype` and the
    /// bytes are aligned for it.
    pub fn data(&self, dtype: DType) -> TensorData {
        // Ask the kernel to read the whole tensor now (one large request instead of page-by-page faults while it is
        // copied); only a hint, so a failure is ignored.
        #[cfg(unix)]
        let _ = self.map.advise_range(memmap2::Advice::WillNeed, self.range.start, self.range.len());
        let slice = bytes::Bytes::from_owner(SharedMap(self.map.clone())).slice(self.range.clone());
        let aligned = (slice.as_ptr() as usize) % self.dtype.size() == 0;
        let data = if aligned {
            TensorData::from_bytes(
                Bytes::from_shared(slice, AllocationProperty::File),
                self.shape.clone(),
                self.dtype,
            )
        } else {
            TensorData::from_bytes_vec(slice.to_vec(), self.shape.clone(), self.dtype)
        };
        if self.dtype == dtype {
            data
        } else {
            data.convert_dtype(dtype)
        }
    }

    /// Rows `rows` of a 2-D tensor, gathered from the memory map and converted to `dtype`: `[rows.len(), cols]`.
    /// Each row must be in range (the caller checks).
    pub fn rows(&self, rows: &[usize], dtype: DType) -> TensorData {
        let data = gather_rows(&self.map[self.range.clone()], &self.shape, self.dtype, rows);
        if self.dtype == dtype {
            data
        } else {
            data.convert_dtype(dtype)
        }
    }
}

/// Rows `rows` of the row-major 2-D tensor of `shape` and `dtype` held in `bytes`: `[rows.len(), cols]`.
pub(super) fn gather_rows(bytes: &[u8], shape: &[usize], dtype: DType, rows: &[usize]) -> TensorData {
    let cols = shape.get(1).copied().unwrap_or(0);
    let row_bytes = cols * dtype.size();
    let mut out = Vec::with_capacity(rows.len() * row_bytes);
    for &r in rows {
        out.extend_from_slice(&bytes[r * row_bytes..(r + 1) * row_bytes]);
    }
    TensorData::from_bytes_vec(out, vec![rows.len(), cols], dtype)
}

/// The mapped files of a checkpoint and the index of their tensors.
#[derive(Debug, Default)]
pub(super) struct MappedFiles {
    files: Vec<MappedFile>,
    entries: HashMap<String, Entry>,
}

/// The dtype a file's tensor is read in (e4m3 as its bytes, `U8`).
fn file_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::F8_E4M3 | safetensors::Dtype::U8 => Some(DType::U8),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F64 => Some(DType::F64),
        safetensors::Dtype::I64 => Some(DType::I64),
        safetensors::Dtype::I32 => Some(DType::I32),
        _ => None,
    }
}

impl MappedFiles {
    /// Maps `dir/{stem}.safetensors`, or the shards listed in `dir/{stem}.safetensors.index.json`.
    pub fn open_dir(dir: &Path, stem: &str) -> Result<Self> {
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
            let files = Self::open(&paths)?;
            for key in map.keys() {
                if !files.entries.contains_key(key) {
                    return Err(ModelError::MissingKey { key: key.clone(), files: files.file_list() });
                }
            }
            Ok(files)
        } else if single.is_file() {
            Self::open(&[single])
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

    /// Maps the given files (their key sets must not overlap).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = MappedFiles::default();
        for path in paths {
            files.add_file(path)?;
        }
        Ok(files)
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
            let fp8 = info.dtype == safetensors::Dtype::F8_E4M3;
            let entry =
                Entry { file: file_idx, dtype, fp8, shape: info.shape.clone(), range: base + a..base + b };
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

    /// Renames every key.
    pub fn rename_keys(&mut self, f: impl Fn(&str) -> String) {
        self.entries = std::mem::take(&mut self.entries).into_iter().map(|(k, v)| (f(&k), v)).collect();
    }

    /// Whether a file holds `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The stored shape of `key`.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.entries.get(key).map(|e| e.shape.as_slice())
    }

    /// All keys, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The files, comma-separated (for error messages).
    pub fn file_list(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|f| f.path.display().to_string()).collect();
        names.join(", ")
    }

    fn file_name(&self, entry: &Entry) -> String {
        self.files[entry.file].path.display().to_string()
    }

    /// Errors unless `key`'s `entry` has the shape `expected`.
    fn check_shape(&self, key: &str, entry: &Entry, expected: &[usize]) -> Result<()> {
        if entry.shape == expected {
            return Ok(());
        }
        Err(ModelError::ShapeMismatch {
            key: key.to_string(),
            file: self.file_name(entry),
            expected: expected.to_vec(),
            found: entry.shape.clone(),
        })
    }

    /// The entry of the float tensor `key`, checked against `expected` (if given).
    fn float_entry(&self, key: &str, expected: Option<&[usize]>) -> Result<&Entry> {
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| ModelError::MissingKey { key: key.to_string(), files: self.file_list() })?;
        if let Some(expected) = expected {
            self.check_shape(key, entry, expected)?;
        }
        if !entry.dtype.is_float() {
            return Err(ModelError::Dtype {
                key: key.to_string(),
                file: self.file_name(entry),
                dtype: format!("{:?}", entry.dtype),
            });
        }
        Ok(entry)
    }

    /// The float tensor `key`, checked against `expected` (if given), as a handle that keeps its file mapped and
    /// reads the bytes only when asked ([`MappedTensor::data`]).
    pub fn tensor(&self, key: &str, expected: Option<&[usize]>) -> Result<MappedTensor> {
        let entry = self.float_entry(key, expected)?;
        Ok(MappedTensor {
            map: self.files[entry.file].map.clone(),
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            range: entry.range.clone(),
        })
    }

    /// Whether the files store `key` as `F8_E4M3`.
    pub fn is_fp8(&self, key: &str) -> bool {
        self.entries.get(key).is_some_and(|e| e.fp8)
    }

    /// The e4m3 bytes of `key` (a `U8` tensor of `expected` shape) when the file stores it as `F8_E4M3`; `None` for
    /// a key of another dtype or that the files lack.
    pub fn fp8_data(&self, key: &str, expected: &[usize]) -> Result<Option<TensorData>> {
        let Some(entry) = self.entries.get(key).filter(|e| e.fp8) else {
            return Ok(None);
        };
        self.check_shape(key, entry, expected)?;
        let bytes = self.files[entry.file].map[entry.range.clone()].to_vec();
        Ok(Some(TensorData::from_bytes_vec(bytes, entry.shape.clone(), DType::U8)))
    }

    /// The data of the float tensor `key` converted to `dtype`, checked against `expected` (if given).
    pub fn data(&self, key: &str, expected: Option<&[usize]>, dtype: DType) -> Result<TensorData> {
        Ok(self.tensor(key, expected)?.data(dtype))
    }

    /// The value of the scalar `key` (a 0-d or one-element tensor of any stored dtype, floats and integers), as
    /// f64.
    pub fn scalar(&self, key: &str) -> Result<f64> {
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| ModelError::MissingKey { key: key.to_string(), files: self.file_list() })?;
        if entry.shape.iter().product::<usize>() != 1 {
            return Err(ModelError::ShapeMismatch {
                key: key.to_string(),
                file: self.file_name(entry),
                expected: Vec::new(),
                found: entry.shape.clone(),
            });
        }
        let file = &self.files[entry.file];
        let b = &file.map[entry.range.clone()];
        let bytes = |n: usize| -> Result<[u8; 8]> {
            let mut out = [0u8; 8];
            out[..n].copy_from_slice(b.get(..n).ok_or_else(|| ModelError::Safetensors {
                path: file.path.clone(),
                reason: format!("`{key}` holds {} bytes, too few for one {:?}", b.len(), entry.dtype),
            })?);
            Ok(out)
        };
        let two = |v: [u8; 8]| [v[0], v[1]];
        let four = |v: [u8; 8]| [v[0], v[1], v[2], v[3]];
        Ok(match entry.dtype {
            DType::F64 => f64::from_le_bytes(bytes(8)?),
            DType::F32 => f64::from(f32::from_le_bytes(four(bytes(4)?))),
            DType::F16 => half::f16::from_le_bytes(two(bytes(2)?)).to_f64(),
            DType::BF16 => half::bf16::from_le_bytes(two(bytes(2)?)).to_f64(),
            DType::I64 => i64::from_le_bytes(bytes(8)?) as f64,
            DType::I32 => f64::from(i32::from_le_bytes(four(bytes(4)?))),
            other => {
                return Err(ModelError::Dtype {
                    key: key.to_string(),
                    file: self.file_name(entry),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }

    /// Bytes of tensor data in all files.
    pub fn total_bytes(&self) -> usize {
        self.entries.values().map(|e| e.range.len()).sum()
    }
}
