//! The training optimizer: burn's AdamW, with each parameter's update as one kernel launch where
//! the backend registered one (`quant::kernels::adamw`), else burn's own tensor ops. Its state is
//! burn's `AdamWState`, so optimizer checkpoints are the same files either way.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer,
};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;

use super::state::RunState;
use crate::quant::kernels::adamw::{registered, AdamWKernel, AdamWScalars};

/// β1, β2 and ε of every run (HF's AdamW defaults).
const BETAS_EPSILON: (f32, f32, f32) = (0.9, 0.999, 1e-8);

/// The factor every gradient is multiplied by before the next update (gradient clipping and
/// loss unscaling), shared between the training step that decides it and the optimizer that
/// applies it: inside the AdamW kernel it costs no launch of its own.
#[derive(Clone, Debug)]
pub struct GradScale(Arc<AtomicU32>);

impl GradScale {
    /// Factor 1.
    pub fn new() -> Self {
        Self(Arc::new(AtomicU32::new(1.0f32.to_bits())))
    }

    /// Sets the factor of the next updates.
    pub fn set(&self, factor: f64) {
        self.0.store((factor as f32).to_bits(), Ordering::Relaxed);
    }

    /// The current factor.
    pub fn get(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl Default for GradScale {
    fn default() -> Self {
        Self::new()
    }
}

/// AdamW that updates a parameter in one launch on backends with the kernel (see the module).
#[derive(Clone)]
pub struct FusedAdamW {
    reference: AdamW,
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    grad_scale: GradScale,
}

impl FusedAdamW {
    /// AdamW with β = (0.9, 0.999), ε = 1e-8 and decoupled `weight_decay`.
    pub fn new(weight_decay: f32) -> Self {
        let (beta_1, beta_2, epsilon) = BETAS_EPSILON;
        Self {
            reference: AdamWConfig::new()
                .with_beta_1(beta_1)
                .with_beta_2(beta_2)
                .with_epsilon(epsilon)
                .with_weight_decay(weight_decay)
                .build(),
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
            grad_scale: GradScale::new(),
        }
    }

    /// The optimizer of `run` for module `M` on autodiff backend `B`. On one device the run's
    /// step hands it the gradient factor (`RunState::grad_scale`); data-parallel replicas
    /// would share one factor between steps that overlap, so they multiply their own
    /// gradients.
    pub fn for_run<B: AutodiffBackend, M: AutodiffModule<B>>(
        run: &RunState,
        weight_decay: f32,
    ) -> OptimizerAdaptor<Self, M, B> {
        let adamw = Self::new(weight_decay);
        if run.settings.replicas == 1 {
            let _ = run.grad_scale.set(adamw.grad_scale.clone());
        }
        OptimizerAdaptor::from(adamw)
    }
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        self.step_with(registered::<B>(), lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

impl FusedAdamW {
    /// One update of the gradient times the [`GradScale`] factor with `kernel` (burn's AdamW
    /// when `None`, or for what the kernel does not take: non-f32 tensors, AMSGrad state).
    fn step_with<B: Backend, const D: usize>(
        &self,
        kernel: Option<AdamWKernel<B>>,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<AdamWState<B, D>>,
    ) -> (Tensor<B, D>, Option<AdamWState<B, D>>) {
        let kernel = kernel.filter(|_| {
            tensor.dtype() == DType::F32
                && grad.dtype() == DType::F32
                && state
                    .as_ref()
                    .is_none_or(|s| s.momentum.max_moment_2.is_none())
        });
        let factor = self.grad_scale.get();
        let Some(kernel) = kernel else {
            let grad = if factor == 1.0 {
                grad
            } else {
                grad.mul_scalar(factor)
            };
            return SimpleOptimizer::<B>::step(&self.reference, lr, tensor, grad, state);
        };
        let dims = tensor.dims();
        let n = dims.iter().product::<usize>();
        let (moments, time) = match state {
            Some(s) => {
                let m = s.momentum;
                let flat = (m.moment_1.reshape([n]), m.moment_2.reshape([n]));
                (Some(flat), m.time + 1)
            }
            None => (None, 1),
        };
        let scalars = AdamWScalars {
            lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            time,
            grad_scale: factor,
        };
        let (p, m, v) = (kernel.step)(tensor.reshape([n]), grad.reshape([n]), moments, scalars);
        let momentum = AdaptiveMomentumState::new(time, m.reshape(dims), v.reshape(dims));
        (p.reshape(dims), Some(AdamWState::new(momentum)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::kernels::adamw::step_ops;
    use burn::backend::Flex;

    fn wave(n: usize, seed: usize) -> Tensor<Flex, 2> {
        let v = (0..n)
            .map(|j| (((j * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 0.5)
            .collect();
        Tensor::<Flex, 1>::from_data(TensorData::new(v, [n]), &Default::default())
            .reshape([3, n / 3])
    }

    /// Three updates through the one-launch path (with the kernel's expression in tensor ops)
    /// equal burn's AdamW of the scaled gradient, with and without weight decay and a gradient
    /// factor; the state keeps burn's layout.
    #[test]
    fn one_launch_updates_equal_burns_adamw() {
        for (wd, factor) in [(0.0f32, 1.0), (0.05, 0.3)] {
            let run = |fused: bool| {
                let kernel = fused.then_some(AdamWKernel::<Flex> { step: step_ops });
                let optim = FusedAdamW::new(wd);
                optim.grad_scale.set(factor);
                let (mut p, mut state) = (wave(33, 1), None);
                for step in 0..3 {
                    let grad = wave(33, 10 + step);
                    (p, state) = match fused {
                        true => optim.step_with(kernel, 1e-2, p, grad, state),
                        // burn's AdamW itself, on the gradient scaled beforehand.
                        false => SimpleOptimizer::<Flex>::step(
                            &optim.reference,
                            1e-2,
                            p,
                            grad.mul_scalar(factor),
                            state,
                        ),
                    };
                }
                let s = state.expect("state").momentum;
                assert_eq!(s.time, 3);
                (p, s.moment_1, s.moment_2)
            };
            let (got, want) = (run(true), run(false));
            for (g, w) in [(got.0, want.0), (got.1, want.1), (got.2, want.2)] {
                let err = (g - w.clone()).abs().max().into_scalar()
                    / w.abs().max().into_scalar().max(1e-12);
                assert!(
                    err < 1e-5,
                    "weight decay {wd}, factor {factor}: relative error {err:e}"
                );
            }
        }
    }
}
