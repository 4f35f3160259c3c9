//! Incremental decoding with a key/value cache.
//!
//! [`Qwen3VlModel::extend`] runs a chunk of tokens (a prompt with its images and DeepStack
//! features, or one generated token per row) on top of what the cache already holds: the new
//! keys and values are appended to every layer's cache, the chunk's M-RoPE positions continue
//! after the largest position so far (on all three axes, as HF's `rope_deltas` do), and only the
//! last position's logits are computed.

use burn::prelude::*;

use super::qwen3_vl::{ModelInputs, Qwen3VlModel};
use crate::error::{Error, Result};

/// Positions a layer cache's buffers grow by (at least) when full.
const CACHE_GROWTH: usize = 256;

/// One decoder layer's keys and values so far: buffers [B, Hkv, capacity, d] of which the
/// first `len` positions are filled. A decode step writes its one position in place (one
/// launch for the keys, one for the values) instead of copying the whole cache; the buffers
/// grow by at least [`CACHE_GROWTH`] positions, or double, when full.
#[derive(Debug, Clone, Default)]
pub struct LayerCache<B: Backend> {
    kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    len: usize,
}

impl<B: Backend> LayerCache<B> {
    /// Appends `k`, `v` [B, Hkv, T, d] and returns all keys and values [B, Hkv, S + T, d]
    /// (views of the buffers).
    pub fn extend(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, h, t, d] = k.dims();
        let end = self.len + t;
        let (kb, vb) = match self.kv.take() {
            Some((kb, vb)) if kb.dims()[2] >= end => (kb, vb),
            held => {
                let capacity = (end + CACHE_GROWTH).max(2 * self.len);
                let fresh = |like: &Tensor<B, 4>| {
                    Tensor::empty([b, h, capacity, d], (&like.device(), like.dtype()))
                };
                let (nk, nv) = (fresh(&k), fresh(&v));
                match held {
                    Some((ok, ov)) if self.len > 0 => {
                        let old = [0..b, 0..h, 0..self.len, 0..d];
                        (
                            nk.slice_assign(old.clone(), ok.narrow(2, 0, self.len)),
                            nv.slice_assign(old, ov.narrow(2, 0, self.len)),
                        )
                    }
                    _ => (nk, nv),
                }
            }
        };
        let new = [0..b, 0..h, self.len..end, 0..d];
        let kb = kb.slice_assign(new.clone(), k);
        let vb = vb.slice_assign(new, v);
        self.len = end;
        self.kv = Some((kb.clone(), vb.clone()));
        (kb.narrow(2, 0, end), vb.narrow(2, 0, end))
    }
}

/// The decoder's cache for a batch of sequences.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// One entry per decoder layer.
    pub layers: Vec<LayerCache<B>>,
    /// Rows.
    pub batch: usize,
    /// [B, S] row-major: 1 = a token, 0 = padding (never attended).
    attention_mask: Vec<i64>,
    /// The M-RoPE position the next token of each row gets (the same on all three axes).
    next_position: Vec<i64>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `batch` rows of a model with `layers` decoder layers.
    pub fn new(layers: usize, batch: usize) -> Self {
        Self {
            layers: vec![LayerCache { kv: None, len: 0 }; layers],
            batch,
            attention_mask: Vec::new(),
            next_position: vec![0; batch],
        }
    }

    /// Positions held (padding included).
    pub fn len(&self) -> usize {
        self.attention_mask.len() / self.batch.max(1)
    }

    /// Whether nothing has been run yet.
    pub fn is_empty(&self) -> bool {
        self.attention_mask.is_empty()
    }

    /// The M-RoPE position of each row's next token.
    pub fn next_positions(&self) -> &[i64] {
        &self.next_position
    }
}

/// Mask [B, 1, T, P + T] (`true` = not attended) for a chunk of T positions after P cached ones:
/// cached padding is hidden, the chunk is causal and hides its own padding (a padded query keeps
/// its diagonal so no row is empty).
fn chunk_mask<B: Backend>(
    cached: &[i64],
    past: usize,
    chunk: &[i64],
    batch: usize,
    len: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let s = past + len;
    let mut m = vec![false; batch * len * s];
    for b in 0..batch {
        for i in 0..len {
            let row = &mut m[(b * len + i) * s..(b * len + i + 1) * s];
            for (j, slot) in row.iter_mut().take(past).enumerate() {
                *slot = cached[b * past + j] == 0;
            }
            for j in 0..len {
                let pad = chunk[b * len + j] == 0;
                row[past + j] = j > i || (pad && i != j);
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [batch, 1, len, s]), device)
}

impl<B: Backend> Qwen3VlModel<B> {
    /// Runs `inputs` (its images included) after what `cache` holds, appends the new keys and
    /// values to it, and returns each row's logits at the chunk's last position, [B, vocab] f32.
    ///
    /// With left padding, every row's newest token is the last position. A prompt followed by
    /// one-token chunks gives the logits a full forward pass gives at those positions.
    pub fn extend(&self, inputs: &ModelInputs<B>, cache: &mut KvCache<B>) -> Result<Tensor<B, 2>> {
        self.extend_chunk(inputs, cache, false)
    }

    /// [`Self::extend`]; `generated`: the chunk's tokens were sampled (all text for positions).
    fn extend_chunk(
        &self,
        inputs: &ModelInputs<B>,
        cache: &mut KvCache<B>,
        generated: bool,
    ) -> Result<Tensor<B, 2>> {
        let (b, t) = (inputs.batch, inputs.len);
        if b != cache.batch {
            return Err(Error::Input(format!(
                "the chunk has {b} rows but the cache was made for {}",
                cache.batch
            )));
        }
        let layers = self.language_model.layers.len();
        if cache.layers.len() != layers {
            return Err(Error::Input(format!(
                "the cache has {} layers but the model {layers}",
                cache.layers.len()
            )));
        }
        let mut e = self.embed(inputs, generated)?;
        let chunk_attention = inputs
            .attention_mask
            .clone()
            .unwrap_or_else(|| vec![1; b * t]);
        // Shift the chunk's positions (computed from 0) to continue each row's sequence.
        let positions = &mut e.positions;
        for row in 0..b {
            let offset = cache.next_position[row];
            let mut max_pos = offset - 1;
            for ti in 0..t {
                if chunk_attention[row * t + ti] == 0 {
                    continue;
                }
                for axis in 0..3 {
                    let p = &mut positions.data[(axis * b + row) * t + ti];
                    *p += offset;
                    max_pos = max_pos.max(*p);
                }
            }
            cache.next_position[row] = max_pos + 1;
        }
        let (cos, sin) = self.rotary_tables(&e.positions, e.embeds.dtype());
        let past = cache.len();
        let device = self.device();
        // One new token per row with no padding anywhere attends to everything: no mask needed
        // (the common decode step; saves the mask upload and the masked softmax).
        let unpadded = cache
            .attention_mask
            .iter()
            .chain(&chunk_attention)
            .all(|&m| m != 0);
        let mask = (t > 1 || !unpadded)
            .then(|| chunk_mask::<B>(&cache.attention_mask, past, &chunk_attention, b, t, &device));
        let out = self.language_model.forward(
            e.embeds,
            (&cos, &sin),
            mask,
            e.deepstack.as_ref(),
            false,
            Some(cache),
            &e.stats,
        );
        // Interleave the chunk's mask after each row's cached one: [B, P] + [B, T] -> [B, P + T].
        let mut merged = Vec::with_capacity(b * (past + t));
        for row in 0..b {
            merged.extend_from_slice(&cache.attention_mask[row * past..(row + 1) * past]);
            merged.extend_from_slice(&chunk_attention[row * t..(row + 1) * t]);
        }
        cache.attention_mask = merged;
        // [B, 1, vocab] -> [B, vocab]
        let logits = self.lm_logits(out.hidden.narrow(1, t - 1, 1));
        let vocab = logits.dims()[2];
        Ok(logits.reshape([b, vocab]))
    }

    /// One generated token per row: the logits of the next position, [B, vocab] f32. A sampled
    /// image or video placeholder id is an ordinary text position here.
    pub fn decode_step(&self, tokens: &[i64], cache: &mut KvCache<B>) -> Result<Tensor<B, 2>> {
        let inputs = ModelInputs {
            input_ids: tokens.to_vec(),
            batch: tokens.len(),
            len: 1,
            attention_mask: None,
            pixel_values: None,
            image_grid_thw: Vec::new(),
            image_features: None,
        };
        self.extend_chunk(&inputs, cache, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// Appending chunks past the buffers' capacity (a prefill, then single positions and a
    /// second chunk, 920 positions in all: two growths) gives the concatenation of all chunks.
    #[test]
    fn layer_cache_holds_every_appended_position_across_growths() {
        let dev = Default::default();
        let mut cache = LayerCache::<Flex>::default();
        let chunk = |t: usize, seed: usize| {
            let n = 2 * 3 * t * 4;
            let v: Vec<f32> = (0..n).map(|i| ((i * 31 + seed * 7) % 97) as f32).collect();
            Tensor::<Flex, 4>::from_data(TensorData::new(v, [2, 3, t, 4]), &dev)
        };
        let (mut want_k, mut want_v) = (Vec::new(), Vec::new());
        let sizes: Vec<usize> = [120].into_iter().chain([1; 300]).chain([500]).collect();
        for (i, t) in sizes.into_iter().enumerate() {
            let (k, v) = (chunk(t, i), chunk(t, i + 1000));
            want_k.push(k.clone());
            want_v.push(v.clone());
            let (got_k, got_v) = cache.extend(k, v);
            if i % 50 == 0 || t > 1 {
                let wk = Tensor::cat(want_k.clone(), 2);
                let wv = Tensor::cat(want_v.clone(), 2);
                assert_eq!(got_k.dims(), wk.dims());
                assert_eq!(got_k.into_data(), wk.into_data(), "keys after chunk {i}");
                assert_eq!(got_v.into_data(), wv.into_data(), "values after chunk {i}");
            }
        }
        assert_eq!(cache.len, 920);
    }
}
