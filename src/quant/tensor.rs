//! [`Nf4Tensor`]: one NF4-quantized weight on the host, and its bitsandbytes serialization
//! (spec §A.5): the packed `weight` plus `weight.absmax`, `weight.quant_map`,
//! `weight.nested_absmax`, `weight.nested_quant_map` and `weight.quant_state.bitsandbytes__nf4`
//! (the JSON of the non-tensor fields, as UTF-8 bytes).

use safetensors::{Dtype, SafeTensors};

use super::dynamic::NestedAbsmax;
use super::nf4::{check_blocksize, dequantize_nf4, quantize_nf4, NF4_CODE};
use crate::checkpoint::tensor_file::RawTensor;
use crate::error::{Error, Result};

/// How the block scales are stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double-quantized: one byte per block plus nested f32 scales.
    Nested(NestedAbsmax),
}

/// One NF4 weight: packed codes, block scales and what bitsandbytes records about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Two codes per byte, even element in the high nibble; `[(n + 1) / 2]`.
    pub packed: Vec<u8>,
    /// The original shape, e.g. `[out, in]`.
    pub shape: Vec<usize>,
    /// Values per block.
    pub blocksize: usize,
    /// The original dtype as bitsandbytes names it (`bfloat16`, `float16`, `float32`).
    pub dtype: String,
    /// The 16-value code map (NF4).
    pub quant_map: [f32; 16],
    /// Block scales.
    pub absmax: Absmax,
}

impl Nf4Tensor {
    /// Quantizes `values` (row-major, `shape`), optionally double-quantizing the scales.
    pub fn quantize(
        values: &[f32],
        shape: &[usize],
        dtype: &str,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        check_blocksize(blocksize, "NF4 quantization")?;
        let n: usize = shape.iter().product();
        if n != values.len() {
            return Err(Error::Input(format!(
                "NF4 quantization: shape {shape:?} holds {n} values, given {}",
                values.len()
            )));
        }
        let (packed, absmax) = quantize_nf4(values, blocksize);
        Ok(Self {
            packed,
            shape: shape.to_vec(),
            blocksize,
            dtype: dtype.into(),
            quant_map: NF4_CODE,
            absmax: if double_quant {
                Absmax::Nested(NestedAbsmax::quantize(&absmax))
            } else {
                Absmax::Plain(absmax)
            },
        })
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The f32 scale of every block.
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Nested(n) => n.dequantize(),
        }
    }

    /// The dequantized values in f32 (row-major).
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize_nf4(
            &self.packed,
            &self.absmax_f32(),
            &self.quant_map,
            self.blocksize,
            self.numel(),
        )
    }

    /// Bytes it occupies (packed codes + scales + maps).
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + 16 * 4
            + match &self.absmax {
                Absmax::Plain(a) => 4 * a.len(),
                Absmax::Nested(n) => n.codes.len() + 4 * n.nested_absmax.len() + 4 * 256 + 4,
            }
    }

    /// The quant-state JSON, with bitsandbytes' key order and Python's number formatting.
    pub fn state_json(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.blocksize,
            self.dtype,
            shape.join(", ")
        );
        if let Absmax::Nested(n) = &self.absmax {
            s.push_str(&format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                n.nested_blocksize,
                python_float(n.offset as f64)
            ));
        }
        s.push('}');
        s
    }

    /// The tensors bitsandbytes writes for the weight named `name` (e.g. `...q_proj.weight`).
    pub fn to_raw(&self, name: &str) -> Vec<RawTensor> {
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut out = vec![(
            name.to_string(),
            Dtype::U8,
            vec![self.packed.len(), 1],
            self.packed.clone(),
        )];
        match &self.absmax {
            Absmax::Plain(a) => {
                out.push((format!("{name}.absmax"), Dtype::F32, vec![a.len()], f32s(a)))
            }
            Absmax::Nested(n) => {
                out.push((
                    format!("{name}.absmax"),
                    Dtype::U8,
                    vec![n.codes.len()],
                    n.codes.clone(),
                ));
                out.push((
                    format!("{name}.nested_absmax"),
                    Dtype::F32,
                    vec![n.nested_absmax.len()],
                    f32s(&n.nested_absmax),
                ));
                out.push((
                    format!("{name}.nested_quant_map"),
                    Dtype::F32,
                    vec![n.nested_map.len()],
                    f32s(&n.nested_map),
                ));
            }
        }
        out.push((
            format!("{name}.quant_map"),
            Dtype::F32,
            vec![16],
            f32s(&self.quant_map),
        ));
        let json = self.state_json().into_bytes();
        out.push((
            format!("{name}.{STATE_SUFFIX}"),
            Dtype::U8,
            vec![json.len()],
            json,
        ));
        out
    }

    /// Reads the weight `name` of a bitsandbytes checkpoint file (`location` names it in errors).
    pub fn from_safetensors(st: &SafeTensors<'_>, name: &str, location: &str) -> Result<Self> {
        let bytes = |key: &str, dtype: Dtype| -> Result<Vec<u8>> {
            let v = st.tensor(key).map_err(|_| Error::MissingTensor {
                name: key.into(),
                location: location.into(),
            })?;
            if v.dtype() != dtype {
                return Err(Error::BadDtype {
                    name: key.into(),
                    location: location.into(),
                    expected: format!("{dtype:?}"),
                    found: format!("{:?}", v.dtype()),
                });
            }
            Ok(v.data().to_vec())
        };
        let f32s = |key: &str| -> Result<Vec<f32>> {
            Ok(bytes(key, Dtype::F32)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let state_key = format!("{name}.{STATE_SUFFIX}");
        let json = String::from_utf8(bytes(&state_key, Dtype::U8)?).map_err(|e| {
            Error::Input(format!(
                "tensor `{state_key}` in {location}: not UTF-8 JSON: {e}"
            ))
        })?;
        let bad = |what: &str| {
            Error::Input(format!(
                "tensor `{state_key}` in {location}: {what} (found {json})"
            ))
        };
        let state: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
        if state["quant_type"] != "nf4" {
            return Err(bad("expected quant_type \"nf4\""));
        }
        let field = |k: &str| state[k].as_u64().map(|v| v as usize);
        let blocksize = field("blocksize").ok_or_else(|| bad("no integer `blocksize`"))?;
        check_blocksize(blocksize, &state_key)?;
        let shape: Vec<usize> = state["shape"]
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|v| v as usize)).collect())
            .ok_or_else(|| bad("no integer list `shape`"))?;
        let dtype = state["dtype"].as_str().unwrap_or("float32").to_string();
        let quant_map: [f32; 16] = f32s(&format!("{name}.quant_map"))?
            .try_into()
            .map_err(|_| bad("`quant_map` must hold 16 values"))?;
        let n: usize = shape.iter().product();
        let blocks = n.div_ceil(blocksize);
        let packed = bytes(name, Dtype::U8)?;
        if packed.len() != n.div_ceil(2) {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                location: location.into(),
                expected: vec![n.div_ceil(2), 1],
                found: vec![packed.len()],
            });
        }
        let absmax_key = format!("{name}.absmax");
        let absmax = match field("nested_blocksize") {
            None => Absmax::Plain(f32s(&absmax_key)?),
            Some(nested_blocksize) => {
                let offset = state["nested_offset"]
                    .as_f64()
                    .ok_or_else(|| bad("no number `nested_offset`"))?
                    as f32;
                Absmax::Nested(NestedAbsmax {
                    codes: bytes(&absmax_key, Dtype::U8)?,
                    nested_absmax: f32s(&format!("{name}.nested_absmax"))?,
                    nested_map: f32s(&format!("{name}.nested_quant_map"))?,
                    nested_blocksize,
                    offset,
                })
            }
        };
        let (scales, nested_len) = match &absmax {
            Absmax::Plain(a) => (a.len(), None),
            Absmax::Nested(nq) => (
                nq.codes.len(),
                Some((nq.nested_absmax.len(), nq.nested_map.len())),
            ),
        };
        if scales != blocks {
            return Err(Error::ShapeMismatch {
                name: absmax_key,
                location: location.into(),
                expected: vec![blocks],
                found: vec![scales],
            });
        }
        if let Some((nested, map)) = nested_len {
            let want = blocks.div_ceil(field("nested_blocksize").unwrap_or(256).max(1));
            if nested != want || map != 256 {
                return Err(bad(&format!(
                    "expected {want} nested scales and a 256-value map, found {nested} and {map}"
                )));
            }
        }
        Ok(Self {
            packed,
            shape,
            blocksize,
            dtype,
            quant_map,
            absmax,
        })
    }
}

/// Key suffix of the quant-state JSON tensor.
pub const STATE_SUFFIX: &str = "quant_state.bitsandbytes__nf4";

/// A float as Python's `repr` writes it (shortest round-trip digits; exponent form below 1e-4
/// or from 1e16, written `1e-05`).
pub fn python_float(v: f64) -> String {
    if v == 0.0 || (1e-4..1e16).contains(&v.abs()) {
        let s = format!("{v}");
        if s.contains('.') || s.contains("inf") || s.contains("NaN") {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        // Rust: "1.5e-5"; Python: "1.5e-05".
        let s = format!("{v:e}");
        let (mantissa, exp) = s.split_once('e').expect("exponent form");
        let exp: i32 = exp.parse().expect("exponent");
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_matches_repr() {
        assert_eq!(python_float(0.0520479641854763), "0.0520479641854763");
        assert_eq!(python_float(1.5e-5), "1.5e-05");
        assert_eq!(python_float(2.0), "2.0");
        assert_eq!(python_float(0.0001), "0.0001");
        assert_eq!(python_float(1e16), "1e+16");
    }
}
