//! Greedy captioning: the prompt of a prepared sample, then one argmax token at a time until
//! `<|im_end|>` or the token limit. (Without a KV cache each step re-runs the whole sequence;
//! fine for short captions, the cached decoder is the inference issue's.)

use burn::data::dataloader::batcher::Batcher;
use burn::prelude::*;

use crate::data::batch::{CaptionBatch, CaptionBatcher, PreparedSample};
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

/// Greedy caption for the image and prompt of `sample`.
pub fn greedy_caption<B: Backend>(
    model: &Qwen3VlModel<B>,
    batcher: &CaptionBatcher,
    encoder: &ChatEncoder,
    sample: &PreparedSample,
    max_new_tokens: usize,
    device: &B::Device,
) -> Result<Generated> {
    let mut current = prompt_of(sample);
    let stop = encoder.tokens.im_end;
    let mut ids = Vec::new();
    for _ in 0..max_new_tokens {
        let batch: CaptionBatch<B> = batcher.batch(vec![current.clone()], device);
        let out = model.forward(&batch.inputs, false)?;
        let [_, t, v] = out.logits.dims();
        let next = out
            .logits
            .slice([0..1, t - 1..t, 0..v])
            .reshape([v])
            .argmax(0)
            .into_scalar()
            .elem::<i64>() as u32;
        if next == stop {
            break;
        }
        ids.push(next);
        current.input_ids.push(next);
        current.labels.push(IGNORE_INDEX);
    }
    let text = encoder
        .tokenizer
        .decode(&ids, true)
        .map_err(|e| Error::Input(format!("decoding generated ids {ids:?}: {e}")))?;
    Ok(Generated {
        ids,
        text: text.trim().to_string(),
    })
}
