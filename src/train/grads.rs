//! The step's gradient arithmetic: the global squared norm (for clipping and the loss-scale
//! check) and multiplying every gradient by one factor (unscaling and clipping).

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::state::RunState;
use crate::quant::kernels::grad_norm;

/// Σ‖g‖² over every gradient of `module` (one host sync): the inner backend's registered
/// kernel (one launch per gradient), else square, sum and add per gradient.
pub(super) fn grad_sq_sum<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    type Prim<B> = burn::tensor::ops::FloatTensor<<B as AutodiffBackend>::InnerBackend>;
    struct Collect<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        found: Vec<Prim<B>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                self.found.push(g.into_primitive().tensor());
            }
        }
    }
    let mut v = Collect::<B> {
        grads,
        found: Vec::new(),
    };
    module.visit(&mut v);
    let sum = match grad_norm::registered::<B::InnerBackend>() {
        Some(kernel) => (kernel.sq_sum)(v.found),
        None => grad_norm::sq_sum_ops(v.found),
    };
    sum.map(|t| t.into_scalar().elem::<f64>()).unwrap_or(0.0)
}

/// Has the optimizer multiply the gradients by `factor` (inside its update, when the run set a
/// [`super::optim::GradScale`]), or multiplies them here.
pub(super) fn apply_grad_factor<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    run: &RunState,
    grads: &mut GradientsParams,
    factor: f64,
) {
    match run.grad_scale.get() {
        Some(scale) => scale.set(factor),
        None if factor != 1.0 => scale_grads::<B, M>(module, grads, factor),
        None => {}
    }
}

/// Multiplies every gradient of `module` by `factor`.
fn scale_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    factor: f64,
) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    module.visit(&mut Scale { grads, factor });
}
