//! `merge`: folds a plain LoRA adapter into the base weights, `W + (alpha / r) · B·A`, and
//! writes a full HF checkpoint, streaming shard by shard (peak host memory ≈ one shard).

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

use super::config::AdapterKind;
use super::peft::{read_adapter_config, WEIGHTS_FILE};
use crate::checkpoint::shards::CheckpointFiles;
use crate::checkpoint::tensor_file::{
    decode_f32, parse_safetensors, require_empty_dir, write_atomically, write_raw, RawTensor,
};
use crate::checkpoint::TensorFile;
use crate::error::{Error, Result};

/// Output dtype of merged weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDType {
    /// The dtype each tensor has in the base checkpoint.
    Keep,
    /// Everything as f32.
    F32,
}

/// The dense update of one module: (A [r, in], B [out, r]).
struct Update {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
    }
}

/// Merges the LoRA adapter in `adapter_dir` into the checkpoint `model_dir`, writing `out_dir`.
/// Returns the number of weights changed. MoE-LoRA adapters are refused.
pub fn merge_lora(
    model_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    dtype: MergeDType,
) -> Result<usize> {
    let cfg = read_adapter_config(adapter_dir)?;
    if cfg.kind == AdapterKind::Moelora {
        return Err(Error::Input(format!(
            "{}: a MoE-LoRA adapter cannot be merged into fixed weights: its update depends on \
             which experts the router picks for each token. Use it as an adapter (--adapter) \
             instead.",
            adapter_dir.display()
        )));
    }
    let scaling = cfg.alpha / cfg.r as f64;
    let weights = TensorFile::read(&adapter_dir.join(WEIGHTS_FILE))?;
    let mut updates: BTreeMap<String, Update> = BTreeMap::new();
    for (name, _) in weights.tensors.iter() {
        let Some(module) = name
            .strip_prefix("base_model.model.")
            .and_then(|n| n.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let (a, sa) = weights.f32(name, 2)?;
        let (b, sb) = weights.f32(&format!("base_model.model.{module}.lora_B.weight"), 2)?;
        if sa[0] != sb[1] {
            return Err(Error::Input(format!(
                "{module}: lora_A {sa:?} and lora_B {sb:?} ranks differ"
            )));
        }
        updates.insert(format!("{module}.weight"), Update { a, b, r: sa[0] });
    }
    let files = CheckpointFiles::find(model_dir)?;
    require_empty_dir(out_dir)?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut merged = 0;
    for shard in &files.shards {
        let bytes = std::fs::read(shard).map_err(|e| Error::io(shard, e))?;
        let st = parse_safetensors(shard, &bytes)?;
        let location = shard.display().to_string();
        let mut out: Vec<RawTensor> = Vec::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let target = match (dtype, view.dtype()) {
                (MergeDType::F32, Dtype::BF16 | Dtype::F16 | Dtype::F32) => Dtype::F32,
                (_, d) => d,
            };
            if let Some(u) = updates.get(&name) {
                let (o, i) = (shape[0], shape[1]);
                if u.a.len() != u.r * i || u.b.len() != o * u.r {
                    return Err(Error::ShapeMismatch {
                        name: name.clone(),
                        location: location.clone(),
                        expected: vec![u.b.len() / u.r, u.a.len() / u.r],
                        found: shape,
                    });
                }
                let mut w = decode_f32(&name, &location, &view)?;
                for row in 0..o {
                    for k in 0..u.r {
                        let bk = (scaling * u.b[row * u.r + k] as f64) as f32;
                        let a_row = &u.a[k * i..(k + 1) * i];
                        for (wv, &av) in w[row * i..(row + 1) * i].iter_mut().zip(a_row) {
                            *wv += bk * av;
                        }
                    }
                }
                out.push((name.clone(), target, shape, encode(&w, target)));
                merged += 1;
            } else if target != view.dtype() {
                let w = decode_f32(&name, &location, &view)?;
                out.push((name.clone(), target, shape, encode(&w, target)));
            } else {
                out.push((name.clone(), target, shape, view.data().to_vec()));
            }
        }
        write_raw(
            &out_dir.join(shard.file_name().expect("shard file name")),
            &out,
        )?;
    }
    if merged != updates.len() {
        let missing = updates.keys().find(|k| {
            !files
                .weight_map
                .as_ref()
                .is_some_and(|m| m.contains_key(*k))
        });
        return Err(Error::Input(format!(
            "{} of {} adapted weights were found in {} (first missing: {:?}); wrong base model?",
            merged,
            updates.len(),
            model_dir.display(),
            missing
        )));
    }
    // Everything else a checkpoint folder carries (config, tokenizer, index...) is copied.
    for entry in std::fs::read_dir(model_dir).map_err(|e| Error::io(model_dir, e))? {
        let path = entry.map_err(|e| Error::io(model_dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if path.is_file() && !name.ends_with(".safetensors") {
            let data = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let data = if name == "config.json" && dtype == MergeDType::F32 {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&data).map_err(|e| Error::Json {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                v["dtype"] = "float32".into();
                serde_json::to_vec_pretty(&v).map_err(|e| Error::Input(e.to_string()))?
            } else {
                data
            };
            write_atomically(&out_dir.join(&name), &data)?;
        }
    }
    Ok(merged)
}
