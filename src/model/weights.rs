//! Safetensors loading with the checks a server needs before it trusts a file:
//! the header is parsed and every tensor's byte range checked against the file
//! length before anything is read, so a truncated or corrupt file fails with the
//! name of the first tensor it cannot hold, not with a generic decode error.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Why a weights file was refused. Every variant that concerns one tensor names it.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    // The cause is part of the message and deliberately not a `source`: an error chain
    // printed with `{:#}` would say it twice.
    #[error("{path}: cannot read weights file: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a safetensors file: {reason}")]
    Header { path: PathBuf, reason: String },
    #[error(
        "{path}: tensor '{tensor}' needs bytes {start}..{end} of the data section but the file \
         holds only {available} (truncated file?)"
    )]
    Truncated {
        path: PathBuf,
        tensor: String,
        start: usize,
        end: usize,
        available: usize,
    },
    #[error("{path}: tensor '{tensor}' is missing ({expected})")]
    Missing {
        path: PathBuf,
        tensor: String,
        expected: String,
    },
    #[error("{path}: unexpected tensor '{tensor}' with shape {shape:?} (not part of this model)")]
    Unexpected {
        path: PathBuf,
        tensor: String,
        shape: Vec<usize>,
    },
    #[error("{path}: tensor '{tensor}' has shape {got:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{path}: tensor '{tensor}' has dtype {got}, expected {expected}")]
    DType {
        path: PathBuf,
        tensor: String,
        expected: String,
        got: String,
    },
    #[error("{path}: tensor '{tensor}' contains NaN or infinite values")]
    NonFinite { path: PathBuf, tensor: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: tensor '{tensor}': {error}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        error: Box<candle_core::Error>,
    },
}

#[derive(Debug, Clone, Deserialize)]
pub struct TensorInfo {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data_offsets: [usize; 2],
}

/// An opened, header-validated safetensors file.
pub struct WeightsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "U8" | "I8" | "BOOL" => 1,
        _ => return None,
    })
}

impl WeightsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, WeightsError> {
        let path = path.as_ref().to_path_buf();
        let io = |error| WeightsError::Io {
            path: path.clone(),
            error,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the file is opened read-only and the map lives as long as this value;
        // weights files are not expected to be modified while the server runs.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let header_err = |reason: String| WeightsError::Header {
            path: path.clone(),
            reason,
        };
        if mmap.len() < 8 {
            return Err(header_err(format!("file is only {} bytes", mmap.len())));
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
        if header_len > mmap.len() - 8 {
            return Err(header_err(format!(
                "header claims {header_len} bytes but the file has {} (truncated file?)",
                mmap.len()
            )));
        }
        let raw: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&mmap[8..8 + header_len])
                .map_err(|e| header_err(format!("header is not valid JSON: {e}")))?;
        let data_len = mmap.len() - 8 - header_len;
        let mut tensors = BTreeMap::new();
        let mut metadata = HashMap::new();
        for (name, value) in raw {
            if name == "__metadata__" {
                metadata = serde_json::from_value(value)
                    .map_err(|e| header_err(format!("__metadata__ is not a string map: {e}")))?;
                continue;
            }
            let info: TensorInfo = serde_json::from_value(value)
                .map_err(|e| header_err(format!("tensor '{name}': bad header entry: {e}")))?;
            let elem = dtype_size(&info.dtype).ok_or_else(|| {
                header_err(format!("tensor '{name}': unsupported dtype {}", info.dtype))
            })?;
            let [start, end] = info.data_offsets;
            let numel: usize = info.shape.iter().product();
            if end < start || end - start != numel * elem {
                return Err(header_err(format!(
                    "tensor '{name}': byte range {start}..{end} does not match shape {:?} of {}",
                    info.shape, info.dtype
                )));
            }
            if end > data_len {
                return Err(WeightsError::Truncated {
                    path: path.clone(),
                    tensor: name,
                    start,
                    end,
                    available: data_len,
                });
            }
            tensors.insert(name, info);
        }
        Ok(Self {
            path,
            mmap,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|i| i.shape.as_slice())
    }

    /// Hex SHA-256 of the whole file, recorded in every PNG so an image names its model.
    pub fn sha256(&self) -> String {
        let digest = Sha256::digest(&self.mmap[..]);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads one tensor onto the CPU in its stored dtype.
    pub fn load(&self, name: &str) -> Result<Tensor, WeightsError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| WeightsError::Missing {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: "required by the model".into(),
            })?;
        let header_len = u64::from_le_bytes(self.mmap[..8].try_into().expect("8 bytes")) as usize;
        let base = 8 + header_len;
        let bytes = &self.mmap[base + info.data_offsets[0]..base + info.data_offsets[1]];
        let dtype = match info.dtype.as_str() {
            "F64" => DType::F64,
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "I64" => DType::I64,
            "U32" => DType::U32,
            "U8" => DType::U8,
            other => {
                return Err(WeightsError::DType {
                    path: self.path.clone(),
                    tensor: name.to_string(),
                    expected: "F64, F32, F16, BF16, I64, U32 or U8".into(),
                    got: other.to_string(),
                })
            }
        };
        Tensor::from_raw_buffer(bytes, dtype, &info.shape, &Device::Cpu)
            .map_err(|source| self.tensor_err(name, source))
    }

    /// Reads a floating-point tensor as F32 on the CPU and refuses NaN or infinities, so a
    /// corrupt checkpoint fails at start-up instead of producing black images.
    pub fn load_f32_finite(&self, name: &str) -> Result<Tensor, WeightsError> {
        let t = self.load(name)?;
        if !t.dtype().is_float() {
            return Err(WeightsError::DType {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: "a floating-point dtype".into(),
                got: format!("{:?}", t.dtype()),
            });
        }
        let wrap = |source| self.tensor_err(name, source);
        let t = t.to_dtype(DType::F32).map_err(wrap)?;
        let values = t
            .flatten_all()
            .and_then(|f| f.to_vec1::<f32>())
            .map_err(wrap)?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(WeightsError::NonFinite {
                path: self.path.clone(),
                tensor: name.to_string(),
            });
        }
        Ok(t)
    }

    /// Checks that the file holds exactly `expected` (name → shape); names in `optional`
    /// may be absent but are shape-checked when present.
    pub fn check_exact(
        &self,
        expected: &BTreeMap<String, Vec<usize>>,
        optional: &BTreeMap<String, Vec<usize>>,
    ) -> Result<(), WeightsError> {
        for (name, shape) in expected {
            match self.shape(name) {
                None => {
                    return Err(WeightsError::Missing {
                        path: self.path.clone(),
                        tensor: name.clone(),
                        expected: format!("expected shape {shape:?}"),
                    })
                }
                Some(got) if got != shape.as_slice() => return Err(self.shape_err(name, shape)),
                Some(_) => {}
            }
        }
        for (name, info) in &self.tensors {
            if expected.contains_key(name) {
                continue;
            }
            match optional.get(name) {
                Some(shape) if shape != &info.shape => return Err(self.shape_err(name, shape)),
                Some(_) => {}
                None => {
                    return Err(WeightsError::Unexpected {
                        path: self.path.clone(),
                        tensor: name.clone(),
                        shape: info.shape.clone(),
                    })
                }
            }
        }
        Ok(())
    }

    fn shape_err(&self, name: &str, expected: &[usize]) -> WeightsError {
        WeightsError::Shape {
            path: self.path.clone(),
            tensor: name.to_string(),
            expected: expected.to_vec(),
            got: self.shape(name).unwrap_or_default().to_vec(),
        }
    }

    /// A shape the caller needs in order to infer the configuration.
    pub fn required_shape(&self, name: &str, rank: usize) -> Result<&[usize], WeightsError> {
        let shape = self.shape(name).ok_or_else(|| WeightsError::Missing {
            path: self.path.clone(),
            tensor: name.to_string(),
            expected: format!("a rank-{rank} tensor is needed to infer the configuration"),
        })?;
        if shape.len() != rank {
            return Err(WeightsError::Invalid {
                path: self.path.clone(),
                reason: format!(
                    "tensor '{name}' has shape {shape:?}; a rank-{rank} tensor is required"
                ),
            });
        }
        Ok(shape)
    }

    pub fn invalid(&self, reason: impl Into<String>) -> WeightsError {
        WeightsError::Invalid {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    pub fn tensor_err(&self, tensor: &str, source: candle_core::Error) -> WeightsError {
        WeightsError::Tensor {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            error: Box::new(source),
        }
    }
}
