//! `quantize --model DIR --out DIR`: rewrites an HF checkpoint as a bitsandbytes 4-bit one, shard
//! by shard (host memory stays around one shard). Every 2-D linear weight becomes NF4 (the
//! vision tower and mergers included, as transformers does); embeddings, `lm_head`, norms,
//! biases and the convolutional patch embedding keep their dtype and bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::tensor::Nf4Tensor;
use crate::checkpoint::shards::{CheckpointFiles, INDEX_FILE};
use crate::checkpoint::tensor_file::{
    decode_f32, parse_safetensors, require_empty_dir, write_raw, RawTensor,
};
use crate::error::{Error, Result};

/// Settings of a 4-bit checkpoint (they go into config.json's `quantization_config`).
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// Values per NF4 block (64).
    pub blocksize: usize,
    /// Double-quantize the block scales.
    pub double_quant: bool,
    /// Compute dtype recorded for loaders (`float16` or `bfloat16`).
    pub compute_dtype: String,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        Self {
            blocksize: 64,
            double_quant: true,
            compute_dtype: "float16".into(),
        }
    }
}

/// What `quantize` did.
#[derive(Debug, Clone, Default)]
pub struct QuantizeReport {
    /// Weights quantized to NF4.
    pub quantized: usize,
    /// Their values.
    pub quantized_values: usize,
    /// Tensors copied unchanged.
    pub kept: usize,
    /// Their values.
    pub kept_values: usize,
    /// Bytes of the written weight files.
    pub bytes: u64,
}

impl QuantizeReport {
    /// bitsandbytes' parameter count: packed NF4 bytes count as parameters (values / 2).
    pub fn bnb_parameters(&self) -> usize {
        self.quantized_values / 2 + self.kept_values
    }
}

/// Whether the checkpoint tensor `name` of `shape` is a linear weight bitsandbytes quantizes.
pub fn is_quantized_weight(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && name.ends_with(".weight")
        && !["embed_tokens", "lm_head", "pos_embed"]
            .iter()
            .any(|k| name.contains(k))
}

/// bitsandbytes' name for a safetensors dtype (`bfloat16`, `float16`, `float32`).
pub(crate) fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
}

/// Whether config.json of `dir` declares a bitsandbytes 4-bit checkpoint.
pub fn is_4bit_checkpoint(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|j| j["quantization_config"]["load_in_4bit"] == true)
}

/// Quantizes the checkpoint in `model` into the new folder `out` (written beside it under a
/// temporary name, then renamed, so an interrupted run leaves no half checkpoint).
pub fn quantize_checkpoint(
    model: &Path,
    out: &Path,
    opts: &QuantizeOptions,
) -> Result<QuantizeReport> {
    super::nf4::check_blocksize(opts.blocksize, "--blocksize")?;
    if is_4bit_checkpoint(model) {
        return Err(Error::Input(format!(
            "{}: already a 4-bit checkpoint (config.json has quantization_config)",
            model.display()
        )));
    }
    require_empty_dir(out)?;
    let files = CheckpointFiles::find(model)?;
    let config_path = model.join("config.json");
    let config_text =
        std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&config_text).map_err(|e| Error::Json {
            path: config_path.clone(),
            message: e.to_string(),
        })?;

    let tmp = temp_sibling(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut report = QuantizeReport::default();
    let mut weight_map = BTreeMap::new();
    for (k, shard) in files.shards.iter().enumerate() {
        let file_name = shard
            .file_name()
            .expect("shard file")
            .to_string_lossy()
            .to_string();
        let bytes = std::fs::read(shard).map_err(|e| Error::io(shard, e))?;
        let st = parse_safetensors(shard, &bytes)?;
        let location = shard.display().to_string();
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        let mut written: Vec<RawTensor> = Vec::new();
        for name in names {
            let view = st.tensor(&name).expect("listed tensor");
            let shape = view.shape().to_vec();
            let n: usize = shape.iter().product();
            if is_quantized_weight(&name, &shape) {
                let values = decode_f32(&name, &location, &view)?;
                let q = Nf4Tensor::quantize(
                    &values,
                    &shape,
                    dtype_name(view.dtype()),
                    opts.blocksize,
                    opts.double_quant,
                )
                .map_err(|e| Error::Input(format!("tensor `{name}` in {location}: {e}")))?;
                written.extend(q.to_raw(&name));
                report.quantized += 1;
                report.quantized_values += n;
            } else {
                written.push((name.clone(), view.dtype(), shape, view.data().to_vec()));
                report.kept += 1;
                report.kept_values += n;
            }
        }
        for t in &written {
            weight_map.insert(t.0.clone(), file_name.clone());
        }
        let dest = tmp.join(&file_name);
        write_raw(&dest, &written)?;
        report.bytes += std::fs::metadata(&dest)
            .map_err(|e| Error::io(&dest, e))?
            .len();
        eprintln!(
            "quantize: shard {}/{} {file_name}: {} tensors written",
            k + 1,
            files.shards.len(),
            written.len()
        );
    }
    if files.weight_map.is_some() {
        let index = serde_json::json!({
            "metadata": { "total_size": report.bytes },
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index).expect("json");
        std::fs::write(tmp.join(INDEX_FILE), text)
            .map_err(|e| Error::io(tmp.join(INDEX_FILE), e))?;
    }
    config["quantization_config"] = quantization_config(opts);
    let text = serde_json::to_string_pretty(&config).expect("json");
    std::fs::write(tmp.join("config.json"), text)
        .map_err(|e| Error::io(tmp.join("config.json"), e))?;
    copy_other_files(model, &tmp, &files)?;
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(report)
}

/// config.json's `quantization_config` as transformers writes it for bitsandbytes 4-bit.
pub fn quantization_config(opts: &QuantizeOptions) -> serde_json::Value {
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": opts.compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": opts.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

fn temp_sibling(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{}", std::process::id()));
    out.with_file_name(name)
}

/// Copies the tokenizer, processor and generation files (everything but weights and config).
fn copy_other_files(model: &Path, dest: &Path, files: &CheckpointFiles) -> Result<()> {
    for entry in std::fs::read_dir(model).map_err(|e| Error::io(model, e))? {
        let path = entry.map_err(|e| Error::io(model, e))?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let skip = !path.is_file()
            || name == "config.json"
            || name == INDEX_FILE
            || files.shards.contains(&path);
        if !skip {
            std::fs::copy(&path, dest.join(&name)).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}
