//! Token generation with the KV cache: one prefill of the (left-padded) prompts, then one token
//! per row per step, chosen by [`Sampler`] (greedy or sampled), until a stop token or the limit.

use burn::data::dataloader::batcher::Batcher;
use burn::prelude::*;

use super::sampling::{Sampler, SamplingOptions};
use crate::data::batch::{CaptionBatch, CaptionBatcher, PadSide, PreparedSample};
use crate::data::template::{ChatEncoder, IGNORE_INDEX};
use crate::error::{Error, Result};
use crate::model::{KvCache, ModelInputs, Qwen3VlModel};

/// What to generate and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most new tokens per row.
    pub max_new_tokens: usize,
    /// Greedy or sampling settings.
    pub sampling: SamplingOptions,
    /// Token ids that end a row (not included in its output).
    pub stop_tokens: Vec<u32>,
}

/// The new tokens of each row and why it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Continuation {
    /// New tokens, without the stop token.
    pub ids: Vec<u32>,
    /// The last chosen token, which the cache has not seen yet (the stop token, or the last of
    /// `ids` when the limit ended the row; `None` when nothing was generated).
    pub pending: Option<u32>,
    /// Ended by a stop token (not the token limit).
    pub stopped: bool,
}

/// Runs `inputs` after what `cache` holds and generates for each row. `history` holds each
/// row's tokens so far (for the repetition penalty; HF counts the prompt, padding included) and
/// is extended with the chunk and the new tokens. Each chosen token is passed to
/// `on_token(row, token)` as soon as it is known (stop tokens are not).
pub fn generate<B: Backend>(
    model: &Qwen3VlModel<B>,
    cache: &mut KvCache<B>,
    inputs: &ModelInputs<B>,
    history: &mut [Vec<u32>],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Continuation>> {
    opts.sampling.validate()?;
    let (b, t) = (inputs.batch, inputs.len);
    if history.len() != b {
        return Err(Error::Input(format!(
            "{} histories for a batch of {b} rows",
            history.len()
        )));
    }
    for (row, h) in history.iter_mut().enumerate() {
        h.extend(
            inputs.input_ids[row * t..(row + 1) * t]
                .iter()
                .map(|&i| i as u32),
        );
    }
    let mut samplers: Vec<Sampler> = (0..b)
        .map(|row| Sampler::new(opts.sampling.clone(), row))
        .collect();
    let mut out: Vec<Continuation> = (0..b)
        .map(|_| Continuation {
            ids: Vec::new(),
            pending: None,
            stopped: false,
        })
        .collect();
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let s = &opts.sampling;
    let plain_greedy = !s.do_sample && s.repetition_penalty == 1.0;
    let mut logits = model.extend(inputs, cache)?;
    for step in 0..opts.max_new_tokens {
        let vocab = logits.dims()[1];
        // Plain greedy needs only the argmax: pick on the device and read back B ids, not
        // B x vocab logits. Anything else (penalty, sampling) chooses on the host.
        let choice = if plain_greedy {
            let ids: Vec<i64> = logits
                .argmax(1)
                .reshape([b])
                .into_data()
                .convert::<i64>()
                .to_vec()
                .expect("i64 ids");
            Choice::Device(ids)
        } else {
            Choice::Host(
                logits
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .expect("f32 logits"),
            )
        };
        let mut next = Vec::with_capacity(b);
        for (row, c) in out.iter_mut().enumerate() {
            if c.stopped {
                // A finished row keeps feeding its stop token; its outputs are ignored.
                next.push(c.pending.unwrap_or(0) as i64);
                continue;
            }
            let tok = match &choice {
                Choice::Device(ids) => ids[row] as u32,
                Choice::Host(host) => {
                    let mut row_logits = host[row * vocab..(row + 1) * vocab].to_vec();
                    samplers[row].pick(&mut row_logits, &history[row])
                }
            };
            c.pending = Some(tok);
            if opts.stop_tokens.contains(&tok) {
                c.stopped = true;
            } else {
                c.ids.push(tok);
                history[row].push(tok);
                on_token(row, tok);
            }
            next.push(tok as i64);
        }
        if out.iter().all(|c| c.stopped) || step + 1 == opts.max_new_tokens {
            break;
        }
        logits = model.decode_step(&next, cache)?;
        for c in out.iter_mut().filter(|c| !c.stopped) {
            c.pending = None;
        }
    }
    Ok(out)
}

/// Where this step's tokens were chosen.
enum Choice {
    /// Argmax ids computed on the device, one per row.
    Device(Vec<i64>),
    /// All logits [B·vocab] on the host.
    Host(Vec<f32>),
}

/// A generated caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New token ids (without the stop token).
    pub ids: Vec<u32>,
    /// Decoded text.
    pub text: String,
}

/// The prompt part of a training sample (everything before the first target label).
pub fn prompt_of(sample: &PreparedSample) -> PreparedSample {
    let n = sample
        .labels
        .iter()
        .position(|&l| l != IGNORE_INDEX)
        .unwrap_or(sample.labels.len());
    PreparedSample {
        input_ids: sample.input_ids[..n].to_vec(),
        labels: vec![IGNORE_INDEX; n],
        ..sample.clone()
    }
}

/// Decodes generated ids to trimmed text.
pub fn decode_text(encoder: &ChatEncoder, ids: &[u32]) -> Result<String> {
    encoder
        .tokenizer
        .decode(ids, true)
        .map(|t| t.trim().to_string())
        .map_err(|e| Error::Input(format!("decoding generated ids {ids:?}: {e}")))
}

/// Captions for the images and prompts of `samples` (their prompt parts), `chunk` at a time:
/// prompts are left-padded so every row's newest token is the last position. `on_done(n)` is
/// called after each chunk with the number of samples done so far.
#[allow(clippy::too_many_arguments)]
pub fn caption_samples<B: Backend>(
    model: &Qwen3VlModel<B>,
    batcher: &CaptionBatcher,
    encoder: &ChatEncoder,
    samples: &[PreparedSample],
    opts: &GenerateOptions,
    chunk: usize,
    device: &B::Device,
    mut on_done: impl FnMut(usize),
) -> Result<Vec<Generated>> {
    let batcher = CaptionBatcher {
        side: PadSide::Left,
        ..batcher.clone()
    };
    let mut all = Vec::with_capacity(samples.len());
    for part in samples.chunks(chunk.max(1)) {
        let prompts: Vec<PreparedSample> = part.iter().map(prompt_of).collect();
        let batch: CaptionBatch<B> = batcher.batch(prompts, device);
        let mut cache = KvCache::new(model.language_model.layers.len(), part.len());
        let mut history = vec![Vec::new(); part.len()];
        let rows = generate(
            model,
            &mut cache,
            &batch.inputs,
            &mut history,
            opts,
            |_, _| {},
        )?;
        for c in rows {
            let text = decode_text(encoder, &c.ids)?;
            all.push(Generated { ids: c.ids, text });
        }
        on_done(all.len());
    }
    Ok(all)
}

/// Greedy captions (stop at `<|im_end|>`), as the training run's held-out check uses them.
pub fn greedy_captions<B: Backend>(
    model: &Qwen3VlModel<B>,
    batcher: &CaptionBatcher,
    encoder: &ChatEncoder,
    samples: &[PreparedSample],
    max_new_tokens: usize,
    chunk: usize,
    device: &B::Device,
) -> Result<Vec<Generated>> {
    let opts = GenerateOptions {
        max_new_tokens,
        sampling: SamplingOptions::default(),
        stop_tokens: vec![encoder.tokens.im_end],
    };
    caption_samples(
        model,
        batcher,
        encoder,
        samples,
        &opts,
        chunk,
        device,
        |_| {},
    )
}
