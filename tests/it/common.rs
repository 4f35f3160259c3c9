//! Paths and comparison helpers shared by the integration tests.

use std::path::{Path, PathBuf};

use qwen3_vl_moelora::checkpoint::{HostTensor, TensorFile};

pub type Cpu = burn::backend::Flex;

/// `tests/reference/...`
pub fn reference(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(name)
}

/// The tiny HF model folder.
pub fn tiny_model() -> PathBuf {
    reference("tiny-qwen3-vl")
}

/// The fixture's input tensors.
pub fn tiny_inputs() -> PathBuf {
    reference("tiny-qwen3-vl-inputs.safetensors")
}

/// HF's outputs for the fixture inputs.
pub fn tiny_reference() -> TensorFile {
    TensorFile::read(&reference("tiny-qwen3-vl-reference.safetensors")).unwrap()
}

/// The fixture's attention mask [B, T] (1 = token).
pub fn tiny_mask() -> Vec<i64> {
    TensorFile::read(&tiny_inputs())
        .unwrap()
        .i64("attention_mask", 2)
        .unwrap()
        .0
}

/// max |got − want| / max |want| over the rows of a [B, T, ...] tensor whose mask is 1
/// (all rows when `mask` is None).
pub fn rel_err(got: &HostTensor, want: &HostTensor, mask: Option<&[i64]>) -> f64 {
    let (HostTensor::F32(g, gs), HostTensor::F32(w, ws)) = (got, want) else {
        panic!("float tensors expected");
    };
    assert_eq!(gs, ws, "shape");
    let rows = mask.map_or(1, |m| m.len());
    let per = w.len() / rows;
    let (mut num, mut den) = (0f64, 0f64);
    for r in 0..rows {
        if mask.is_some_and(|m| m[r] == 0) {
            continue;
        }
        for i in r * per..(r + 1) * per {
            num = num.max((g[i] as f64 - w[i] as f64).abs());
            den = den.max((w[i] as f64).abs());
        }
    }
    num / den
}
