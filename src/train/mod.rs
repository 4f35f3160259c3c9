//! Training with burn-train's Learner.
//!
//! * [`run`]: `train` — data, model + adapter, Learner, final adapter, predictions, plots.
//! * [`step`]: the train/valid steps, loss, loss scaling, clipping, per-step hooks.
//! * [`devices`]: one device or data-parallel replicas (burn-train's DDP, feature `ddp`).
//! * [`data`]: run order (seeded epochs, resumable position) and the batcher.
//! * [`prepare`]: the run's tokenizer, image settings and prepared samples.
//! * [`state`]: shared run state, loss scaler, `metrics.csv`.
//! * [`checkpoint`]: atomic step checkpoints and resume.
//! * [`optim`]: AdamW, one kernel launch per parameter where the backend has the kernel.
//! * [`metrics`]: dashboard metrics; [`plot`]: loss/lr PNGs; [`schedule`]: warmup + decay.
//! * [`sweep`]: grids of runs; [`bench`]: timing of the training step.
//! * [`vision_cache`]: the frozen vision tower's features, reused across epochs.
//! * [`memory`]: how a training step's device memory is allocated (exact sizes or pools).
//! * [`recompute`]: layer recomputation (gradient checkpointing as HF does it).
//! * [`host_profile`]: opt-in sampling profile of the host side (feature `host-profile`).
//! * [`profile`]: opt-in timings of a step's phases (host-queued vs device-done).

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod devices;
mod grads;
pub mod host_profile;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod prepare;
pub mod profile;
pub mod recompute;
pub mod run;
pub mod schedule;
pub mod state;
pub mod step;
pub mod sweep;
pub mod vision_cache;

pub use devices::TrainDevices;
pub use run::{train, TrainOptions, TrainReport};
