//! `bench train`: times the real training step (the same [`TrainModel`] step and optimize that
//! `train` runs, with loss scaling, clipping and AdamW) on one synthetic sample shaped like the
//! reference workload: one image of the experiment's resize, ~120 tokens, the experiment's
//! batch size x gradient accumulation (the reference: 1 x 8). Weights may be random: speed
//! does not depend on them.

use std::sync::Arc;
use std::time::Instant;

use burn::optim::GradientsAccumulator;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::TrainStep;
use serde::Serialize;

use super::data::{TrainBatch, TrainBatcher, TrainItem};
use super::memory::StepMemory;
use super::optim::FusedAdamW;
use super::prepare::{image_options, load_base, random_base};
use super::state::{RunSettings, RunState};
use super::step::TrainModel;
use crate::adapter::inject::{inject, trainable_counts};
use crate::adapter::is_adapter_param;
use crate::checkpoint::stable_param_ids;
use crate::data::batch::{CaptionBatcher, PadSide, PreparedSample};
use crate::data::template::IGNORE_INDEX;
use crate::error::{Error, Result};
use crate::experiment::{Checkpointing, Experiment};
use crate::model::config::Qwen3VlConfig;

/// What `bench train` measures.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Timed optimizer steps.
    pub steps: usize,
    /// Untimed optimizer steps first (kernel compilation, autotuning, allocator warm-up).
    pub warmup: usize,
    /// Random weights from the config alone instead of loading the checkpoint.
    pub random_weights: bool,
    /// Tokens per sample (image tokens included).
    pub tokens: usize,
    /// Dense f16/bf16 tensor-core peak of the card in TFLOP/s, for the utilisation figure.
    pub peak_tflops: f64,
    /// Reads the device allocator's pools on the calling thread (CUDA; None elsewhere).
    pub memory: Option<MemoryReader>,
}

/// What the device allocator holds, read on the thread that allocates (CubeCL keeps pools per
/// stream, and a stream per thread).
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolMemory {
    /// Bytes of live tensors.
    pub in_use: u64,
    /// Bytes the pools have reserved from the driver (live tensors plus free pool space).
    pub reserved: u64,
}

/// Reads the pools of a device given as `&dyn Any` (None when it is not one it knows).
pub type MemoryReader = fn(&dyn std::any::Any) -> Option<PoolMemory>;

/// The result of `bench train` (printed as one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Tokens per sample.
    pub seq_tokens: usize,
    /// Image patches per sample (vision tower tokens).
    pub image_patches: usize,
    /// Samples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Median seconds per optimizer step.
    pub step_s_median: f64,
    /// Fastest optimizer step.
    pub step_s_min: f64,
    /// Samples per second at the median step time.
    pub samples_per_s: f64,
    /// Tokens per second at the median step time.
    pub tokens_per_s: f64,
    /// Model FLOPs per sample (forward + backward to the activations, + the forward again
    /// with layer recomputation).
    pub flops_per_sample: f64,
    /// Achieved model FLOP/s over the card's peak.
    pub mfu: f64,
    /// Trainable (adapter) parameters.
    pub trainable: usize,
    /// All parameters.
    pub params: usize,
    /// Seconds of the warm-up steps (compilation included).
    pub warmup_s: f64,
    /// MiB of live device tensors once the model is built (weights), when readable.
    pub weights_mib: Option<f64>,
    /// Most MiB of live device tensors seen between micro-batches and optimizer steps (the
    /// peak inside a backward pass is higher and not visible from here).
    pub in_use_mib: Option<f64>,
    /// Most MiB the device allocator had reserved from the driver.
    pub reserved_mib: Option<f64>,
    /// How the timed steps allocated: `pools` or `exact` (see `train::memory`).
    pub step_allocations: String,
}

/// Matmul weights the forward pass multiplies by: (text decoder + lm_head per text token,
/// vision tower + mergers per image patch).
pub fn matmul_params(cfg: &Qwen3VlConfig) -> (f64, f64) {
    let t = &cfg.text_config;
    let (h, i) = (t.hidden_size as f64, t.intermediate_size as f64);
    let (q, kv) = (
        (t.num_attention_heads * t.head_dim()) as f64,
        (t.kv_heads() * t.head_dim()) as f64,
    );
    let text_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * i;
    let text = text_layer * t.num_hidden_layers as f64 + h * t.vocab_size as f64;
    let v = &cfg.vision_config;
    let (vh, vi) = (v.hidden_size as f64, v.intermediate_size as f64);
    let vision_layer = 4.0 * vh * vh + 2.0 * vh * vi;
    let merge = (v.spatial_merge_size * v.spatial_merge_size) as f64;
    // Each merger maps merge² patches at once: per patch, (vh·m)² + vh·m·out over m patches.
    let merger = ((vh * merge).powi(2) + vh * merge * v.out_hidden_size as f64) / merge;
    let patch_embed =
        (v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size) as f64 * vh;
    let vision = vision_layer * v.depth as f64
        + merger * (1 + v.deepstack_visual_indexes.len()) as f64
        + patch_embed;
    (text, vision)
}

/// One synthetic sample: `<vision_start>`, the image's pad tokens, `<vision_end>`, a prompt,
/// then caption tokens (the loss targets) up to `tokens` in all.
fn synthetic_sample(cfg: &Qwen3VlConfig, grid: [usize; 3], tokens: usize) -> PreparedSample {
    let v = &cfg.vision_config;
    let n_img = grid.iter().product::<usize>() / (v.spatial_merge_size * v.spatial_merge_size);
    let special = [
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.vision_start_token_id,
        cfg.vision_end_token_id,
    ];
    let vocab = cfg.text_config.vocab_size as u32;
    let mut next = 0u32;
    let mut filler = move || loop {
        next += 1;
        let id = (1000 + next * 7) % vocab;
        if !special.contains(&id) {
            return id;
        }
    };
    let mut ids: Vec<u32> = (0..3).map(|_| filler()).collect();
    ids.push(cfg.vision_start_token_id);
    ids.extend(std::iter::repeat_n(cfg.image_token_id, n_img));
    ids.push(cfg.vision_end_token_id);
    ids.extend((0..10).map(|_| filler()));
    let prompt = ids.len();
    while ids.len() < tokens.max(prompt + 2) {
        ids.push(filler());
    }
    let labels = ids
        .iter()
        .enumerate()
        .map(|(p, &id)| if p < prompt { IGNORE_INDEX } else { id as i64 })
        .collect();
    let per_patch = v.in_channels * v.patch_size * v.patch_size;
    let patches = grid.iter().product::<usize>();
    let levels = (0..patches * per_patch)
        .map(|k| (k.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    PreparedSample {
        input_ids: ids,
        labels,
        levels,
        grid_thw: grid,
        truncated: false,
    }
}

/// The model config and, unless random, its weights (NF4 base when the experiment asks):
/// `path` is a model folder or config.json.
fn bench_model<B: Backend>(
    exp: &Experiment,
    random: bool,
    device: &B::Device,
) -> Result<(Qwen3VlConfig, crate::model::Qwen3VlModel<B>)> {
    let path = &exp.model.path;
    if !random {
        return load_base::<B>(exp, path, device);
    }
    let file = crate::model::config::config_file(path);
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let cfg = Qwen3VlConfig::from_json(&text, &file)?;
    let (model, _) = random_base::<B>(exp, &cfg, device)?;
    Ok((cfg, model))
}

/// Runs `warmup + steps` optimizer steps of the experiment's adapter training on `device`.
pub fn bench_train<B: AutodiffBackend>(
    exp: &Experiment,
    opts: &BenchOptions,
    device: &B::Device,
) -> Result<BenchReport> {
    let setup = Instant::now();
    B::seed(device, exp.train.seed);
    let (cfg, base) = bench_model::<B>(exp, opts.random_weights, device)?;
    let mut model = inject(base, &exp.adapter)?.0;
    let (trainable, params) = trainable_counts(&mut model);
    let model = stable_param_ids(model, is_adapter_param);

    let images = image_options(exp, &cfg);
    let (h, w) = images.target_size(480, 640)?;
    let p = cfg.vision_config.patch_size;
    let grid = [1, h / p, w / p];
    let sample = synthetic_sample(&cfg, grid, opts.tokens);
    let seq_tokens = sample.input_ids.len();
    let batcher = TrainBatcher(CaptionBatcher {
        pad_id: 0,
        side: PadSide::Right,
        temporal_patch_size: cfg.vision_config.temporal_patch_size,
        pad_to_multiple: 1,
    });
    let (bs, ga) = (exp.train.batch_size, exp.train.grad_accum);
    let out_dir = std::env::temp_dir().join(format!("qwen3-vl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let settings = RunSettings {
        seed: exp.train.seed,
        grad_accum: ga,
        batch_size: bs,
        dynamic_loss_scale: exp.dynamic_loss_scale(),
        loss_per_sample: exp.loss_per_sample(),
        max_grad_norm: exp.train.max_grad_norm,
        log_every: 0,
        save_every: 0,
        keep_last: 1,
        total_steps: usize::MAX,
        samples_per_epoch: 1,
        out_dir: out_dir.clone(),
        adapter: Some(exp.adapter.clone()),
        base_model: exp.model.path.display().to_string(),
        max_consecutive_skips: usize::MAX,
        replicas: 1,
        recompute_layers: exp.train.gradient_checkpointing == Checkpointing::Layers,
    };
    let run = Arc::new(RunState::new(
        settings,
        vec!["synthetic bench sample".into(); bs],
    ));
    let vision_trained = crate::model::params::count_trainable(&model.visual) > 0;
    let vision_cache = super::run::vision_cache_for(exp, &model);
    // Vision FLOPs per patch factor: forward + backward when trained, forward only when
    // frozen, none when its features come from the cache (every step after the first).
    let vision_factor = match (vision_trained, vision_cache.is_some()) {
        (true, _) => 4.0,
        (false, false) => 2.0,
        (false, true) => 0.0,
    };
    let mut model = TrainModel {
        model,
        run,
        config_json: Arc::new(String::new()),
        vision_cache,
        step_memory: StepMemory::from_env()?,
    };
    let mut optim =
        FusedAdamW::for_run::<B, TrainModel<B>>(&model.run, exp.train.weight_decay as f32);

    let mib = |b: u64| b as f64 / 1048576.0;
    let read_memory = || {
        opts.memory
            .and_then(|read| read(device as &dyn std::any::Any))
    };
    let built = read_memory();
    let weights_mib = built.map(|m| mib(m.in_use));
    if let Some(m) = built {
        eprintln!(
            "device memory after building the model: {:.0} MiB of live tensors, {:.0} MiB reserved",
            mib(m.in_use),
            mib(m.reserved)
        );
    }
    let mut seen: Option<PoolMemory> = None;
    // Reads the device memory, folds it into the maxima `seen` and returns the reading.
    let note_memory = |seen: &mut Option<PoolMemory>| {
        let m = read_memory()?;
        let s = seen.get_or_insert(m);
        s.in_use = s.in_use.max(m.in_use);
        s.reserved = s.reserved.max(m.reserved);
        Some(m)
    };

    let mut times = Vec::new();
    let started = Instant::now();
    eprintln!("model ready in {:.1} s", setup.elapsed().as_secs_f64());
    let mut warmup_s = 0.0;
    let mut host_profile = None;
    for step in 0..opts.warmup + opts.steps {
        if step == opts.warmup {
            host_profile = Some(super::host_profile::HostProfile::start());
        }
        let t0 = Instant::now();
        let mut acc = GradientsAccumulator::<TrainModel<B>>::new();
        for micro in 0..ga {
            // `bs` copies of the sample as `bs` training samples (own vision cache entries).
            let items = (0..bs)
                .map(|i| TrainItem {
                    sample: sample.clone(),
                    position: (step * ga + micro) * bs + i,
                    index: i,
                })
                .collect();
            let batch: TrainBatch<B> =
                burn::data::dataloader::batcher::Batcher::batch(&batcher, items, device);
            let out = model.step(batch);
            let memory = note_memory(&mut seen);
            acc.accumulate(&model, out.grads);
            if step < opts.warmup {
                // The first micro-batches compile and autotune every kernel: show where time goes.
                eprintln!(
                    "warm-up micro-batch {}/{ga}: {:.1} s since start",
                    micro + 1,
                    started.elapsed().as_secs_f64()
                );
                if let Some(m) = memory {
                    eprintln!(
                        "after micro-batch {}: {:.0} MiB live, {:.0} MiB reserved",
                        micro + 1,
                        mib(m.in_use),
                        mib(m.reserved)
                    );
                }
            }
        }
        model = model.optimize(&mut optim, exp.train.lr, acc.grads());
        B::sync(device).map_err(|e| Error::Input(format!("device error: {e:?}")))?;
        let dt = t0.elapsed().as_secs_f64();
        let _ = note_memory(&mut seen);
        if step < opts.warmup {
            warmup_s = started.elapsed().as_secs_f64();
            eprintln!("warm-up step {}/{}: {dt:.2} s", step + 1, opts.warmup);
            if let Some(m) = &seen {
                eprintln!(
                    "device memory so far: live tensors up to {:.0} MiB between micro-batches, \
                     reserved up to {:.0} MiB",
                    mib(m.in_use),
                    mib(m.reserved)
                );
            }
        } else {
            times.push(dt);
        }
    }
    if let Some(p) = host_profile {
        p.finish();
    }
    // Each step's loss and gradient norm (the same seed gives the same values on every
    // variant of the step: a quick check that an optimisation kept the math).
    for r in super::state::read_rows(&out_dir).unwrap_or_default() {
        eprintln!(
            "bench step {}: loss {:.6}, grad norm {:.6}, loss scale {}",
            r.step, r.loss, r.grad_norm, r.loss_scale
        );
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    if times.is_empty() {
        return Err(Error::Argument {
            arg: "--steps".into(),
            message: "must be at least 1".into(),
        });
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let samples_per_s = (bs * ga) as f64 / median;
    let (text, vision) = matmul_params(&cfg);
    let patches = grid.iter().product::<usize>();
    // Text: forward 2·N·T plus the backward pass to the activations 2·N·T, plus the forward
    // again when each layer is recomputed.
    let text_factor = match exp.train.gradient_checkpointing {
        Checkpointing::Layers => 6.0,
        _ => 4.0,
    };
    let flops_per_sample =
        text_factor * text * seq_tokens as f64 + vision_factor * vision * patches as f64;
    Ok(BenchReport {
        seq_tokens,
        image_patches: patches,
        batch_size: bs,
        grad_accum: ga,
        step_s_median: median,
        step_s_min: times[0],
        samples_per_s,
        tokens_per_s: samples_per_s * seq_tokens as f64,
        flops_per_sample,
        mfu: flops_per_sample * samples_per_s / (opts.peak_tflops * 1e12),
        trainable,
        params,
        warmup_s,
        weights_mib,
        in_use_mib: seen.map(|m| mib(m.in_use)),
        reserved_mib: seen.map(|m| mib(m.reserved)),
        step_allocations: if model.step_memory.pooled() {
            "pools"
        } else {
            "exact"
        }
        .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_4b_matmul_weights_add_up() {
        let path = Path::new("model/configs/qwen3-vl-4b-instruct.json");
        let text = std::fs::read_to_string(path).unwrap();
        let cfg = Qwen3VlConfig::from_json(&text, path).unwrap();
        let (t, v) = matmul_params(&cfg);
        // Text: 36 layers x 100.9 M + lm_head 389 M; vision per patch: 24 x 12.6 M, a quarter of
        // each of the 4 mergers (27.3 M, applied per 4 patches) and the patch embedding.
        assert!((t / 1e9 - 4.02).abs() < 0.01, "{t}");
        assert!((v / 1e6 - 331.0).abs() < 1.0, "{v}");
    }

    #[test]
    fn synthetic_sample_has_the_reference_shape() {
        let path = Path::new("model/configs/qwen3-vl-4b-instruct.json");
        let text = std::fs::read_to_string(path).unwrap();
        let cfg = Qwen3VlConfig::from_json(&text, path).unwrap();
        let s = synthetic_sample(&cfg, [1, 18, 18], 120);
        assert_eq!(s.input_ids.len(), 120);
        let pads = s
            .input_ids
            .iter()
            .filter(|&&i| i == cfg.image_token_id)
            .count();
        assert_eq!(pads, 81);
        assert_eq!(s.labels.iter().filter(|&&l| l != IGNORE_INDEX).count(), 24);
        assert_eq!(s.levels.len(), 324 * 3 * 256);
    }
}
