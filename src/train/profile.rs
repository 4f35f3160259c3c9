//! Opt-in timing of a training step's phases (`QWEN3VL_PROFILE=1`): for each phase, the host
//! time until its calls returned (what queuing the kernels cost) and the time until the device
//! finished it. When the two are close the step is bound by the host (launches, autodiff
//! bookkeeping), not by the device. Synchronising after each phase removes the overlap between
//! phases, so a profiled step runs a little slower than an unprofiled one.

use std::time::Instant;

use burn::prelude::*;

/// Whether `QWEN3VL_PROFILE=1` asked for phase timings.
pub fn enabled() -> bool {
    std::env::var("QWEN3VL_PROFILE").is_ok_and(|v| v == "1")
}

/// Phase timings of one micro-batch (no-op unless [`enabled`]).
pub struct PhaseClock<B: Backend> {
    device: Option<B::Device>,
    started: Instant,
    phases: Vec<(&'static str, f64, f64)>,
}

impl<B: Backend> PhaseClock<B> {
    /// Starts timing on `device` (after waiting for the work queued before).
    pub fn start(device: &B::Device) -> Self {
        let device = enabled().then(|| device.clone());
        if let Some(d) = &device {
            let _ = B::sync(d);
        }
        Self {
            device,
            started: Instant::now(),
            phases: Vec::new(),
        }
    }

    /// Ends phase `name`: host time so far, then waits for the device.
    pub fn lap(&mut self, name: &'static str) {
        let Some(d) = &self.device else { return };
        let queued = self.started.elapsed().as_secs_f64();
        let _ = B::sync(d);
        let done = self.started.elapsed().as_secs_f64();
        self.phases.push((name, queued, done));
        self.started = Instant::now();
    }

    /// Prints one line: each phase's `queued/done` milliseconds.
    pub fn report(&self, what: &str) {
        if self.device.is_none() {
            return;
        }
        let parts: Vec<String> = self
            .phases
            .iter()
            .map(|(n, q, d)| format!("{n} {:.1}/{:.1}", q * 1e3, d * 1e3))
            .collect();
        let total: f64 = self.phases.iter().map(|p| p.2).sum();
        eprintln!(
            "profile {what}: {} ms (queued/done); total {:.1} ms",
            parts.join(", "),
            total * 1e3
        );
    }
}
