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
//!
//! Exact sizes cost more memory than pools when many sizes are live in different phases of a
//! step: near a small card's limit CubeCL is refused allocations and frees and re-allocates
//! all the time (H200 under a 3,870 MiB cap, MoE-LoRA 8 x 1: 65,000 refusals, 10.7 samples/s;
//! pools 506 refusals, 12.7 samples/s). [`StepAllocations::Auto`], the default, therefore starts
//! exact and turns to pools for the rest of the run once a step has filled the device.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use burn::prelude::*;

/// Allocation policy of the training step (`QWEN3VL_STEP_MEMORY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepAllocations {
    /// [`StepAllocations::Exact`] until a step leaves the device nearly full (reserved memory
    /// above [`FULL`] of the device's), then [`StepAllocations::Pools`] (`auto`, the default).
    Auto,
    /// burn's default pools (`pools`).
    Pools,
    /// Exact-size allocations, freed when the batch shape changes (`exact`).
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
    /// The policy named by `QWEN3VL_STEP_MEMORY` (unset: [`StepAllocations::Auto`]).
    pub fn from_env() -> crate::Result<Self> {
        match std::env::var("QWEN3VL_STEP_MEMORY") {
            Err(_) => Ok(Self::Auto),
            Ok(v) => Self::parse(&v),
        }
    }

    /// Parses `auto`, `pools`, `exact`, `exact-fresh` or `exact-phases`.
    pub fn parse(name: &str) -> crate::Result<Self> {
        match name {
            "auto" => Ok(Self::Auto),
            "pools" => Ok(Self::Pools),
            "exact" => Ok(Self::Exact),
            "exact-fresh" => Ok(Self::ExactFresh),
            "exact-phases" => Ok(Self::ExactPhases),
            other => Err(crate::Error::Input(format!(
                "QWEN3VL_STEP_MEMORY={other:?}: expected one of auto, pools, exact, \
                 exact-fresh, exact-phases"
            ))),
        }
    }
}

/// Share of the device's memory that, reserved after a step, counts as full.
pub const FULL: f64 = 0.95;

/// A device's memory as its allocator sees it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Reserved by the allocator (in use or kept for reuse).
    pub reserved: u64,
    /// The device's total.
    pub total: u64,
}

/// Reads a device's memory (`None` for devices it does not know), for [`StepAllocations::Auto`].
pub type DeviceMemoryProbe = fn(&dyn Any) -> Option<DeviceMemory>;

static PROBE: OnceLock<DeviceMemoryProbe> = OnceLock::new();

/// Sets how [`StepAllocations::Auto`] reads device memory (the binary registers CUDA's; without
/// one, `auto` stays exact).
pub fn register_memory_probe(probe: DeviceMemoryProbe) {
    let _ = PROBE.set(probe);
}

/// The message for a training run stopped by a panic with message `panic`: the panic's first
/// line, and for the device's out-of-memory errors what to change.
pub fn stopped_message(panic: &str) -> String {
    let first = panic.lines().next().unwrap_or("unknown panic");
    let lower = panic.to_lowercase();
    if lower.contains("out-of-memory")
        || lower.contains("out of memory")
        || panic.contains("OutOfMemory")
    {
        format!(
            "training stopped: the device ran out of memory ({first}). Use less: \
             train.gradient_checkpointing = true, a smaller train.batch_size (with \
             train.grad_accum for the same batch), or QWEN3VL_STEP_MEMORY=pools"
        )
    } else {
        format!("training stopped: {panic}")
    }
}

/// Runs micro-batches under a [`StepAllocations`] policy, remembering the last batch shape.
#[derive(Debug)]
pub struct StepMemory {
    /// The policy.
    pub mode: StepAllocations,
    last_shape: Mutex<Option<Vec<usize>>>,
    /// Under [`StepAllocations::Auto`]: a step has filled the device, pools from now on.
    pooled: AtomicBool,
}

impl StepMemory {
    /// A policy with no batch seen yet.
    pub fn new(mode: StepAllocations) -> Self {
        Self {
            mode,
            last_shape: Mutex::new(None),
            pooled: AtomicBool::new(mode == StepAllocations::Pools),
        }
    }

    /// Whether steps now allocate from burn's pools.
    pub fn pooled(&self) -> bool {
        self.pooled.load(Ordering::Relaxed)
    }

    /// Under [`StepAllocations::Auto`]: turns to pools when `memory` shows a full device, with
    /// one line saying so; the exact allocations are freed by the caller.
    fn check_full(&self, memory: DeviceMemory) -> bool {
        if self.mode != StepAllocations::Auto
            || self.pooled()
            || (memory.reserved as f64) < FULL * memory.total as f64
        {
            return false;
        }
        self.pooled.store(true, Ordering::Relaxed);
        let mib = |b: u64| b / (1 << 20);
        eprintln!(
            "step memory: a step reserved {} of the device's {} MiB; exact-size allocations \
             churn this close to the limit, so steps use pooled allocations from now on \
             (QWEN3VL_STEP_MEMORY=exact keeps them)",
            mib(memory.reserved),
            mib(memory.total)
        );
        true
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
        if self.pooled() {
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
        let out = B::memory_persistent_allocations(device, input, move |input| {
            let out = step(input);
            // Lazy (fusion) backends allocate when they run the queued work: run it here.
            let _ = B::sync(device);
            out
        });
        if self.mode == StepAllocations::Auto {
            let memory = PROBE.get().and_then(|probe| probe(device as &dyn Any));
            if memory.is_some_and(|m| self.check_full(m)) {
                B::memory_cleanup(device);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn policies_parse_and_bad_names_are_refused() {
        assert_eq!(
            StepAllocations::parse("auto").unwrap(),
            StepAllocations::Auto
        );
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
            e.contains("\"big\"") && e.contains("auto, pools, exact, exact-fresh"),
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

    #[test]
    fn auto_turns_to_pools_once_a_step_fills_the_device() {
        let m = StepMemory::new(StepAllocations::Auto);
        let gib = 1u64 << 30;
        // 90 % reserved: still exact.
        assert!(!m.check_full(DeviceMemory {
            reserved: 9 * gib,
            total: 10 * gib
        }));
        assert!(!m.pooled());
        // 96 %: pools, once.
        assert!(m.check_full(DeviceMemory {
            reserved: 96 * gib / 10,
            total: 10 * gib
        }));
        assert!(m.pooled());
        assert!(!m.check_full(DeviceMemory {
            reserved: 10 * gib,
            total: 10 * gib
        }));
        // Other policies never switch; pools starts pooled.
        let exact = StepMemory::new(StepAllocations::Exact);
        assert!(!exact.check_full(DeviceMemory {
            reserved: 10 * gib,
            total: 10 * gib
        }));
        assert!(!exact.pooled());
        assert!(StepMemory::new(StepAllocations::Pools).pooled());
    }

    #[test]
    fn out_of_memory_stops_say_what_to_change() {
        let oom =
            "An out-of-memory error happened during launch\nCaused by:\n  alloc\nBacktrace\n...";
        let m = stopped_message(oom);
        assert!(m.contains("ran out of memory"), "{m}");
        assert!(
            m.contains("gradient_checkpointing") && m.contains("batch_size"),
            "{m}"
        );
        assert!(!m.contains("Backtrace"), "only the first line: {m}");
        assert_eq!(
            stopped_message("index out of bounds"),
            "training stopped: index out of bounds"
        );
    }
}
