//! [`TrainDevices`]: the device(s) a run trains on. One device runs burn-train's single-device
//! loop; several run its distributed data-parallel (DDP) strategy: a model replica per device,
//! each device's gradients all-reduced (mean) after every backward pass, one optimizer per
//! replica applying the same update, checkpoints and metrics from the first replica to finish
//! each step.

use burn::tensor::backend::AutodiffBackend;
use burn::train::ExecutionStrategy;

use super::checkpoint::CheckpointState;
use crate::error::{Error, Result};
use crate::experiment::Experiment;

/// Builds burn-train's DDP strategy over the given devices.
type DdpBuilder<B> = fn(Vec<burn::tensor::Device<B>>) -> ExecutionStrategy<B>;

/// The devices of a run; the first one is the main device (validation, final weights).
pub struct TrainDevices<B: AutodiffBackend> {
    devices: Vec<B::Device>,
    /// Set by [`TrainDevices::data_parallel`].
    ddp: Option<DdpBuilder<B>>,
}

impl<B: AutodiffBackend> TrainDevices<B> {
    /// Training on one device.
    pub fn single(device: B::Device) -> Self {
        Self {
            devices: vec![device],
            ddp: None,
        }
    }

    /// Data-parallel training over `devices` (at least one) with burn-train's DDP strategy.
    #[cfg(feature = "ddp")]
    pub fn data_parallel(devices: Vec<B::Device>) -> Self
    where
        B: burn::tensor::backend::distributed::DistributedBackend,
    {
        use burn::tensor::backend::distributed::{DistributedConfig, ReduceOperation};
        assert!(!devices.is_empty(), "data-parallel training needs a device");
        Self {
            devices,
            ddp: Some(|devices| {
                let config = DistributedConfig {
                    all_reduce_op: ReduceOperation::Mean,
                };
                ExecutionStrategy::ddp(devices, config)
            }),
        }
    }

    /// The main device.
    pub fn main(&self) -> &B::Device {
        &self.devices[0]
    }

    /// How many replicas train (devices).
    pub fn replicas(&self) -> usize {
        self.devices.len()
    }

    /// burn-train's DDP strategy when these are several devices; `None` for one device (the
    /// learner's default single-device loop).
    pub fn data_parallel_strategy(&self) -> Option<ExecutionStrategy<B>> {
        self.ddp
            .filter(|_| self.devices.len() > 1)
            .map(|ddp| ddp(self.devices.clone()))
    }
}

/// Micro-batches each device accumulates per optimizer step: `train.grad_accum`, except when
/// resuming on another number of devices, where the checkpoint's global batch is kept (the
/// schedule and data order continue exactly) if the new device count divides it.
pub fn grad_accum_per_device(
    exp: &Experiment,
    replicas: usize,
    resumed: Option<&CheckpointState>,
) -> Result<usize> {
    let accum = exp.train.grad_accum;
    let bs = exp.train.batch_size;
    let Some(global) = resumed.map(|s| s.samples_per_step).filter(|&g| g > 0) else {
        return Ok(accum);
    };
    if global == bs * accum * replicas {
        return Ok(accum);
    }
    if global % (bs * replicas) != 0 {
        return Err(Error::Config {
            path: exp.train.output_dir.join("config.toml"),
            field: "train.grad_accum".into(),
            message: format!(
                "the checkpoint was written with a global batch of {global} samples per step, \
                 which {replicas} device(s) x batch_size {bs} cannot split evenly; resume on a \
                 device count that divides {}",
                global / bs
            ),
        });
    }
    let adjusted = global / (bs * replicas);
    println!(
        "resuming on {replicas} device(s): grad_accum {adjusted} per device keeps the \
         checkpoint's global batch of {global} samples"
    );
    Ok(adjusted)
}
