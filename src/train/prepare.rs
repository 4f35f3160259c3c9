//! The data of a training run: tokenizer, image settings from the model's patch geometry, and
//! every training and held-out sample prepared (decoded, resized, tokenised; cached on disk).

use std::path::{Path, PathBuf};

use crate::data::batch::{PreparedSample, SamplePreparer};
use crate::data::sources::{split, BadRow, Sample};
use crate::data::template::ChatEncoder;
use crate::data::tokenizer::load_tokenizer;
use crate::error::Result;
use crate::experiment::Experiment;
use crate::model::config::Qwen3VlConfig;

/// The run's tokenizer.json: `data.tokenizer`, else the one beside the model.
pub(crate) fn tokenizer_path(exp: &Experiment) -> PathBuf {
    exp.data.tokenizer.clone().unwrap_or_else(|| {
        if exp.model.path.is_dir() {
            exp.model.path.join("tokenizer.json")
        } else {
            exp.model.path.with_file_name("tokenizer.json")
        }
    })
}

/// The data of a run, prepared.
pub(crate) struct RunData {
    pub(crate) encoder: ChatEncoder,
    pub(crate) train: Vec<PreparedSample>,
    pub(crate) train_origins: Vec<String>,
    pub(crate) test: Vec<PreparedSample>,
    pub(crate) test_samples: Vec<Sample>,
}

/// The run's tokenizer with its chat tokens.
pub(crate) fn run_encoder(exp: &Experiment) -> Result<ChatEncoder> {
    let tok = tokenizer_path(exp);
    ChatEncoder::new(load_tokenizer(&tok)?, &tok.display().to_string())
}

/// The experiment's image settings with the patch geometry of model `cfg`.
pub(crate) fn image_options(exp: &Experiment, cfg: &Qwen3VlConfig) -> crate::data::ImageOptions {
    let v = &cfg.vision_config;
    crate::data::ImageOptions {
        patch_size: v.patch_size,
        temporal_patch_size: v.temporal_patch_size,
        merge_size: v.spatial_merge_size,
        ..exp.image_options()
    }
}

/// The experiment's samples, split into training and held-out parts.
fn run_split(exp: &Experiment) -> Result<crate::data::sources::Split> {
    let loaded = exp.source().read(exp.data.skip_bad)?;
    for b in &loaded.skipped {
        eprintln!("skipped {}: {}", b.origin, b.reason);
    }
    split(
        loaded.samples,
        exp.data.max_samples,
        exp.data.test_samples,
        exp.data.shuffle_seed,
    )
}

/// The experiment's sample preparer (prompt, length, image settings, on-disk cache).
fn preparer(
    exp: &Experiment,
    encoder: ChatEncoder,
    images: crate::data::ImageOptions,
) -> SamplePreparer {
    let cache = exp
        .data
        .train
        .parent()
        .unwrap_or(Path::new("."))
        .join(".cache");
    SamplePreparer {
        images,
        encoder,
        prompt: exp.data.prompt.clone(),
        max_length: exp.data.max_length,
        cache_dir: Some(cache),
    }
}

/// Only the held-out samples of the experiment, prepared (for `eval`).
pub(crate) fn prepare_held_out(
    exp: &Experiment,
    encoder: ChatEncoder,
    images: crate::data::ImageOptions,
) -> Result<(Vec<PreparedSample>, Vec<Sample>)> {
    let parts = run_split(exp)?;
    let (test, bad) = preparer(exp, encoder, images).prepare_all(&parts.test, exp.data.skip_bad)?;
    for b in &bad {
        eprintln!("skipped {}: {}", b.origin, b.reason);
    }
    Ok((test, kept(parts.test, &bad)))
}

pub(crate) fn prepare_data(
    exp: &Experiment,
    encoder: ChatEncoder,
    images: crate::data::ImageOptions,
) -> Result<RunData> {
    let parts = run_split(exp)?;
    let preparer = preparer(exp, encoder.clone(), images);
    let started = std::time::Instant::now();
    let (train, bad) = preparer.prepare_all(&parts.train, exp.data.skip_bad)?;
    let (test, bad_test) = preparer.prepare_all(&parts.test, exp.data.skip_bad)?;
    for b in bad.iter().chain(&bad_test) {
        eprintln!("skipped {}: {}", b.origin, b.reason);
    }
    let truncated = train.iter().filter(|s| s.truncated).count();
    println!(
        "data: {} training + {} held-out samples prepared in {:.1} s{}",
        train.len(),
        test.len(),
        started.elapsed().as_secs_f64(),
        if truncated > 0 {
            format!(" ({truncated} captions cut to max_length)")
        } else {
            String::new()
        }
    );
    let train_origins = kept(parts.train, &bad)
        .into_iter()
        .map(|s| s.origin)
        .collect();
    let test_samples = kept(parts.test, &bad_test);
    Ok(RunData {
        encoder,
        train,
        train_origins,
        test,
        test_samples,
    })
}

/// `samples` without the rows listed in `bad`.
fn kept(samples: Vec<Sample>, bad: &[BadRow]) -> Vec<Sample> {
    let bad: std::collections::BTreeSet<&str> = bad.iter().map(|b| b.origin.as_str()).collect();
    samples
        .into_iter()
        .filter(|s| !bad.contains(s.origin.as_str()))
        .collect()
}

/// The NF4 settings of the experiment's base (`model.quant = "nf4"`), None for a dense base.
pub fn nf4_options(exp: &Experiment) -> Result<Option<crate::quant::load::Nf4Options>> {
    if exp.model.quant != "nf4" {
        return Ok(None);
    }
    let compute = crate::checkpoint::WeightDType::parse(&exp.model.dtype)?.dtype();
    Ok(Some(crate::quant::load::Nf4Options {
        double_quant: exp.model.double_quant,
        ..crate::quant::load::Nf4Options::standard(compute)
    }))
}

/// Loads the base model from a checkpoint folder: dense, or NF4 when the experiment asks.
pub(crate) fn load_base<B: burn::prelude::Backend>(
    exp: &Experiment,
    path: &std::path::Path,
    device: &B::Device,
) -> Result<(Qwen3VlConfig, crate::model::Qwen3VlModel<B>)> {
    let dtype = crate::checkpoint::WeightDType::parse(&exp.model.dtype)?;
    crate::quant::load::load_base_model::<B>(path, device, dtype, nf4_options(exp)?)
}

/// A randomly initialised base from `cfg` in the experiment's dtype, quantized to NF4 when the
/// experiment asks; returns it and the number of layers made NF4.
pub(crate) fn random_base<B: burn::prelude::Backend>(
    exp: &Experiment,
    cfg: &Qwen3VlConfig,
    device: &B::Device,
) -> Result<(crate::model::Qwen3VlModel<B>, usize)> {
    let dtype = crate::checkpoint::WeightDType::parse(&exp.model.dtype)?;
    crate::quant::load::random_model_nf4::<B>(cfg, device, dtype, nf4_options(exp)?.as_ref())
}
