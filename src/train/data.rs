//! The order in which training samples are seen, as a burn `Dataset` that can start at any
//! position (for exact resume), and the batcher that keeps each batch's positions.
//!
//! Epoch `e` visits the training set in a permutation seeded by `(seed, e)`; the run is the
//! concatenation of its epochs, cut to a whole number of optimizer steps. A sample's *position*
//! is its index in that concatenation: it fixes the data order and (through the per-batch
//! reseed in the train step) the dropout masks, so a run resumed at step k sees exactly what an
//! uninterrupted run sees.
//!
//! With data-parallel replicas, burn-train cuts the dataset into one contiguous slice per
//! device; [`RunOrder::sharded`] lays the positions out so that the slices together cover each
//! optimizer step's positions exactly as one device with the same global batch would.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::prelude::*;

use crate::data::batch::{CaptionBatch, CaptionBatcher, PadSide, PreparedSample};
use crate::data::synthetic::Rng;
use crate::data::template::IGNORE_INDEX;

/// One sample with its place in the run.
#[derive(Debug, Clone)]
pub struct TrainItem {
    /// The prepared sample.
    pub sample: PreparedSample,
    /// Position in the run (sample units, across epochs).
    pub position: usize,
    /// Index in the training (or held-out) set.
    pub index: usize,
}

/// Seeded permutation of `0..n` for epoch `epoch` (identity when `shuffle` is off).
pub fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = Rng::new(seed ^ (epoch as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
    }
    order
}

/// The samples of a run from `start` to `end` (positions), in run order.
#[derive(Debug, Clone)]
pub struct RunOrder {
    samples: Arc<Vec<PreparedSample>>,
    orders: Arc<Vec<Vec<usize>>>,
    start: usize,
    end: usize,
    /// Data-parallel replicas the dataset is sliced into (1: plain run order).
    replicas: usize,
    /// Samples each replica contributes to one optimizer step (batch x accumulation).
    per_replica: usize,
}

impl RunOrder {
    /// `epochs` seeded epochs over `samples`, positions `start..end`.
    pub fn new(
        samples: Arc<Vec<PreparedSample>>,
        epochs: usize,
        seed: u64,
        shuffle: bool,
        start: usize,
        end: usize,
    ) -> Self {
        let n = samples.len();
        let orders = (0..epochs)
            .map(|e| epoch_order(n, seed, e, shuffle))
            .collect();
        Self {
            samples,
            orders: Arc::new(orders),
            start,
            end,
            replicas: 1,
            per_replica: 1,
        }
    }

    /// The same positions, laid out for `replicas` equal contiguous slices (burn-train's
    /// `split_dataloader`): slice `d`'s `j`-th item is position
    /// `start + k·S + d·per_replica + r` with `k = j / per_replica`, `r = j % per_replica` and
    /// `S = replicas·per_replica` the samples of one optimizer step. So every step's positions
    /// are split between the replicas, whatever their number. `end - start` must be a whole
    /// number of steps.
    pub fn sharded(mut self, replicas: usize, per_replica: usize) -> Self {
        assert!(
            replicas >= 1 && per_replica >= 1,
            "replicas and per_replica are at least 1"
        );
        assert_eq!(
            (self.end - self.start) % (replicas * per_replica),
            0,
            "a sharded run order holds whole optimizer steps"
        );
        self.replicas = replicas;
        self.per_replica = per_replica;
        self
    }

    /// Run position of dataset item `i` (see [`RunOrder::sharded`]).
    fn position_of(&self, i: usize) -> usize {
        if self.replicas == 1 {
            return self.start + i;
        }
        let slice = (self.end - self.start) / self.replicas;
        let (d, j) = (i / slice, i % slice);
        let (k, r) = (j / self.per_replica, j % self.per_replica);
        self.start + k * self.replicas * self.per_replica + d * self.per_replica + r
    }

    /// Every sample once, in file order, positions 0.. (held-out evaluation).
    pub fn once(samples: Arc<Vec<PreparedSample>>) -> Self {
        let n = samples.len();
        Self::new(samples, 1, 0, false, 0, n)
    }

    /// Training-set index of the sample at run position `p`.
    pub fn index_at(&self, p: usize) -> usize {
        let n = self.samples.len();
        self.orders[(p / n).min(self.orders.len() - 1)][p % n]
    }
}

impl Dataset<TrainItem> for RunOrder {
    fn get(&self, i: usize) -> Option<TrainItem> {
        (i < self.end - self.start).then(|| {
            let position = self.position_of(i);
            let index = self.index_at(position);
            TrainItem {
                sample: self.samples[index].clone(),
                position,
                index,
            }
        })
    }

    fn len(&self) -> usize {
        self.end - self.start
    }
}

/// A model batch plus where its samples came from.
#[derive(Debug, Clone)]
pub struct TrainBatch<B: Backend> {
    /// Inputs and labels.
    pub batch: CaptionBatch<B>,
    /// Run positions of the samples.
    pub positions: Vec<usize>,
    /// Set indexes of the samples.
    pub indexes: Vec<usize>,
    /// Flattened [B·T] positions that predict a target token.
    pub target_rows: Vec<i64>,
    /// The target token of each of those positions.
    pub target_ids: Vec<i64>,
}

/// Wraps [`CaptionBatcher`] and keeps positions and target counts.
#[derive(Debug, Clone)]
pub struct TrainBatcher(pub CaptionBatcher);

impl<B: Backend> Batcher<B, TrainItem, TrainBatch<B>> for TrainBatcher {
    fn batch(&self, items: Vec<TrainItem>, device: &B::Device) -> TrainBatch<B> {
        let positions = items.iter().map(|i| i.position).collect();
        let indexes = items.iter().map(|i| i.index).collect();
        let t = self.0.padded_len(
            items
                .iter()
                .map(|i| i.sample.input_ids.len())
                .max()
                .unwrap_or(0),
        );
        // Position p of row r predicts the label at p + 1: flattened index r·T + offset + p.
        let (mut target_rows, mut target_ids) = (Vec::new(), Vec::new());
        for (r, item) in items.iter().enumerate() {
            let labels = &item.sample.labels;
            let offset = match self.0.side {
                PadSide::Right => 0,
                PadSide::Left => t - labels.len(),
            };
            for (p, &l) in labels.iter().enumerate().skip(1) {
                if l != IGNORE_INDEX {
                    target_rows.push((r * t + offset + p - 1) as i64);
                    target_ids.push(l);
                }
            }
        }
        let samples: Vec<PreparedSample> = items.into_iter().map(|i| i.sample).collect();
        TrainBatch {
            batch: self.0.batch(samples, device),
            positions,
            indexes,
            target_rows,
            target_ids,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(k: u32) -> PreparedSample {
        PreparedSample {
            input_ids: vec![k],
            labels: vec![IGNORE_INDEX],
            levels: vec![],
            grid_thw: [1, 1, 1],
            truncated: false,
        }
    }

    #[test]
    fn resumed_order_is_the_tail_of_the_full_order() {
        let samples = Arc::new((0..7).map(sample).collect::<Vec<_>>());
        let full = RunOrder::new(samples.clone(), 3, 5, true, 0, 21);
        let tail = RunOrder::new(samples, 3, 5, true, 9, 21);
        let ids = |d: &RunOrder| -> Vec<u32> {
            (0..d.len())
                .map(|i| d.get(i).unwrap().sample.input_ids[0])
                .collect()
        };
        assert_eq!(ids(&full)[9..], ids(&tail)[..]);
        // Each epoch is a permutation, and epochs differ.
        let f = ids(&full);
        let mut e0 = f[..7].to_vec();
        e0.sort();
        assert_eq!(e0, (0..7).collect::<Vec<_>>());
        assert_ne!(f[..7], f[7..14]);
    }

    /// Positions each replica's slice sees, one optimizer step per inner vector.
    fn steps_of(order: &RunOrder, replicas: usize, per_step: usize) -> Vec<Vec<usize>> {
        let slice = order.len() / replicas;
        let mut steps = vec![Vec::new(); order.len() / per_step];
        for d in 0..replicas {
            for j in 0..slice {
                let p = order.get(d * slice + j).unwrap().position;
                steps[j / (per_step / replicas)].push(p);
            }
        }
        steps.iter_mut().for_each(|s| s.sort());
        steps
    }

    #[test]
    fn sharded_slices_cover_each_step_as_one_device_does() {
        let samples = Arc::new((0..10).map(sample).collect::<Vec<_>>());
        // Resumed at position 12 of 2 epochs (20 positions), 4 samples per optimizer step.
        let one = RunOrder::new(samples.clone(), 2, 3, true, 12, 20);
        let two = RunOrder::new(samples.clone(), 2, 3, true, 12, 20).sharded(2, 2);
        let four = RunOrder::new(samples, 2, 3, true, 12, 20).sharded(4, 1);
        let expected = vec![vec![12, 13, 14, 15], vec![16, 17, 18, 19]];
        assert_eq!(steps_of(&one, 1, 4), expected);
        assert_eq!(steps_of(&two, 2, 4), expected);
        assert_eq!(steps_of(&four, 4, 4), expected);
        // Same samples at the same positions, only the item order differs.
        for i in 0..two.len() {
            let it = two.get(i).unwrap();
            assert_eq!(it.index, one.get(it.position - 12).unwrap().index);
        }
        assert!(two.get(8).is_none());
    }
}
