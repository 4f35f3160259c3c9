//! How a training step's device memory is allocated.
//!
//! burn's CUDA allocator (CubeCL 0.10) carves tensors out of pages whose sizes it derives from
//! the card's memory: on an H200 every 70–560 MB tensor takes a 2.2 GB page and anything larger
//! a 9 GB page, and pages stay reserved. A step whose live tensors peak at ~3 GB then reserves
//! tens of GB, and under a smaller card's memory the pages do not fit at all. In
//! [`StepAllocations::Exact`] mode each micro-batch runs in CubeCL's *persistent* allocation
//! mode instead: every tensor gets an allocation of its own size, reused by later tensors of
//! the same size, so the reservation follows the live tensors. When the batch shape changes,
//! the allocations left from the previous shape are freed first (sizes no longer repeat). No
//! effect on the CPU backends.

use std::sync::{Arc, Mutex};

use burn::prelude::*;

/// Allocation policy of the training step (`QWEN3VL_STEP_MEMORY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepAllocations {
    /// burn's default pools (`pools`).
    Pools,
    /// Exact-size allocations, freed when the batch shape changes (`exact`, the default).
    Exact,
    /// Exact-size allocations, freed before every micro-batch (`exact-fresh`; for measuring
    /// what re-allocating costs).
    ExactFresh,
    /// Exact-size allocations, the free ones also released between a recomputed step's phases
    /// (forward, head, backward: each phase's buffer sizes are not reserved during the next
    /// one's) (`exact-phases`).
    ExactPhases,
}

impl StepAllocations {
    /// The policy named by `QWEN3VL_STEP_MEMORY` (unset: [`StepAllocations::Exact`]).
    pub fn from_env() -> crate::Result<Self> {
        match std::env::var("QWEN3VL_STEP_MEMORY") {
            Err(_) => Ok(Self::Exact),
            Ok(v) => Self::parse(&v),
        }
    }

    /// Parses `pools`, `exact`, `exact-fresh` or `exact-phases`.
    pub fn parse(name: &str) -> crate::Result<Self> {
        match name {
            "pools" => Ok(Self::Pools),
            "exact" => Ok(Self::Exact),
            "exact-fresh" => Ok(Self::ExactFresh),
            "exact-phases" => Ok(Self::ExactPhases),
            other => Err(crate::Error::Input(format!(
                "QWEN3VL_STEP_MEMORY={other:?}: expected one of pools, exact, exact-fresh, \
                 exact-phases"
            ))),
        }
    }
}

/// Runs micro-batches under a [`StepAllocations`] policy, remembering the last batch shape.
#[derive(Debug)]
pub struct StepMemory {
    /// The policy.
    pub mode: StepAllocations,
    last_shape: Mutex<Option<Vec<usize>>>,
}

impl StepMemory {
    /// A policy with no batch seen yet.
    pub fn new(mode: StepAllocations) -> Self {
        Self {
            mode,
            last_shape: Mutex::new(None),
        }
    }

    /// The policy `QWEN3VL_STEP_MEMORY` names, shared by a run's step clones.
    pub fn from_env() -> crate::Result<Arc<Self>> {
        Ok(Arc::new(Self::new(StepAllocations::from_env()?)))
    }

    /// Marks the end of one phase of a step: under [`StepAllocations::ExactPhases`] the free
    /// exact-size allocations are released, so the next phase's sizes are not reserved next
    /// to them.
    pub fn phase_done<B: Backend>(&self, device: &B::Device) {
        if self.mode == StepAllocations::ExactPhases {
            B::memory_cleanup(device);
        }
    }

    /// Runs `step(input)` for a batch of shape `shape` (any dims that size its tensors) on
    /// `device` under the policy.
    pub fn run<B: Backend, I: Send, O: Send>(
        &self,
        device: &B::Device,
        shape: Vec<usize>,
        input: I,
        step: impl Fn(I) -> O + Send,
    ) -> O {
        if self.mode == StepAllocations::Pools {
            return step(input);
        }
        let changed = {
            let mut last = self.last_shape.lock().unwrap_or_else(|e| e.into_inner());
            let changed = last.as_ref().is_some_and(|l| *l != shape);
            *last = Some(shape);
            changed
        };
        if changed || self.mode == StepAllocations::ExactFresh {
            B::memory_cleanup(device);
        }
        B::memory_persistent_allocations(device, input, move |input| {
            let out = step(input);
            // Lazy (fusion) backends allocate when they run the queued work: run it here.
            let _ = B::sync(device);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn policies_parse_and_bad_names_are_refused() {
        assert_eq!(
            StepAllocations::parse("pools").unwrap(),
            StepAllocations::Pools
        );
        assert_eq!(
            StepAllocations::parse("exact").unwrap(),
            StepAllocations::Exact
        );
        assert_eq!(
            StepAllocations::parse("exact-fresh").unwrap(),
            StepAllocations::ExactFresh
        );
        assert_eq!(
            StepAllocations::parse("exact-phases").unwrap(),
            StepAllocations::ExactPhases
        );
        let e = StepAllocations::parse("big").unwrap_err().to_string();
        assert!(
            e.contains("\"big\"") && e.contains("pools, exact, exact-fresh"),
            "{e}"
        );
    }

    #[test]
    fn runs_the_step_and_remembers_the_shape() {
        let m = StepMemory::new(StepAllocations::Exact);
        let dev = Default::default();
        let y = m.run::<Flex, _, _>(&dev, vec![2, 3], 4, |x: i32| x * 2);
        assert_eq!(y, 8);
        assert_eq!(*m.last_shape.lock().unwrap(), Some(vec![2, 3]));
        let y = m.run::<Flex, _, _>(&dev, vec![1, 5], 1, |x: i32| x + 1);
        assert_eq!(y, 2);
        assert_eq!(*m.last_shape.lock().unwrap(), Some(vec![1, 5]));
    }
}
