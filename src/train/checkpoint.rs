//! Run checkpoints: `OUTPUT/checkpoints/step-NNNNNN/` with the trained weights (a PEFT adapter
//! folder, or the whole model when every weight trains), the optimizer state, and `state.json`
//! (step, scheduler calls, loss scaler, skipped steps, clock, seed). Each is written into a
//! temporary folder and renamed into place, so a crash never leaves half a checkpoint; only
//! the last K are kept.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Record, Recorder};
use serde::{Deserialize, Serialize};

use super::state::{LossScaler, RunSettings};
use crate::adapter::peft::save_adapter;
use crate::checkpoint::save_model;
use crate::error::{Error, Result};
use crate::model::Qwen3VlModel;

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps done.
    pub step: usize,
    /// Samples consumed (the data-order position to continue from).
    pub position: usize,
    /// Learning-rate scheduler calls made.
    pub scheduler_calls: usize,
    /// Samples per optimizer step over all devices (the global batch; 0 in checkpoints written
    /// before data-parallel training existed: batch_size x grad_accum of the config).
    #[serde(default)]
    pub samples_per_step: usize,
    /// Loss scaler.
    pub scaler: LossScaler,
    /// Steps skipped so far.
    pub skipped: usize,
    /// Seconds of training so far.
    pub seconds: f64,
    /// Seed. Dropout is reseeded from (seed, sample position) at every micro-batch, so the
    /// seed and `position` are the whole random state.
    pub seed: u64,
}

/// `OUTPUT/checkpoints`.
pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn step_dir(out: &Path, step: usize) -> PathBuf {
    checkpoints_dir(out).join(format!("step-{step:06}"))
}

/// Writes the checkpoint of `state.step` and prunes to the last `keep_last`.
pub fn save_checkpoint<B: Backend, B2: Backend, R: Record<B2>>(
    model: &mut Qwen3VlModel<B>,
    config_json: &str,
    optimizer: R,
    state: &CheckpointState,
    settings: &RunSettings,
) -> Result<PathBuf> {
    let out = &settings.out_dir;
    let final_dir = step_dir(out, state.step);
    let tmp = checkpoints_dir(out).join(format!(".step-{:06}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    match &settings.adapter {
        Some(cfg) => save_adapter(model, cfg, &settings.base_model, &tmp.join("adapter"))?,
        None => save_model(model, config_json, &tmp.join("model"))?,
    }
    let optim = tmp.join("optimizer");
    NamedMpkFileRecorder::<FullPrecisionSettings>::new()
        .record(optimizer, optim.clone())
        .map_err(|e| Error::Input(format!("{}: {e}", optim.display())))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::Input(e.to_string()))?;
    std::fs::write(tmp.join("state.json"), json).map_err(|e| Error::io(&tmp, e))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    prune(out, settings.keep_last.max(1))?;
    Ok(final_dir)
}

/// Complete checkpoints of a run, oldest first.
pub fn list_checkpoints(out: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(out)) else {
        return Vec::new();
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join("state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

fn prune(out: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(out);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// The newest complete checkpoint of `out` and its state.
pub fn latest_checkpoint(out: &Path) -> Result<Option<(PathBuf, CheckpointState)>> {
    let Some((_, dir)) = list_checkpoints(out).pop() else {
        return Ok(None);
    };
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let state = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(Some((dir, state)))
}

/// The optimizer record of checkpoint `dir`.
pub fn load_optimizer<B: Backend, R: Record<B>>(dir: &Path, device: &B::Device) -> Result<R> {
    let path = dir.join("optimizer");
    NamedMpkFileRecorder::<FullPrecisionSettings>::new()
        .load(path.clone(), device)
        .map_err(|e| Error::Input(format!("{}.mpk: {e}", path.display())))
}
