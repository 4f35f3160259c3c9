//! Finding and loading what inference runs: a trained adapter (or fully trained model) given by
//! plain local path — a training output folder, one of its checkpoints, or a peft adapter
//! folder — and the base model under it, dense or NF4.

use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::adapter::peft::load_adapter;
use crate::checkpoint::WeightDType;
use crate::error::{Error, Result};
use crate::experiment::Experiment;
use crate::model::{Qwen3VlConfig, Qwen3VlModel};
use crate::quant::load::{load_base_model, weights_on_device, Nf4Options};
use crate::train::checkpoint::latest_checkpoint;

/// A trained result found on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum Trained {
    /// An adapter folder (adapter_config.json + weights) to put on a base model.
    Adapter(PathBuf),
    /// A fully trained model folder (config.json + model.safetensors), used instead of a base.
    Model(PathBuf),
}

/// What a `--adapter` / `--checkpoint` path resolved to, with the training run it came from.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The adapter or model folder.
    pub trained: Trained,
    /// The run's resolved experiment (`config.toml` of its output folder), when found.
    pub run: Option<Experiment>,
}

fn has(dir: &Path, file: &str) -> bool {
    dir.join(file).is_file()
}

/// Resolves `path`: a peft adapter folder; a training output folder (its final `adapter/` or
/// `model/`, else its newest checkpoint); or one checkpoint folder. Never a hub id.
pub fn resolve_trained(path: &Path) -> Result<Resolved> {
    if !path.exists() {
        return Err(Error::Input(format!(
            "{} does not exist (expected a local folder: a training output folder, one of its \
             checkpoints, or a peft adapter folder; hub ids are not downloaded)",
            path.display()
        )));
    }
    let trained = if has(path, "adapter_config.json") {
        Trained::Adapter(path.to_path_buf())
    } else if has(&path.join("adapter"), "adapter_config.json") {
        Trained::Adapter(path.join("adapter"))
    } else if has(&path.join("model"), "config.json") {
        Trained::Model(path.join("model"))
    } else if let Some((ck, _)) = latest_checkpoint(path)? {
        if has(&ck.join("adapter"), "adapter_config.json") {
            Trained::Adapter(ck.join("adapter"))
        } else if has(&ck.join("model"), "config.json") {
            Trained::Model(ck.join("model"))
        } else {
            return Err(Error::Input(format!(
                "checkpoint {} holds neither adapter/ nor model/",
                ck.display()
            )));
        }
    } else {
        return Err(Error::Input(format!(
            "{} holds no adapter: expected adapter_config.json in it, or a training output \
             folder with adapter/, model/ or checkpoints/",
            path.display()
        )));
    };
    Ok(Resolved {
        run: find_run(&trained),
        trained,
    })
}

/// The experiment of the output folder that holds `trained` (up to three levels up: `adapter/`,
/// `checkpoints/step-N/adapter/`).
fn find_run(trained: &Trained) -> Option<Experiment> {
    let (Trained::Adapter(dir) | Trained::Model(dir)) = trained;
    let file = dir
        .ancestors()
        .take(4)
        .map(|d| d.join("config.toml"))
        .find(|f| f.is_file())?;
    match Experiment::load(&file, &[]) {
        Ok(exp) => Some(exp),
        Err(e) => {
            eprintln!(
                "warning: ignoring the run settings in {}: {e}",
                file.display()
            );
            None
        }
    }
}

/// How to load the base model.
#[derive(Debug, Clone, Copy)]
pub struct BaseOptions {
    /// Weight and activation dtype.
    pub dtype: WeightDType,
    /// Quantize the linear layers to NF4 while loading (a 4-bit checkpoint always loads as NF4).
    pub nf4: bool,
}

/// Whether inference joins each decoder layer's plain dense q/k/v and gate/up projections
/// (`TextModel::fuse_dense_projections`): `QWEN3VL_FUSE_PROJECTIONS=0` keeps them apart (for
/// comparisons).
pub fn projection_fusion_enabled() -> bool {
    std::env::var("QWEN3VL_FUSE_PROJECTIONS").map_or(true, |v| v != "0")
}

/// Joins `model`'s plain dense projections for decoding (`TextModel::fuse_dense_projections`,
/// unless [`projection_fusion_enabled`] says no), the joined weights in device allocations of
/// their own like the rest of the weights; returns the model and how many groups were joined.
pub fn join_projections<B: Backend>(
    model: Qwen3VlModel<B>,
    device: &B::Device,
) -> Result<(Qwen3VlModel<B>, usize)> {
    if !projection_fusion_enabled() {
        return Ok((model, 0));
    }
    let cell = std::sync::Mutex::new(Some(model));
    weights_on_device::<B, _>(device, || {
        let mut model = cell
            .lock()
            .expect("model lock")
            .take()
            .expect("joined once");
        let joined = model.language_model.fuse_dense_projections();
        Ok((model, joined))
    })
}

/// Loads the base at `model_dir` and puts `trained` on it (or loads the trained model itself);
/// plain dense projections are joined for decoding (`TextModel::fuse_dense_projections`).
pub fn load_for_inference<B: Backend>(
    model_dir: &Path,
    trained: Option<&Trained>,
    opts: BaseOptions,
    device: &B::Device,
) -> Result<(Qwen3VlConfig, Qwen3VlModel<B>)> {
    let base_dir = match trained {
        Some(Trained::Model(dir)) => dir.as_path(),
        _ => model_dir,
    };
    let nf4 = opts.nf4.then(|| Nf4Options::standard(opts.dtype.dtype()));
    let (cfg, model) = load_base_model::<B>(base_dir, device, opts.dtype, nf4)?;
    let model = match trained {
        Some(Trained::Adapter(dir)) => load_adapter(model, dir)?.0,
        _ => model,
    };
    Ok((cfg, join_projections(model, device)?.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_paths_are_clear_errors() {
        let e = resolve_trained(Path::new("no/such/run")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = resolve_trained(dir.path()).unwrap_err();
        assert!(e.to_string().contains("holds no adapter"), "{e}");
        std::fs::create_dir_all(dir.path().join("adapter")).unwrap();
        std::fs::write(dir.path().join("adapter/adapter_config.json"), "{}").unwrap();
        let r = resolve_trained(dir.path()).unwrap();
        assert_eq!(r.trained, Trained::Adapter(dir.path().join("adapter")));
    }
}
