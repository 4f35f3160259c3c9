//! `bench generate`: prefill time and decode tokens/s of the real generation loop
//! ([`generate`]: KV cache, host-side token choice) on a synthetic captioning prompt — one image
//! (81 image tokens for a 280x280 picture) and text up to `prompt_tokens` — with random weights
//! (speed does not depend on the values).

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use serde::Serialize;

use super::generate::{generate, GenerateOptions};
use crate::checkpoint::WeightDType;
use crate::cli::forward::median;
use crate::error::{Error, Result};
use crate::model::{KvCache, ModelInputs, Qwen3VlConfig};
use crate::quant::load::{random_model_nf4, Nf4Options};

/// What `bench generate` measures.
#[derive(Debug, Clone)]
pub struct GenerateBenchOptions {
    /// Rows generated together.
    pub batch: usize,
    /// Prompt tokens per row, image tokens included.
    pub prompt_tokens: usize,
    /// Image side in patches (18 = the reference's 280x280 -> 288x288: 81 image tokens).
    pub image_patches_per_side: usize,
    /// New tokens per row (no stop token: every row runs to the end).
    pub new_tokens: usize,
    /// Timed generations (the median is reported) after one untimed warm-up.
    pub repeats: usize,
    /// Weight and activation dtype.
    pub dtype: WeightDType,
    /// NF4 base (bitsandbytes layout, double quant).
    pub nf4: bool,
}

/// The result of `bench generate` (printed as one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBenchReport {
    /// Rows.
    pub batch: usize,
    /// Prompt tokens per row.
    pub prompt_tokens: usize,
    /// New tokens per row.
    pub new_tokens: usize,
    /// Median seconds from the call to the first token (prefill + first choice).
    pub prefill_s: f64,
    /// Median new tokens per second after the first, all rows together.
    pub decode_tokens_per_s: f64,
    /// Median seconds per decode step.
    pub step_s: f64,
    /// The untimed first generation (kernel compilation included), in seconds.
    pub warmup_s: f64,
}

/// Synthetic prompts: `<|im_start|>`, text, one image, text, for `batch` rows.
fn synthetic_inputs<B: Backend>(
    cfg: &Qwen3VlConfig,
    o: &GenerateBenchOptions,
    device: &B::Device,
) -> Result<ModelInputs<B>> {
    let m = cfg.vision_config.spatial_merge_size;
    let side = o.image_patches_per_side;
    let image_tokens = side * side / (m * m);
    if o.prompt_tokens < image_tokens + 4 {
        return Err(Error::Argument {
            arg: "--prompt-tokens".into(),
            message: format!(
                "must be at least {} (the image takes {image_tokens})",
                image_tokens + 4
            ),
        });
    }
    let text = o.prompt_tokens - image_tokens - 2;
    let vocab = cfg.text_config.vocab_size as i64;
    let mut ids = Vec::with_capacity(o.batch * o.prompt_tokens);
    let mut grids = Vec::new();
    for row in 0..o.batch {
        for i in 0..o.prompt_tokens {
            let id = if i == text / 2 {
                cfg.vision_start_token_id as i64
            } else if i > text / 2 && i <= text / 2 + image_tokens {
                cfg.image_token_id as i64
            } else if i == text / 2 + image_tokens + 1 {
                cfg.vision_end_token_id as i64
            } else {
                // Ordinary text ids, away from the special tokens at the end of the vocabulary.
                (1000 + 7919 * (row * o.prompt_tokens + i) as i64) % (vocab / 2)
            };
            ids.push(id);
        }
        grids.push([1, side, side]);
    }
    let patch = cfg.vision_config.in_channels
        * cfg.vision_config.temporal_patch_size
        * cfg.vision_config.patch_size
        * cfg.vision_config.patch_size;
    let pixels = Tensor::<B, 2>::random(
        [o.batch * side * side, patch],
        Distribution::Uniform(-1.0, 1.0),
        (device, DType::F32),
    );
    Ok(ModelInputs {
        input_ids: ids,
        batch: o.batch,
        len: o.prompt_tokens,
        attention_mask: None,
        pixel_values: Some(pixels),
        image_grid_thw: grids,
        image_features: None,
    })
}

/// Times generation on a random model built from `cfg`.
pub fn bench_generate<B: Backend>(
    cfg: &Qwen3VlConfig,
    o: &GenerateBenchOptions,
    device: &B::Device,
) -> Result<GenerateBenchReport> {
    if o.new_tokens < 2 {
        return Err(Error::Argument {
            arg: "--new-tokens".into(),
            message: "must be at least 2 (the first comes from the prefill)".into(),
        });
    }
    let nf4 = o.nf4.then(|| Nf4Options::standard(o.dtype.dtype()));
    let (model, n) = random_model_nf4::<B>(cfg, device, o.dtype, nf4.as_ref())?;
    if o.nf4 {
        eprintln!("NF4 base: {n} linear layers");
    }
    let (model, joined) = super::load::join_projections(model, device)?;
    eprintln!("joined projections: {joined} groups (q,k,v and gate,up)");
    let inputs = synthetic_inputs::<B>(cfg, o, device)?;
    let opts = GenerateOptions {
        max_new_tokens: o.new_tokens,
        sampling: Default::default(),
        stop_tokens: Vec::new(),
    };
    let layers = model.language_model.layers.len();
    // One generation: (seconds to the first token, seconds from the first to the last).
    let once = || -> Result<(f64, f64)> {
        let mut cache = KvCache::new(layers, o.batch);
        let mut history = vec![Vec::new(); o.batch];
        let start = Instant::now();
        let mut first = None;
        generate(&model, &mut cache, &inputs, &mut history, &opts, |_, _| {
            first.get_or_insert_with(|| start.elapsed().as_secs_f64());
        })?;
        let total = start.elapsed().as_secs_f64();
        let first = first.unwrap_or(total);
        Ok((first, total - first))
    };
    let started = Instant::now();
    eprintln!("warm-up generation (kernel compilation on the GPU)...");
    once()?;
    let warmup_s = started.elapsed().as_secs_f64();
    eprintln!("warm-up done in {warmup_s:.1} s");
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for _ in 0..o.repeats.max(1) {
        let (p, d) = once()?;
        prefill.push(p);
        decode.push(d);
    }
    let prefill_s = median(&prefill).unwrap_or(0.0);
    let decode_s = median(&decode).unwrap_or(0.0);
    let steps = (o.new_tokens - 1) as f64;
    Ok(GenerateBenchReport {
        batch: o.batch,
        prompt_tokens: o.prompt_tokens,
        new_tokens: o.new_tokens,
        prefill_s,
        decode_tokens_per_s: steps * o.batch as f64 / decode_s,
        step_s: decode_s / steps,
        warmup_s,
    })
}
