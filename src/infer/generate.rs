//! Greedy captioning: the prompts of prepared samples, batched, then one argmax token at a time
//! until `<|im_end|>` or the token limit. (Without a KV cache each step re-runs the whole
//! sequence; fine for short captions, the cached decoder is the inference issue's.)

use burn::data::dataloader::batcher::Batcher;
use burn::prelude::*;

use crate::data::batch::{CaptionBatch, CaptionBatcher, PadSide, PreparedSample};
use crate::data::template::{ChatEncoder, IGNORE_INDEX};
use crate::error::{Error, Result};
use crate::model::Qwen3VlModel;

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

/// Greedy captions for the images and prompts of `samples`, `chunk` at a time: prompts are
/// left-padded (to the batcher's bucket lengths), so every row's newest token is the last
/// position; finished rows keep emitting the stop token until the chunk is done.
pub fn greedy_captions<B: Backend>(
    model: &Qwen3VlModel<B>,
    batcher: &CaptionBatcher,
    encoder: &ChatEncoder,
    samples: &[PreparedSample],
    max_new_tokens: usize,
    chunk: usize,
    device: &B::Device,
) -> Result<Vec<Generated>> {
    let batcher = CaptionBatcher {
        side: PadSide::Left,
        ..batcher.clone()
    };
    let stop = encoder.tokens.im_end;
    let mut all = Vec::with_capacity(samples.len());
    for part in samples.chunks(chunk.max(1)) {
        let mut current: Vec<PreparedSample> = part.iter().map(prompt_of).collect();
        let mut ids: Vec<Vec<u32>> = vec![Vec::new(); part.len()];
        let mut done = vec![false; part.len()];
        for _ in 0..max_new_tokens {
            if done.iter().all(|&d| d) {
                break;
            }
            let batch: CaptionBatch<B> = batcher.batch(current.clone(), device);
            let logits = model.forward(&batch.inputs, false)?.logits;
            let [b, t, v] = logits.dims();
            let next: Vec<i64> = logits
                .slice([0..b, t - 1..t, 0..v])
                .reshape([b, v])
                .argmax(1)
                .reshape([b])
                .into_data()
                .convert::<i64>()
                .to_vec()
                .expect("i64 ids");
            for (row, &tok) in next.iter().enumerate() {
                let tok = tok as u32;
                if !done[row] {
                    if tok == stop {
                        done[row] = true;
                    } else {
                        ids[row].push(tok);
                    }
                }
                current[row]
                    .input_ids
                    .push(if done[row] { stop } else { tok });
                current[row].labels.push(IGNORE_INDEX);
            }
        }
        for ids in ids {
            let text = encoder
                .tokenizer
                .decode(&ids, true)
                .map_err(|e| Error::Input(format!("decoding generated ids {ids:?}: {e}")))?;
            all.push(Generated {
                ids,
                text: text.trim().to_string(),
            });
        }
    }
    Ok(all)
}
