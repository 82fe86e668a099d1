//! Reading and writing named tensors as safetensors files (reference dumps, example inputs and outputs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use crate::{ModelError, Result};

/// A safetensors file of named tensors, read into memory (e4m3 tensors as their f32 values).
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    tensors: HashMap<String, (DType, Vec<usize>, Vec<u8>)>,
}

impl TensorFile {
    /// Reads every tensor of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), reason: format!("{e:?}") })?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() == safetensors::Dtype::F8_E4M3 {
                // e4m3 is read as its values (exact in f32).
                let values: Vec<u8> =
                    view.data().iter().flat_map(|&b| crate::quant::e4m3::decode(b).to_le_bytes()).collect();
                tensors.insert(name, (DType::F32, view.shape().to_vec(), values));
                continue;
            }
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::F64 => DType::F64,
                safetensors::Dtype::I64 => DType::I64,
                safetensors::Dtype::I32 => DType::I32,
                safetensors::Dtype::BOOL | safetensors::Dtype::U8 => DType::U8,
                other => {
                    return Err(ModelError::Dtype {
                        key: name,
                        file: path.display().to_string(),
                        dtype: format!("{other:?}"),
                    })
                }
            };
            tensors.insert(name, (dtype, view.shape().to_vec(), view.data().to_vec()));
        }
        Ok(TensorFile { path: path.to_path_buf(), tensors })
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    fn entry(&self, name: &str) -> Result<&(DType, Vec<usize>, Vec<u8>)> {
        self.tensors.get(name).ok_or_else(|| ModelError::MissingKey {
            key: name.to_string(),
            files: self.path.display().to_string(),
        })
    }

    /// The shape of `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.1.clone())
    }

    /// `name` as f32 values with its shape (any float or integer dtype is converted).
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let (dtype, shape, bytes) = self.entry(name)?;
        let data = TensorData::from_bytes_vec(bytes.clone(), shape.clone(), *dtype);
        let values = match dtype {
            DType::U8 => bytes.iter().map(|&b| b as f32).collect(),
            _ => data.convert_dtype(DType::F32).into_vec::<f32>().map_err(|e| self.bad(name, e))?,
        };
        Ok((values, shape.clone()))
    }

    /// `name` as i64 values with its shape (integer dtypes only).
    pub fn i64(&self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let (dtype, shape, bytes) = self.entry(name)?;
        let values: Vec<i64> = match dtype {
            DType::I64 => {
                bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
            }
            DType::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
            DType::U8 => bytes.iter().map(|&b| b as i64).collect(),
            other => {
                return Err(ModelError::invalid(format!(
                    "`{name}` in {} has dtype {other:?}; an integer tensor is expected",
                    self.path.display()
                )))
            }
        };
        Ok((values, shape.clone()))
    }

    /// `name` as an f32 tensor of rank `D` on `device`; errors if the rank differs.
    pub fn tensor<B: Backend, const D: usize>(&self, name: &str, device: &B::Device) -> Result<Tensor<B, D>> {
        let (values, shape) = self.f32(name)?;
        if shape.len() != D {
            return Err(ModelError::invalid(format!(
                "`{name}` in {} has shape {shape:?}; a rank-{D} tensor is expected",
                self.path.display()
            )));
        }
        Ok(Tensor::from_data(TensorData::new(values, shape), (device, DType::F32)))
    }

    fn bad(&self, name: &str, e: impl std::fmt::Debug) -> ModelError {
        ModelError::invalid(format!("cannot read `{name}` from {}: {e:?}", self.path.display()))
    }
}

/// Writes f32 tensors to a safetensors file atomically (a temporary file in the same folder, then a rename).
pub fn write_f32(path: &Path, tensors: &[(&str, Vec<f32>, Vec<usize>)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, values, shape)| {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.to_string(), (shape.clone(), bytes))
        })
        .collect::<Vec<_>>();
    let st_views = views
        .iter()
        .map(|(name, (shape, bytes))| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::invalid(format!("cannot serialize `{name}`: {e:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(st_views, None)
        .map_err(|e| ModelError::invalid(format!("cannot serialize {}: {e:?}", path.display())))?;
    write_atomic(path, &data)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| ModelError::invalid(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::io(path, e)
    })
}

/// Reads a tensor back to f32 host values.
pub fn to_f32_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().to_vec::<f32>().expect("an f32 tensor reads back as f32")
}

/// Relative L2 error `‖a − b‖ / ‖b‖` of two equally long slices (`b` is the reference).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in length");
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = (*x as f64) - (*y as f64);
        num += d * d;
        den += (*y as f64) * (*y as f64);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
