//! From samples to model batches: parallel preparation (decode, resize, tokenize) with an
//! on-disk cache, and a burn `Batcher` that pads, masks and concatenates the images.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::data::dataloader::batcher::Batcher;
use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;

use super::processor::ImageOptions;
use super::sources::{BadRow, Sample};
use super::template::{ChatEncoder, IGNORE_INDEX};
use crate::checkpoint::tensor_file::write_tensors;
use crate::checkpoint::{HostTensor, TensorFile};
use crate::error::{Error, Result};
use crate::model::ModelInputs;

/// A sample ready for batching. The image is kept as uint8 levels of one temporal frame
/// ([rows, 3·P·P]); pixel values are `(level − 127.5) / 127.5`, repeated over the frames.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedSample {
    /// Token ids, images expanded.
    pub input_ids: Vec<u32>,
    /// Loss targets ([`IGNORE_INDEX`] on the prompt).
    pub labels: Vec<i64>,
    /// [rows · 3·P·P] uint8 levels.
    pub levels: Vec<u8>,
    /// (t, h, w) in patches.
    pub grid_thw: [usize; 3],
    /// The caption was cut to `max_length`.
    pub truncated: bool,
}

/// Prepares samples: image preprocessing, chat template and labels.
#[derive(Debug, Clone)]
pub struct SamplePreparer {
    /// Image settings.
    pub images: ImageOptions,
    /// Tokenizer + template.
    pub encoder: ChatEncoder,
    /// User prompt after the image.
    pub prompt: String,
    /// Truncation length.
    pub max_length: usize,
    /// Folder for cached preprocessed images (None = no cache).
    pub cache_dir: Option<PathBuf>,
}

/// FNV-1a, stable across runs and Rust versions (cache keys).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

impl SamplePreparer {
    fn cache_file(&self, image: &Path) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let meta = std::fs::metadata(image).ok()?;
        let mtime = meta
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos();
        let abs = std::fs::canonicalize(image).ok()?;
        let key = format!("{}|{}|{mtime}|{:?}", abs.display(), meta.len(), self.images);
        Some(dir.join(format!("{:016x}.safetensors", fnv1a(&key))))
    }

    /// The image as levels + grid, from the cache when possible.
    pub fn image_levels(&self, image: &Path) -> Result<(Vec<u8>, [usize; 3])> {
        let cache = self.cache_file(image);
        if let Some(f) = cache.as_ref().filter(|f| f.exists()) {
            if let Ok(t) = TensorFile::read(f) {
                if let (Ok((l, _)), Ok((g, _))) = (t.i64("levels", 2), t.i64("grid", 1)) {
                    return Ok((
                        l.iter().map(|&v| v as u8).collect(),
                        [g[0] as usize, g[1] as usize, g[2] as usize],
                    ));
                }
            }
        }
        let p = self.images.process_file(image)?;
        let row = self.images.patch_dim();
        let frame = row / self.images.temporal_patch_size;
        let per_ch = frame / 3;
        // Keep the first temporal copy of each channel: [ch][frame][P·P] -> [ch][P·P].
        let mut levels = Vec::with_capacity(p.pixel_values.len() / self.images.temporal_patch_size);
        for r in p.pixel_values.chunks(row) {
            for ch in 0..3 {
                let start = ch * per_ch * self.images.temporal_patch_size;
                levels.extend(
                    r[start..start + per_ch]
                        .iter()
                        .map(|&v| (v * 127.5 + 127.5).round() as u8),
                );
            }
        }
        if let Some(f) = cache {
            let rows = levels.len() / frame;
            let mut t = BTreeMap::new();
            t.insert(
                "levels".into(),
                HostTensor::I64(
                    levels.iter().map(|&v| v as i64).collect(),
                    vec![rows, frame],
                ),
            );
            t.insert(
                "grid".into(),
                HostTensor::I64(p.grid_thw.iter().map(|&v| v as i64).collect(), vec![3]),
            );
            // A cache that cannot be written only costs speed.
            let _ = write_tensors(&f, &t);
        }
        Ok((levels, p.grid_thw))
    }

    /// Prepares one sample; errors name its file and row.
    pub fn prepare(&self, s: &Sample) -> Result<PreparedSample> {
        let (levels, grid) = self
            .image_levels(&s.image)
            .map_err(|e| Error::Input(format!("{}: {e}", s.origin)))?;
        let tokens =
            grid.iter().product::<usize>() / (self.images.merge_size * self.images.merge_size);
        let e = self
            .encoder
            .caption_sample(&self.prompt, tokens, &s.caption, self.max_length)
            .map_err(|e| Error::Input(format!("{}: {e}", s.origin)))?;
        Ok(PreparedSample {
            input_ids: e.input_ids,
            labels: e.labels,
            levels,
            grid_thw: grid,
            truncated: e.truncated,
        })
    }

    /// The generation prompt for captioning `image` (no target; all labels ignored).
    pub fn prepare_prompt(&self, image: &Path) -> Result<PreparedSample> {
        let (levels, grid) = self.image_levels(image)?;
        let tokens =
            grid.iter().product::<usize>() / (self.images.merge_size * self.images.merge_size);
        let input_ids = self.encoder.caption_prompt(&self.prompt, tokens)?;
        Ok(PreparedSample {
            labels: vec![IGNORE_INDEX; input_ids.len()],
            input_ids,
            levels,
            grid_thw: grid,
            truncated: false,
        })
    }

    /// Prepares all samples on every core. With `skip_bad` failures are returned as bad rows;
    /// otherwise the first failure (in sample order) is the error.
    pub fn prepare_all(
        &self,
        samples: &[Sample],
        skip_bad: bool,
    ) -> Result<(Vec<PreparedSample>, Vec<BadRow>)> {
        if let Some(d) = &self.cache_dir {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        let results: Vec<Result<PreparedSample>> =
            samples.par_iter().map(|s| self.prepare(s)).collect();
        let mut ok = Vec::with_capacity(samples.len());
        let mut bad = Vec::new();
        for (s, r) in samples.iter().zip(results) {
            match r {
                Ok(p) => ok.push(p),
                Err(e) if skip_bad => bad.push(BadRow {
                    origin: s.origin.clone(),
                    reason: e.to_string(),
                }),
                Err(e) => return Err(e),
            }
        }
        Ok((ok, bad))
    }
}

/// Which side padding goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadSide {
    /// Pad after the tokens (training).
    Right,
    /// Pad before the tokens (batched generation).
    Left,
}

/// A padded batch: model inputs plus labels [B, T].
#[derive(Debug, Clone)]
pub struct CaptionBatch<B: Backend> {
    /// Ids, mask, pixel values and grids.
    pub inputs: ModelInputs<B>,
    /// Loss targets, [`IGNORE_INDEX`] on prompt and padding.
    pub labels: Tensor<B, 2, Int>,
    /// Real (unpadded) tokens in the batch.
    pub tokens: usize,
}

/// Pads to the longest sequence of the batch (rounded up to `pad_to_multiple`) and
/// concatenates all images' patch rows.
#[derive(Debug, Clone)]
pub struct CaptionBatcher {
    /// Padding token (`<|endoftext|>`).
    pub pad_id: u32,
    /// Padding side.
    pub side: PadSide,
    /// Frames per temporal patch (the levels are repeated this many times).
    pub temporal_patch_size: usize,
    /// Round the padded length up to a multiple of this (1 = no rounding). On the GPU every
    /// new length compiles and autotunes kernels, so a few bucket lengths save minutes.
    pub pad_to_multiple: usize,
}

impl CaptionBatcher {
    /// Left-padded prompts for generation (the last position of every row is its own last
    /// token), no length rounding.
    pub fn for_generation(pad_id: u32, temporal_patch_size: usize) -> Self {
        Self {
            pad_id,
            side: PadSide::Left,
            temporal_patch_size,
            pad_to_multiple: 1,
        }
    }

    /// Padded length of a batch whose longest sequence has `longest` tokens.
    pub fn padded_len(&self, longest: usize) -> usize {
        longest.div_ceil(self.pad_to_multiple.max(1)) * self.pad_to_multiple.max(1)
    }

    /// Host-side batch: ids, mask, labels [B·T], pixel values, grids.
    #[allow(clippy::type_complexity)]
    pub fn collate(
        &self,
        items: &[PreparedSample],
    ) -> (
        usize,
        Vec<i64>,
        Vec<i64>,
        Vec<i64>,
        Vec<f32>,
        Vec<[usize; 3]>,
    ) {
        let t = self.padded_len(items.iter().map(|s| s.input_ids.len()).max().unwrap_or(0));
        let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for s in items {
            let pad = t - s.input_ids.len();
            let real = s.input_ids.iter().map(|&i| i as i64);
            let pads = std::iter::repeat_n(self.pad_id as i64, pad);
            let (m1, m0) = (
                std::iter::repeat_n(1i64, s.input_ids.len()),
                std::iter::repeat_n(0i64, pad),
            );
            let lab = s.labels.iter().copied();
            let ign = std::iter::repeat_n(IGNORE_INDEX, pad);
            match self.side {
                PadSide::Right => {
                    ids.extend(real.chain(pads));
                    mask.extend(m1.chain(m0));
                    labels.extend(lab.chain(ign));
                }
                PadSide::Left => {
                    ids.extend(pads.chain(real));
                    mask.extend(m0.chain(m1));
                    labels.extend(ign.chain(lab));
                }
            }
        }
        let mut pixels = Vec::new();
        let mut grids = Vec::new();
        for s in items {
            let frame = s.levels.len() / s.grid_thw.iter().product::<usize>().max(1);
            let per_ch = frame / 3;
            for row in s.levels.chunks(frame) {
                for ch in row.chunks(per_ch) {
                    for _ in 0..self.temporal_patch_size {
                        pixels.extend(ch.iter().map(|&v| (v as f32 - 127.5) / 127.5));
                    }
                }
            }
            grids.push(s.grid_thw);
        }
        (t, ids, mask, labels, pixels, grids)
    }
}

impl<B: Backend> Batcher<B, PreparedSample, CaptionBatch<B>> for CaptionBatcher {
    fn batch(&self, items: Vec<PreparedSample>, device: &B::Device) -> CaptionBatch<B> {
        let b = items.len();
        let tokens = items.iter().map(|s| s.input_ids.len()).sum();
        let (t, ids, mask, labels, pixels, grids) = self.collate(&items);
        let row = pixels.len()
            / grids
                .iter()
                .map(|g| g.iter().product::<usize>())
                .sum::<usize>()
                .max(1);
        let rows = pixels.len().checked_div(row).unwrap_or(0);
        let pixel_values = (rows > 0).then(|| {
            Tensor::<B, 2>::from_data(TensorData::new(pixels, [rows, row]), (device, DType::F32))
        });
        CaptionBatch {
            inputs: ModelInputs {
                input_ids: ids,
                batch: b,
                len: t,
                attention_mask: Some(mask),
                pixel_values,
                image_grid_thw: grids,
                image_features: None,
            },
            labels: Tensor::from_data(TensorData::new(labels, [b, t]), device),
            tokens,
        }
    }
}
