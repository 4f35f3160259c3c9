//! `eval`: caption an experiment's held-out samples with its trained adapter, score them
//! (BLEU-1..4, ROUGE-L, CIDEr-D as pycocoevalcap) and write `eval.json` and `report.html`.

use std::path::PathBuf;
use std::time::Instant;

use burn::prelude::*;
use serde::Serialize;

use super::args::EvalArgs;
use super::caption::generate_options;
use crate::checkpoint::tensor_file::write_atomically;
use crate::checkpoint::WeightDType;
use crate::data::batch::CaptionBatcher;
use crate::error::{Error, Result};
use crate::eval::report::{score_and_report, ReportItem};
use crate::eval::CaptionScores;
use crate::experiment::Experiment;
use crate::infer::generate::caption_samples;
use crate::infer::load::{load_for_inference, resolve_trained, BaseOptions, Trained};
use crate::infer::sampling::GenerationConfig;
use crate::train::prepare::{image_options, prepare_held_out, run_encoder};

/// One evaluated sample.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPrediction {
    /// Image file.
    pub image: String,
    /// Where the sample came from (file and row).
    pub origin: String,
    /// Reference captions.
    pub references: Vec<String>,
    /// Generated caption.
    pub prediction: String,
    /// Equal to a reference up to case and whitespace.
    pub exact_match: bool,
}

/// The content of `eval.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The experiment file.
    pub config: String,
    /// The adapter or model evaluated.
    pub trained: String,
    /// Held-out samples captioned.
    pub samples: usize,
    /// Predictions equal to a reference.
    pub exact_matches: usize,
    /// Corpus scores.
    pub scores: Option<CaptionScores>,
    /// Wall time of captioning, in seconds.
    pub seconds: f64,
    /// Every prediction.
    pub predictions: Vec<EvalPrediction>,
}

/// Runs `eval` and returns its report (also written to disk).
pub fn run_eval<B: Backend>(args: &EvalArgs, device: &B::Device) -> Result<EvalReport> {
    let exp = Experiment::load(&args.config, &args.set)?;
    let from = args
        .checkpoint
        .clone()
        .unwrap_or_else(|| exp.train.output_dir.clone());
    let resolved = resolve_trained(&from)?;
    if !exp.model.path.is_dir() && !matches!(resolved.trained, Trained::Model(_)) {
        return Err(Error::Input(format!(
            "model.path = {} is not a checkpoint folder: eval needs the base the adapter was \
             trained on",
            exp.model.path.display()
        )));
    }
    let encoder = run_encoder(&exp)?;
    let opts = BaseOptions {
        dtype: WeightDType::parse(&exp.model.dtype)?,
        nf4: exp.model.quant == "nf4",
    };
    let (cfg, model) =
        load_for_inference::<B>(&exp.model.path, Some(&resolved.trained), opts, device)?;
    let (Trained::Adapter(trained) | Trained::Model(trained)) = &resolved.trained;
    println!(
        "eval: {} on {}",
        trained.display(),
        exp.model.path.display()
    );
    let (samples, meta) = prepare_held_out(&exp, encoder.clone(), image_options(&exp, &cfg))?;
    if samples.is_empty() {
        return Err(Error::Config {
            path: args.config.clone(),
            field: "data.test_samples".into(),
            message: "no held-out samples to evaluate".into(),
        });
    }
    // Greedy unless asked otherwise: scores should not depend on a seed by default.
    let generation = generate_options(
        &args.generation,
        GenerationConfig::from_model_dir(&exp.model.path)?.map(|mut g| {
            g.sampling.do_sample = false;
            g
        }),
        encoder.tokens.im_end,
    )?;
    let batcher = CaptionBatcher::for_generation(
        encoder.tokens.endoftext,
        cfg.vision_config.temporal_patch_size,
    );
    let bar = indicatif::ProgressBar::new(samples.len() as u64);
    let started = Instant::now();
    let generated = caption_samples(
        &model,
        &batcher,
        &encoder,
        &samples,
        &generation,
        args.batch_size,
        device,
        |n| bar.set_position(n as u64),
    )?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let items: Vec<ReportItem> = meta
        .iter()
        .zip(&generated)
        .map(|(s, g)| ReportItem::new(s.image.clone(), s.references.clone(), g.text.clone()))
        .collect();
    let out: PathBuf = args.out.clone().unwrap_or_else(|| match &resolved.run {
        Some(run) => run.train.output_dir.clone(),
        None => from.clone(),
    });
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let title = format!("eval of {}", trained.display());
    let scores = score_and_report(&out.join("report.html"), &title, &items)?;
    let report = EvalReport {
        config: args.config.display().to_string(),
        trained: trained.display().to_string(),
        samples: items.len(),
        exact_matches: items.iter().filter(|i| i.exact).count(),
        scores,
        seconds,
        predictions: meta
            .iter()
            .zip(&items)
            .map(|(s, i)| EvalPrediction {
                image: s.image.display().to_string(),
                origin: s.origin.clone(),
                references: i.references.clone(),
                prediction: i.prediction.clone(),
                exact_match: i.exact,
            })
            .collect(),
    };
    let json = serde_json::to_string_pretty(&report).expect("json");
    write_atomically(&out.join("eval.json"), json.as_bytes())?;
    println!(
        "held-out exact match: {:.2} ({}/{}) in {seconds:.1} s",
        report.exact_matches as f64 / report.samples as f64,
        report.exact_matches,
        report.samples
    );
    if let Some(s) = &report.scores {
        println!("{s}");
    }
    println!(
        "wrote {} and {}",
        out.join("eval.json").display(),
        out.join("report.html").display()
    );
    Ok(report)
}
