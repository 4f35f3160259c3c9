//! Reading and writing named host tensors in safetensors files (model inputs and outputs),
//! with dtype conversion and messages that name the file and tensor.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// A host tensor: values in f32 or i64 plus the shape.
#[derive(Debug, Clone, PartialEq)]
pub enum HostTensor {
    /// Float values (any float dtype on disk, converted).
    F32(Vec<f32>, Vec<usize>),
    /// Integer values (any integer dtype on disk, converted).
    I64(Vec<i64>, Vec<usize>),
}

impl HostTensor {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            HostTensor::F32(_, s) | HostTensor::I64(_, s) => s,
        }
    }
}

/// Decodes float data (f32, f16, bf16, f64; little endian) into f32.
pub fn decode_f32(name: &str, location: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => {
            return Err(Error::BadDtype {
                name: name.into(),
                location: location.into(),
                expected: "F32, F16, BF16 or F64".into(),
                found: format!("{other:?}"),
            })
        }
    })
}

/// Decodes integer data (i64, i32, u8...) into i64.
pub fn decode_i64(name: &str, location: &str, view: &TensorView<'_>) -> Result<Vec<i64>> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        Dtype::I32 => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        Dtype::U8 => b.iter().map(|&v| v as i64).collect(),
        Dtype::BOOL => b.iter().map(|&v| (v != 0) as i64).collect(),
        other => {
            return Err(Error::BadDtype {
                name: name.into(),
                location: location.into(),
                expected: "I64, I32, U8 or BOOL".into(),
                found: format!("{other:?}"),
            })
        }
    })
}

/// Parses safetensors `bytes` read from `path`; a corrupt file is an error naming it.
pub fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A tensor ready to write: (name, dtype, shape, little-endian bytes).
pub type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Writes raw tensors to `path` as safetensors, via a temporary file and a rename.
pub fn write_raw(path: &Path, tensors: &[RawTensor]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Input(format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, None).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomically(path, &data)
}

/// All tensors of a safetensors file, by name.
#[derive(Debug, Clone)]
pub struct TensorFile {
    /// Where it was read from (for messages).
    pub location: String,
    /// The tensors.
    pub tensors: BTreeMap<String, HostTensor>,
}

impl TensorFile {
    /// Reads every tensor of `path`; float dtypes become f32, integer dtypes i64.
    pub fn read(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                hint: "Pass an existing .safetensors file.".into(),
            });
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = parse_safetensors(path, &bytes)?;
        let location = path.display().to_string();
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let t = match view.dtype() {
                Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => {
                    HostTensor::F32(decode_f32(&name, &location, &view)?, shape)
                }
                _ => HostTensor::I64(decode_i64(&name, &location, &view)?, shape),
            };
            tensors.insert(name, t);
        }
        Ok(Self { location, tensors })
    }

    /// Whether `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn get(&self, name: &str) -> Result<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            location: self.location.clone(),
        })
    }

    /// Float tensor `name` with rank `rank`.
    pub fn f32(&self, name: &str, rank: usize) -> Result<(Vec<f32>, Vec<usize>)> {
        match self.get(name)? {
            HostTensor::F32(v, s) if s.len() == rank => Ok((v.clone(), s.clone())),
            t => Err(self.wrong(name, t, rank, "a float")),
        }
    }

    /// Integer tensor `name` with rank `rank`.
    pub fn i64(&self, name: &str, rank: usize) -> Result<(Vec<i64>, Vec<usize>)> {
        match self.get(name)? {
            HostTensor::I64(v, s) if s.len() == rank => Ok((v.clone(), s.clone())),
            t => Err(self.wrong(name, t, rank, "an integer")),
        }
    }

    fn wrong(&self, name: &str, t: &HostTensor, rank: usize, kind: &str) -> Error {
        Error::Input(format!(
            "{}: tensor `{name}` must be {kind} tensor of rank {rank}, found {} of shape {:?}",
            self.location,
            match t {
                HostTensor::F32(..) => "a float tensor",
                HostTensor::I64(..) => "an integer tensor",
            },
            t.shape()
        ))
    }
}

/// Writes tensors (f32 stays f32, i64 stays i64) to `path`, via a temporary file and a rename.
pub fn write_tensors(path: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
    let raw: Vec<RawTensor> = tensors
        .iter()
        .map(|(name, t)| match t {
            HostTensor::F32(v, s) => (
                name.clone(),
                Dtype::F32,
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            HostTensor::I64(v, s) => (
                name.clone(),
                Dtype::I64,
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        })
        .collect();
    write_raw(path, &raw)
}

/// Refuses an output folder (`--out`) that exists and is not empty: writing a checkpoint
/// there would mix its files with what is already in it.
pub fn require_empty_dir(dir: &Path) -> Result<()> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .next()
            .is_some()
    {
        return Err(Error::Argument {
            arg: "--out".into(),
            message: format!("{} exists and is not empty", dir.display()),
        });
    }
    Ok(())
}

/// Writes `data` to `path.tmp` and renames it onto `path`, so a crash never leaves half a file.
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, data).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
