//! Learning-rate schedule: linear warmup, then cosine or linear decay, in optimizer steps.
//!
//! burn 0.21's Learner calls the scheduler once per batch, also inside a gradient-accumulation
//! window, so the schedule counts calls and converts them to optimizer steps with
//! `calls_per_step` (the accumulation): every batch of a window sees the same rate, the rate of
//! the optimizer step the window belongs to.

use burn::lr_scheduler::LrScheduler;
use burn::prelude::Backend;

/// Decay after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    /// Half cosine from the peak to `min_lr`.
    Cosine,
    /// Straight line from the peak to `min_lr` (HF Trainer's default).
    Linear,
}

/// Warmup + decay schedule over `total_steps` optimizer steps.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmupDecay {
    /// Rate at the end of the warmup.
    pub peak: f64,
    /// Rate at the last step.
    pub min_lr: f64,
    /// Warmup optimizer steps (the rate ramps from peak/warmup to peak).
    pub warmup_steps: usize,
    /// All optimizer steps of the run.
    pub total_steps: usize,
    /// Decay shape.
    pub decay: Decay,
    /// Scheduler calls per optimizer step (gradient accumulation).
    pub calls_per_step: usize,
    /// Calls made so far (the resumable state).
    pub calls: usize,
}

impl WarmupDecay {
    /// Rate of optimizer step `step` (1-based).
    pub fn rate_at(&self, step: usize) -> f64 {
        let step = step.max(1);
        if step <= self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let p = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let shape = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            Decay::Linear => 1.0 - p,
        };
        self.min_lr + (self.peak - self.min_lr) * shape
    }
}

impl LrScheduler for WarmupDecay {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> f64 {
        self.calls += 1;
        let step = (self.calls - 1) / self.calls_per_step.max(1) + 1;
        self.rate_at(step)
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.calls
    }

    fn load_record<B: Backend>(mut self, calls: usize) -> Self {
        self.calls = calls;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Flex;

    fn sched(decay: Decay) -> WarmupDecay {
        WarmupDecay {
            peak: 1e-4,
            min_lr: 0.0,
            warmup_steps: 4,
            total_steps: 20,
            decay,
            calls_per_step: 8,
            calls: 0,
        }
    }

    #[test]
    fn warmup_then_decay_per_optimizer_step() {
        let mut s = sched(Decay::Cosine);
        let rates: Vec<f64> = (0..20 * 8).map(|_| s.step()).collect();
        // The 8 batches of a window share one rate.
        assert!(rates[..8].iter().all(|&r| r == 2.5e-5));
        assert_eq!(rates[3 * 8], 1e-4); // end of warmup
        assert!((rates[11 * 8] - 5e-5).abs() < 1e-12); // step 12: cosine midpoint
        assert!(rates[19 * 8].abs() < 1e-18); // last step reaches min_lr
        assert!(rates.windows(2).skip(32).all(|w| w[1] <= w[0]));
        let lin = sched(Decay::Linear);
        assert!((lin.rate_at(12) - 5e-5).abs() < 1e-12);
        assert!((lin.rate_at(8) - 7.5e-5).abs() < 1e-12);
    }

    #[test]
    fn resumes_from_its_record() {
        let mut a = sched(Decay::Cosine);
        for _ in 0..37 {
            a.step();
        }
        let rec = LrScheduler::to_record::<B>(&a);
        let mut b = LrScheduler::load_record::<B>(sched(Decay::Cosine), rec);
        for _ in 0..50 {
            assert_eq!(a.step(), b.step());
        }
    }
}
