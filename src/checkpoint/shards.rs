//! Finding the safetensors files of an HF checkpoint folder: one `model.safetensors`, or the
//! shards listed by `model.safetensors.index.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The weight files of a checkpoint folder.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    /// The folder.
    pub dir: PathBuf,
    /// Safetensors files in load order.
    pub shards: Vec<PathBuf>,
    /// Tensor name -> shard, when an index file exists.
    pub weight_map: Option<BTreeMap<String, PathBuf>>,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// Name of the shard index HF writes for sharded checkpoints.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

fn download_hint(dir: &Path) -> String {
    format!(
        "Download the checkpoint (config.json, {INDEX_FILE} and every model-*.safetensors shard, \
         or a single {SINGLE_FILE}; for Qwen3-VL-4B-Instruct: Qwen/Qwen3-VL-4B-Instruct from the \
         Hugging Face hub) into {}",
        dir.display()
    )
}

impl CheckpointFiles {
    /// Locates the weight files in `dir`, checking that every listed shard exists.
    pub fn find(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                hint: download_hint(dir),
            });
        }
        let index = dir.join(INDEX_FILE);
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let parsed: IndexFile = serde_json::from_str(&text).map_err(|e| Error::Json {
                path: index.clone(),
                message: e.to_string(),
            })?;
            let mut shards: Vec<PathBuf> = Vec::new();
            let mut weight_map = BTreeMap::new();
            for (name, file) in parsed.weight_map {
                let path = dir.join(&file);
                if !shards.contains(&path) {
                    if !path.exists() {
                        return Err(Error::MissingFile {
                            path,
                            hint: format!(
                                "It is listed in {} but absent: the download is incomplete. {}",
                                index.display(),
                                download_hint(dir)
                            ),
                        });
                    }
                    shards.push(path.clone());
                }
                weight_map.insert(name, path);
            }
            shards.sort();
            return Ok(Self {
                dir: dir.to_path_buf(),
                shards,
                weight_map: Some(weight_map),
            });
        }
        let single = dir.join(SINGLE_FILE);
        if single.exists() {
            return Ok(Self {
                dir: dir.to_path_buf(),
                shards: vec![single],
                weight_map: None,
            });
        }
        Err(Error::MissingFile {
            path: single,
            hint: format!(
                "No {SINGLE_FILE} and no {INDEX_FILE}. {}",
                download_hint(dir)
            ),
        })
    }
}
