//! [`VisionCache`]: the vision tower's features of each training image, kept on the host after
//! its first pass. A frozen tower without adapters gives the same features every epoch, so
//! later epochs skip it (its forward is a large part of a step: 324 patches per 280x280 image
//! against ~120 text tokens).

use std::collections::HashMap;
use std::sync::Mutex;

use burn::prelude::*;

use crate::model::{ImageFeatures, ModelInputs};

/// One sample's features: merged tokens and each DeepStack tap, [tokens, H] each.
type SampleFeatures = Vec<TensorData>;

/// Vision features by training-set index.
#[derive(Debug, Default)]
pub struct VisionCache {
    samples: Mutex<HashMap<usize, SampleFeatures>>,
}

/// Image tokens in each row of a batch (the merged features are in this batch-major order).
fn image_tokens_per_row<B: Backend>(inputs: &ModelInputs<B>, image_token_id: i64) -> Vec<usize> {
    inputs
        .input_ids
        .chunks(inputs.len.max(1))
        .map(|row| row.iter().filter(|&&id| id == image_token_id).count())
        .collect()
}

/// The cached features of each row of the batch that holds image tokens, in order; None when
/// one is missing (or its token count no longer matches).
fn held_parts<'a, B: Backend>(
    samples: &'a HashMap<usize, SampleFeatures>,
    inputs: &ModelInputs<B>,
    indexes: &[usize],
    image_token_id: i64,
) -> Option<Vec<&'a SampleFeatures>> {
    let counts = image_tokens_per_row(inputs, image_token_id);
    let mut parts = Vec::new();
    for (&index, &n) in indexes.iter().zip(&counts) {
        if n == 0 {
            continue;
        }
        let f = samples.get(&index)?;
        if f[0].shape[0] != n {
            return None;
        }
        parts.push(f);
    }
    Some(parts)
}

impl VisionCache {
    /// Samples held.
    pub fn len(&self) -> usize {
        self.samples.lock().expect("vision cache poisoned").len()
    }

    /// Whether nothing is held yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether [`Self::lookup`] would find the batch's features (without building them).
    pub fn holds<B: Backend>(
        &self,
        inputs: &ModelInputs<B>,
        indexes: &[usize],
        image_token_id: i64,
    ) -> bool {
        let samples = self.samples.lock().expect("vision cache poisoned");
        held_parts(&samples, inputs, indexes, image_token_id).is_some_and(|p| !p.is_empty())
    }

    /// The features of a batch whose rows are the samples `indexes`, if every row with image
    /// tokens is cached (and its token count still matches).
    pub fn lookup<B: Backend>(
        &self,
        inputs: &ModelInputs<B>,
        indexes: &[usize],
        image_token_id: i64,
        device: &B::Device,
    ) -> Option<ImageFeatures<B>> {
        let samples = self.samples.lock().expect("vision cache poisoned");
        let parts = held_parts(&samples, inputs, indexes, image_token_id)?;
        let taps = parts.first()?.len();
        let gather = |tap: usize| {
            let rows: Vec<Tensor<B, 2>> = parts
                .iter()
                .map(|f| Tensor::from_data(f[tap].clone(), (device, f[tap].dtype)))
                .collect();
            Tensor::cat(rows, 0)
        };
        Some(ImageFeatures {
            merged: gather(0),
            deepstack: (1..taps).map(gather).collect(),
        })
    }

    /// Stores the features a forward pass computed for the samples `indexes` (row by row).
    pub fn store<B: Backend>(
        &self,
        inputs: &ModelInputs<B>,
        indexes: &[usize],
        image_token_id: i64,
        features: &ImageFeatures<B>,
    ) {
        let counts = image_tokens_per_row(inputs, image_token_id);
        let mut offset = 0;
        let mut samples = self.samples.lock().expect("vision cache poisoned");
        for (&index, &n) in indexes.iter().zip(&counts) {
            if n > 0 && !samples.contains_key(&index) {
                let taps = std::iter::once(&features.merged).chain(&features.deepstack);
                let rows = taps.map(|t| t.clone().narrow(0, offset, n).into_data());
                samples.insert(index, rows.collect());
            }
            offset += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    const IMG: i64 = 9;

    /// Rows of 4 ids: `n` image tokens then text.
    fn inputs(rows: &[usize]) -> ModelInputs<Flex> {
        let ids = rows
            .iter()
            .flat_map(|&n| (0..4).map(move |p| if p < n { IMG } else { 1 }))
            .collect();
        ModelInputs {
            input_ids: ids,
            batch: rows.len(),
            len: 4,
            attention_mask: None,
            pixel_values: None,
            image_grid_thw: Vec::new(),
            image_features: None,
        }
    }

    /// Features whose value names the sample: sample s, token j, tap t -> 100·s + 10·t + j.
    fn features(samples: &[(usize, usize)]) -> ImageFeatures<Flex> {
        let tap = |t: usize| {
            let v: Vec<f32> = samples
                .iter()
                .flat_map(|&(s, n)| (0..n).flat_map(move |j| [(100 * s + 10 * t + j) as f32; 2]))
                .collect();
            let rows = v.len() / 2;
            Tensor::<Flex, 2>::from_data(TensorData::new(v, [rows, 2]), &Default::default())
        };
        ImageFeatures {
            merged: tap(0),
            deepstack: vec![tap(1), tap(2)],
        }
    }

    #[test]
    fn rows_are_stored_per_sample_and_reassembled_in_any_batch() {
        let cache = VisionCache::default();
        // Samples 5 (2 image tokens), 7 (none) and 3 (3 image tokens) in one batch.
        let batch = inputs(&[2, 0, 3]);
        cache.store(&batch, &[5, 7, 3], IMG, &features(&[(5, 2), (3, 3)]));
        assert_eq!(cache.len(), 2, "the text-only row stores nothing");
        // Another batch order, and a sample not seen yet.
        let dev = Default::default();
        let again = inputs(&[3, 2]);
        let got = cache.lookup(&again, &[3, 5], IMG, &dev).unwrap();
        let want = features(&[(3, 3), (5, 2)]);
        for (g, w) in std::iter::once((&got.merged, &want.merged))
            .chain(got.deepstack.iter().zip(&want.deepstack))
        {
            assert_eq!(g.to_data(), w.to_data());
        }
        assert!(cache.holds(&again, &[3, 5], IMG));
        assert!(cache.lookup(&inputs(&[3, 2]), &[3, 8], IMG, &dev).is_none());
        assert!(!cache.holds(&inputs(&[3, 2]), &[3, 8], IMG));
        // A cached sample whose token count changed is not reused.
        assert!(cache.lookup(&inputs(&[2]), &[3], IMG, &dev).is_none());
        assert!(!cache.holds(&inputs(&[2]), &[3], IMG));
    }
}
