//! `train`: one run of an experiment with burn-train's Learner. Prepares the data, loads the
//! base and injects the adapter (or resumes both from the newest checkpoint), trains, then
//! writes the final adapter, `predictions.jsonl` for the held-out samples, `loss.png`/`lr.png`
//! and `summary.json` into the output folder. A `[pretrain]` section (the demo) first builds
//! the base checkpoint by training a random small model on another task.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::data::dataloader::DataLoaderBuilder;
use burn::optim::Optimizer;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::metric::LearningRateMetric;
use burn::train::{Learner, SupervisedTraining};
use serde::Serialize;

use super::checkpoint::{latest_checkpoint, load_optimizer, CheckpointState};
use super::data::{RunOrder, TrainBatcher};
use super::devices::{grad_accum_per_device, TrainDevices};
use super::memory::StepMemory;
use super::metrics::{Quantity, QuietRenderer, ScalarMetric};
use super::optim::FusedAdamW;
use super::plot::plot_run;
use super::prepare::{
    image_options, load_base, nf4_options, prepare_data, random_base, run_encoder, tokenizer_path,
    RunData,
};
use super::schedule::{Decay, WarmupDecay};
use super::state::{read_rows, truncate_rows, RunSettings, RunState, StepRow};
use super::step::TrainModel;
use super::vision_cache::VisionCache;
use crate::adapter::inject::{inject, trainable_counts, trainable_line};
use crate::adapter::peft::{load_adapter, save_adapter};
use crate::adapter::{is_adapter_param, AdapterConfig};
use crate::checkpoint::tensor_file::write_atomically;
use crate::checkpoint::{load_model, save_model, stable_param_ids, CheckpointFiles, WeightDType};
use crate::data::batch::{CaptionBatcher, PadSide};
use crate::data::synthetic::write_synthetic_set;
use crate::data::template::ChatEncoder;
use crate::data::tokenizer::SpecialIds;
use crate::error::{Error, Result};
use crate::eval::report::{score_and_report, ReportItem};
use crate::experiment::{Checkpointing, Experiment};
use crate::infer::generate::greedy_captions;
use crate::model::config::Qwen3VlConfig;
use crate::model::params::{count_params, count_trainable};
use crate::model::Qwen3VlModel;

/// How `train` runs.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue the run in `output_dir` from its newest checkpoint.
    pub resume: bool,
    /// Show burn's terminal dashboard (stdout is a terminal) instead of log lines.
    pub dashboard: bool,
}

/// What a finished run reports (also written as `summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Output folder.
    pub output_dir: PathBuf,
    /// Optimizer steps of the run.
    pub steps: usize,
    /// Mean loss of the last tenth of the steps.
    pub final_loss: f64,
    /// Held-out captions that match their reference exactly.
    pub exact_matches: usize,
    /// Held-out samples.
    pub held_out: usize,
    /// COCO caption metrics of the held-out predictions (one reference each).
    pub scores: Option<crate::eval::CaptionScores>,
    /// Training wall time (seconds, resumed runs included).
    pub seconds: f64,
    /// Trained parameters.
    pub trainable_params: usize,
    /// All parameters.
    pub all_params: usize,
    /// Peak resident memory of the process (bytes; Linux).
    pub peak_rss_bytes: Option<u64>,
}

impl TrainReport {
    /// `held-out exact match: 0.92 (11/12)`.
    pub fn exact_match_line(&self) -> String {
        format!(
            "held-out exact match: {:.2} ({}/{})",
            self.exact_matches as f64 / self.held_out.max(1) as f64,
            self.exact_matches,
            self.held_out
        )
    }
}

/// Runs `exp`: its `[pretrain]` stage first when the base checkpoint is missing.
pub fn train<B: AutodiffBackend>(
    exp: &Experiment,
    opts: &TrainOptions,
    devices: &TrainDevices<B>,
) -> Result<TrainReport> {
    ensure_synthetic(exp)?;
    if let Some(pre) = &exp.pretrain {
        if CheckpointFiles::find(&exp.model.path).is_err() {
            let mut stage = exp.clone();
            stage.model.path = pre.config.clone();
            stage.data.train = pre.train.clone();
            stage.data.prompt = pre.prompt.clone();
            stage.train.epochs = pre.epochs;
            stage.train.lr = pre.lr;
            stage.train.batch_size = pre.batch_size;
            stage.train.grad_accum = 1;
            stage.train.warmup_steps = pre.warmup_steps;
            stage.train.output_dir = exp.train.output_dir.join("pretrain");
            stage.pretrain = None;
            // The base is trained in full, so dense; the adapter stage may quantize it.
            stage.model.quant = "none".into();
            println!(
                "pretraining the demo base ({} epochs on {}) into {}",
                pre.epochs,
                pre.train.display(),
                exp.model.path.display()
            );
            let fresh = TrainOptions {
                resume: false,
                ..opts.clone()
            };
            run_stage::<B>(&stage, None, &fresh, devices)?;
            let from = stage.train.output_dir.join("model");
            std::fs::create_dir_all(&exp.model.path).map_err(|e| Error::io(&exp.model.path, e))?;
            for f in ["config.json", "model.safetensors"] {
                let dst = exp.model.path.join(f);
                std::fs::copy(from.join(f), &dst).map_err(|e| Error::io(&dst, e))?;
            }
            let tok = tokenizer_path(&stage);
            let dst = exp.model.path.join("tokenizer.json");
            std::fs::copy(&tok, &dst).map_err(|e| Error::io(&dst, e))?;
        }
    }
    run_stage::<B>(exp, Some(&exp.adapter), opts, devices)
}

/// Generates the synthetic set when the experiment asks for one and it is missing.
fn ensure_synthetic(exp: &Experiment) -> Result<()> {
    let Some(n) = exp.data.synthetic else {
        return Ok(());
    };
    if exp.data.train.exists() {
        return Ok(());
    }
    let dir = exp.data.train.parent().unwrap_or(Path::new("."));
    println!("generating {n} synthetic samples into {}", dir.display());
    write_synthetic_set(dir, n, exp.data.synthetic_seed, SpecialIds::Compact)
}

/// Files a run writes into its output folder (a fresh run removes an earlier run's).
const RUN_FILES: [&str; 10] = [
    "metrics.csv",
    "checkpoints",
    "predictions.jsonl",
    "report.html",
    "adapter",
    "model",
    "loss.png",
    "lr.png",
    "summary.json",
    "burn",
];

/// The base model of a run and its config.json text: loaded from a checkpoint folder, or
/// random from a config.json file with the tokenizer's vocabulary and special ids.
fn base_model<B: Backend>(
    exp: &Experiment,
    enc: &ChatEncoder,
    device: &B::Device,
) -> Result<(Qwen3VlModel<B>, String, Qwen3VlConfig)> {
    let path = &exp.model.path;
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let t = &enc.tokens;
        json["text_config"]["vocab_size"] = enc.tokenizer.get_vocab_size(true).into();
        json["image_token_id"] = t.image_pad.into();
        json["video_token_id"] = t.video_pad.into();
        json["vision_start_token_id"] = t.vision_start.into();
        json["vision_end_token_id"] = t.vision_end.into();
        let text = serde_json::to_string_pretty(&json).expect("json");
        let cfg = Qwen3VlConfig::from_json(&text, path)?;
        let (model, quantized) = random_base::<B>(exp, &cfg, device)?;
        if quantized > 0 {
            println!(
                "base: NF4 ({quantized} linear layers, double quant {})",
                exp.model.double_quant
            );
        }
        return Ok((model, text, cfg));
    }
    let (cfg, model) = load_base::<B>(exp, path, device)?;
    if crate::quant::convert::is_4bit_checkpoint(path) {
        println!("base: NF4, read as stored (bitsandbytes 4-bit checkpoint)");
    } else if let Some(o) = nf4_options(exp)? {
        println!("base: NF4 (double quant {})", o.double_quant);
    }
    let file = path.join("config.json");
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    Ok((model, text, cfg))
}

fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One training stage: `adapter` None trains every weight.
fn run_stage<B: AutodiffBackend>(
    exp: &Experiment,
    adapter: Option<&AdapterConfig>,
    opts: &TrainOptions,
    devices: &TrainDevices<B>,
) -> Result<TrainReport> {
    let device = devices.main();
    let out = exp.train.output_dir.clone();
    if adapter.is_none() && nf4_options(exp)?.is_some() {
        return Err(Error::Config {
            path: out.join("config.toml"),
            field: "model.quant".into(),
            message: "an NF4 base is frozen: training every weight needs quant = \"none\"".into(),
        });
    }
    let resume_from = if opts.resume {
        Some(latest_checkpoint(&out)?.ok_or_else(|| {
            Error::Input(format!(
                "{}: no complete checkpoint to resume from (checkpoints/step-*/state.json)",
                out.display()
            ))
        })?)
    } else {
        for f in RUN_FILES {
            let p = out.join(f);
            if p.is_dir() {
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            } else if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        None
    };
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    if !opts.resume {
        write_atomically(&out.join("config.toml"), exp.to_toml().as_bytes())?;
    }
    let encoder = run_encoder(exp)?;
    // Random initialisation (and anything else drawn before the first batch) is seeded too.
    B::seed(device, exp.train.seed);
    // Model: base + adapter (or every weight), resumed from the checkpoint when asked.
    let (base, config_json, cfg) = base_model::<B>(exp, &encoder, device)?;
    let images = image_options(exp, &cfg);
    let data = prepare_data(exp, encoder, images.clone())?;
    if data.train.is_empty() {
        return Err(Error::Input(format!(
            "{}: no training samples",
            exp.data.train.display()
        )));
    }
    let mut model = match (adapter, &resume_from) {
        (Some(cfg), None) => inject(base, cfg)?.0,
        (Some(_), Some((dir, _))) => load_adapter(base, &dir.join("adapter"))?.0,
        (None, None) => base,
        (None, Some((dir, _))) => {
            let dtype = WeightDType::parse(&exp.model.dtype)?;
            load_model::<B>(&dir.join("model"), device, dtype)?.1
        }
    };
    let (trainable, all) = match adapter {
        Some(_) => trainable_counts(&mut model),
        None => {
            let n = count_params(&model);
            (n, n)
        }
    };
    let model = if adapter.is_some() {
        stable_param_ids(model, is_adapter_param)
    } else {
        stable_param_ids(model, |_| true)
    };

    let n = data.train.len();
    let replicas = devices.replicas();
    let accum = grad_accum_per_device(exp, replicas, resume_from.as_ref().map(|r| &r.1))?;
    let per_step = exp.train.batch_size * accum * replicas;
    let total_steps = exp.train.epochs * n / per_step;
    if total_steps == 0 {
        return Err(Error::Config {
            path: out.join("config.toml"),
            field: "train.batch_size".into(),
            message: format!(
                "{} epochs of {n} samples make no optimizer step of batch_size x grad_accum x \
                 devices = {per_step}",
                exp.train.epochs
            ),
        });
    }
    println!("{}", trainable_line(trainable, all));
    if replicas > 1 {
        println!(
            "data-parallel on {replicas} devices: effective batch {} per device x {replicas} \
             devices x {accum} accumulation = {per_step} samples per optimizer step",
            exp.train.batch_size
        );
    }
    println!(
        "training {} for {total_steps} optimizer steps ({} epochs x {n} samples, {} per step) into {}",
        match adapter {
            Some(a) => format!("{:?} adapter (r {})", a.kind, a.r).to_lowercase(),
            None => "every weight".into(),
        },
        exp.train.epochs,
        per_step,
        out.display()
    );

    let settings = RunSettings {
        seed: exp.train.seed,
        grad_accum: accum,
        batch_size: exp.train.batch_size,
        dynamic_loss_scale: exp.dynamic_loss_scale(),
        loss_per_sample: exp.loss_per_sample(),
        max_grad_norm: exp.train.max_grad_norm,
        log_every: if opts.dashboard {
            0
        } else {
            exp.train.log_every
        },
        save_every: exp.train.save_every,
        keep_last: exp.train.keep_last,
        total_steps,
        samples_per_epoch: n,
        out_dir: out.clone(),
        adapter: adapter.cloned(),
        base_model: exp.model.path.display().to_string(),
        max_consecutive_skips: 25,
        replicas,
        recompute_layers: exp.train.gradient_checkpointing == Checkpointing::Layers,
    };
    let run = Arc::new(RunState::new(settings, data.train_origins.clone()));
    let mut optim = FusedAdamW::for_run::<B, TrainModel<B>>(&run, exp.train.weight_decay as f32);
    let mut start = 0;
    let mut calls = 0;
    if let Some((dir, state)) = &resume_from {
        optim = optim.load_record(load_optimizer::<B, _>(dir, device)?);
        resume_progress(&run, state, truncate_rows(&out, state.step)?);
        start = state.position;
        calls = state.scheduler_calls;
        println!("resuming at step {} from {}", state.step, dir.display());
    }
    let schedule = WarmupDecay {
        peak: exp.train.lr,
        min_lr: 0.0,
        warmup_steps: exp.train.warmup_steps,
        total_steps,
        decay: if exp.train.schedule == "linear" {
            Decay::Linear
        } else {
            Decay::Cosine
        },
        // burn-train's DDP loop steps every replica's scheduler once per device per batch.
        calls_per_step: accum * replicas,
        calls,
    };

    // Data loaders: the run order from the resume position, and the held-out set.
    let batcher = CaptionBatcher {
        pad_id: data.encoder.tokens.endoftext,
        side: PadSide::Right,
        temporal_patch_size: images.temporal_patch_size,
        pad_to_multiple: 16,
    };
    let samples = Arc::new(data.train.clone());
    let end = total_steps * per_step;
    let order = RunOrder::new(samples, exp.train.epochs, exp.train.seed, true, start, end)
        .sharded(replicas, exp.train.batch_size * accum);
    let train_loader = DataLoaderBuilder::new(TrainBatcher(batcher.clone()))
        .batch_size(exp.train.batch_size)
        .build(order);
    let valid_loader =
        DataLoaderBuilder::<B::InnerBackend, _, _>::new(TrainBatcher(batcher.clone()))
            .batch_size(exp.train.batch_size)
            .build(RunOrder::once(Arc::new(data.test.clone())));

    let mut training = SupervisedTraining::new(out.join("burn"), train_loader, valid_loader)
        .metric_train_numeric(ScalarMetric::new(Quantity::Loss))
        .metric_train_numeric(ScalarMetric::new(Quantity::LmLoss))
        .metric_train_numeric(LearningRateMetric::new())
        .metric_train_numeric(ScalarMetric::new(Quantity::GradNorm))
        .metric_train_numeric(ScalarMetric::new(Quantity::TokensPerSec))
        .metric_train_numeric(ScalarMetric::new(Quantity::SamplesPerSec))
        .metric_train_numeric(ScalarMetric::new(Quantity::Skipped))
        .metric_valid_numeric(ScalarMetric::new(Quantity::Loss))
        .metric_valid_numeric(ScalarMetric::new(Quantity::LmLoss))
        .num_epochs(1)
        .with_application_logger(None);
    if let Some(a) = adapter.filter(|a| a.kind == crate::adapter::AdapterKind::Moelora) {
        training = training.metric_train_numeric(ScalarMetric::new(Quantity::AuxLoss));
        for e in 0..a.experts {
            training = training.metric_train_numeric(ScalarMetric::new(Quantity::ExpertShare(e)));
        }
    }
    if accum > 1 {
        training = training.grads_accumulation(accum);
    }
    if let Some(ddp) = devices.data_parallel_strategy() {
        training = training.with_training_strategy(ddp.into());
    }
    if !opts.dashboard {
        training = training.renderer(QuietRenderer);
    }
    let vision_cache = vision_cache_for(exp, &model);
    let learner = Learner::new(
        TrainModel {
            model,
            run: run.clone(),
            config_json: Arc::new(config_json.clone()),
            vision_cache,
            step_memory: StepMemory::from_env()?,
        },
        optim,
        schedule,
    );

    let quiet_panics = std::panic::take_hook();
    let state_for_hook = run.clone();
    std::panic::set_hook(Box::new(move |info| {
        if state_for_hook
            .error
            .lock()
            .map(|e| e.is_none())
            .unwrap_or(true)
        {
            eprintln!("{info}");
        }
    }));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| training.launch(learner)));
    std::panic::set_hook(quiet_panics);
    let trained = match result {
        Ok(r) => r.model,
        Err(panic) => {
            return Err(run.take_error().unwrap_or_else(|| {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Error::Input(super::memory::stopped_message(&msg))
            }))
        }
    };
    let mut trained: TrainModel<B::InnerBackend> = trained;
    finish::<B>(
        exp,
        adapter,
        &run,
        &data,
        &batcher,
        &mut trained,
        trainable,
        all,
    )
}

fn resume_progress(run: &RunState, state: &CheckpointState, rows: Vec<StepRow>) {
    let mut p = run.lock();
    p.step = state.step;
    p.first_step = state.step;
    p.scaler = state.scaler;
    p.skipped = state.skipped;
    p.seconds_before = state.seconds;
    p.rows = rows;
    p.checkpoints.push(state.step);
}

/// After training: final weights, predictions, plots, summary.
#[allow(clippy::too_many_arguments)]
fn finish<B: AutodiffBackend>(
    exp: &Experiment,
    adapter: Option<&AdapterConfig>,
    run: &RunState,
    data: &RunData,
    batcher: &CaptionBatcher,
    trained: &mut TrainModel<B::InnerBackend>,
    trainable: usize,
    all: usize,
) -> Result<TrainReport> {
    let out = &exp.train.output_dir;
    match adapter {
        Some(cfg) => save_adapter(
            &mut trained.model,
            cfg,
            &exp.model.path.display().to_string(),
            &out.join("adapter"),
        )?,
        None => save_model(&trained.model, &trained.config_json, &out.join("model"))?,
    }
    let mut lines = String::new();
    let mut hits = 0;
    let mut report_items = Vec::new();
    let longest = data.test.iter().map(|p| p.labels.len()).max().unwrap_or(0);
    let device = trained
        .model
        .language_model
        .embed_tokens
        .weight
        .val()
        .device();
    let generated = greedy_captions(
        &trained.model,
        batcher,
        &data.encoder,
        &data.test,
        longest.max(16) * 2,
        16,
        &device,
    )?;
    for (s, g) in data.test_samples.iter().zip(&generated) {
        let item = ReportItem::new(s.image.clone(), s.references.clone(), g.text.clone());
        hits += item.exact as usize;
        lines.push_str(
            &serde_json::json!({
                "image": s.image.display().to_string(),
                "origin": s.origin,
                "reference": s.caption,
                "references": s.references,
                "prediction": g.text,
                "exact_match": item.exact,
            })
            .to_string(),
        );
        lines.push('\n');
        report_items.push(item);
    }
    write_atomically(&out.join("predictions.jsonl"), lines.as_bytes())?;
    let title = format!("{}: held-out captions", out.display());
    let scores = score_and_report(&out.join("report.html"), &title, &report_items)?;
    let rows = read_rows(out)?;
    plot_run(out, &rows)?;
    let tail = (rows.len() / 10).max(1).min(rows.len().max(1));
    let final_loss = rows.iter().rev().take(tail).map(|r| r.loss).sum::<f64>() / tail as f64;
    let report = TrainReport {
        output_dir: out.clone(),
        steps: rows.last().map(|r| r.step).unwrap_or(0),
        final_loss,
        exact_matches: hits,
        held_out: data.test.len(),
        scores,
        seconds: rows.last().map(|r| r.seconds).unwrap_or(0.0),
        trainable_params: trainable,
        all_params: all,
        peak_rss_bytes: peak_rss(),
    };
    let json = serde_json::to_string_pretty(&report).expect("json");
    write_atomically(&out.join("summary.json"), json.as_bytes())?;
    let p = run.lock();
    println!(
        "done: {} steps in {:.1} s, final loss {:.4}, {} skipped; wrote {}",
        report.steps,
        report.seconds,
        report.final_loss,
        p.skipped,
        out.display()
    );
    match adapter {
        Some(_) => println!("{}", report.exact_match_line()),
        None => println!("base model {}", report.exact_match_line()),
    }
    if let Some(s) = &report.scores {
        println!("held-out {s}");
    }
    Ok(report)
}

/// A vision-feature cache when the experiment asks for one and the vision tower is frozen and
/// holds no adapter (then it gives the same features every epoch).
pub fn vision_cache_for<B: AutodiffBackend>(
    exp: &Experiment,
    model: &Qwen3VlModel<B>,
) -> Option<Arc<VisionCache>> {
    if !exp.train.cache_vision {
        return None;
    }
    if count_trainable(&model.visual) > 0 {
        println!("vision features recomputed every step (the vision tower is trained)");
        return None;
    }
    println!("vision features cached after each image's first pass (frozen vision tower)");
    Some(Arc::new(VisionCache::default()))
}
