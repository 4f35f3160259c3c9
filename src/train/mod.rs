//! Training with burn-train's Learner.
//!
//! * [`run`]: `train` — data, model + adapter, Learner, final adapter, predictions, plots.
//! * [`step`]: the train/valid steps, loss, loss scaling, clipping, per-step hooks.
//! * [`devices`]: one device or data-parallel replicas (burn-train's DDP, feature `ddp`).
//! * [`data`]: run order (seeded epochs, resumable position) and the batcher.
//! * [`prepare`]: the run's tokenizer, image settings and prepared samples.
//! * [`state`]: shared run state, loss scaler, `metrics.csv`.
//! * [`checkpoint`]: atomic step checkpoints and resume.
//! * [`metrics`]: dashboard metrics; [`plot`]: loss/lr PNGs; [`schedule`]: warmup + decay.
//! * [`sweep`]: grids of runs; [`bench`]: timing of the training step.
//! * [`vision_cache`]: the frozen vision tower's features, reused across epochs.
//! * [`memory`]: how a training step's device memory is allocated (exact sizes or pools).
//! * [`recompute`]: layer recomputation (gradient checkpointing as HF does it).

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod devices;
pub mod memory;
pub mod metrics;
pub mod plot;
pub mod prepare;
pub mod recompute;
pub mod run;
pub mod schedule;
pub mod state;
pub mod step;
pub mod sweep;
pub mod vision_cache;

pub use devices::TrainDevices;
pub use run::{train, TrainOptions, TrainReport};
