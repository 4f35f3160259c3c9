//! The decoder's fused layer kernels under autodiff: RMSNorm, q/k RMSNorm + rotary and SwiGLU
//! as one autodiff step each, the forward on the inner backend's fused kernel (`layer_ops`) and
//! the backward in closed form (`layer_grads`: one kernel each on burn-cuda). The tensor ops
//! they replace record ~10 ops per norm and ~16 per norm + rotary, whose backward runs ~2x as
//! many launches, and a training step re-runs every layer under autodiff (layer recomputation)
//! bound by the host's cost per launch.
//!
//! The residual add + norm is the add (an ordinary autodiff op) followed by the norm step; the
//! softmax keeps its tensor ops (training attention is masked). A trainable norm weight takes
//! the tensor ops (the steps give no weight gradient). Registered for an autodiff backend by
//! [`register`], as `layer_ops`'s table of that backend.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use super::autodiff::{prim, tensor, AutodiffInner};
use super::layer_grads::{self, LayerGrads};
use super::layer_ops::{self, LayerOps, SumAndNorm};
use crate::model::attention::softmax_scaled_ops;
use crate::model::layers::rms_norm_ops;
use crate::model::rotary::rms_norm_rotary_ops;

type Ad<B, C> = Autodiff<B, C>;

/// The inner backend's forward kernels (or the tensor ops).
fn forward_ops<B: Backend>() -> LayerOps<B> {
    layer_ops::registered::<B>().unwrap_or_else(LayerOps::reference)
}

/// The inner backend's backward kernels (or the tensor-op closed forms).
fn grad_ops<B: Backend>() -> LayerGrads<B> {
    layer_grads::registered::<B>().unwrap_or_else(LayerGrads::reference)
}

/// What an RMSNorm's backward keeps: its input, weight and ε.
#[derive(Debug, Clone)]
struct NormState<B: Backend> {
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    eps: f64,
}

#[derive(Debug)]
struct NormBackward;

impl<B: Backend> Backward<B, 1> for NormBackward {
    type State = NormState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dy = tensor::<B, 2>(grads.consume::<B>(&ops.node));
        if let Some(node) = node_x {
            let s = ops.state;
            let dx = (grad_ops::<B>().rms_norm)(s.x, s.weight, dy, s.eps);
            grads.register::<B>(node.id, prim(dx));
        }
    }
}

/// RMSNorm of x [rows, d] as one autodiff step.
fn rms_norm<B: AutodiffInner, C: CheckpointStrategy>(
    x: Tensor<Ad<B, C>, 2>,
    weight: Tensor<Ad<B, C>, 1>,
    eps: f64,
) -> Tensor<Ad<B, C>, 2> {
    if weight.is_require_grad() {
        return rms_norm_ops(x, weight, eps);
    }
    let (xi, wi) = (x.clone().inner(), weight.inner());
    let y = (forward_ops::<B>().rms_norm)(xi.clone(), wi.clone(), eps);
    let x = x.into_primitive().tensor();
    let out = match NormBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = NormState {
                x: xi,
                weight: wi,
                eps,
            };
            prep.finish(state, prim(y))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(y)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The residual add (an autodiff op) and the RMSNorm step of the sum.
fn add_rms_norm<B: AutodiffInner, C: CheckpointStrategy>(
    x: Tensor<Ad<B, C>, 2>,
    delta: Tensor<Ad<B, C>, 2>,
    weight: Tensor<Ad<B, C>, 1>,
    eps: f64,
) -> SumAndNorm<Ad<B, C>> {
    let sum = x + delta;
    (sum.clone(), rms_norm(sum, weight, eps))
}

/// What the q/k norm + rotary backward keeps.
#[derive(Debug, Clone)]
struct NormRotaryState<B: Backend> {
    x: Tensor<B, 4>,
    weight: Tensor<B, 1>,
    eps: f64,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
}

#[derive(Debug)]
struct NormRotaryBackward;

impl<B: Backend> Backward<B, 1> for NormRotaryBackward {
    type State = NormRotaryState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dy = tensor::<B, 4>(grads.consume::<B>(&ops.node));
        if let Some(node) = node_x {
            let s = ops.state;
            let dx = (grad_ops::<B>().rms_norm_rotary)(s.x, s.weight, s.eps, s.cos, s.sin, dy);
            grads.register::<B>(node.id, prim(dx));
        }
    }
}

/// A head's RMSNorm then rotary, x [B, H, T, d], cos/sin [B, 1, T, d], as one autodiff step.
fn rms_norm_rotary<B: AutodiffInner, C: CheckpointStrategy>(
    x: Tensor<Ad<B, C>, 4>,
    weight: Tensor<Ad<B, C>, 1>,
    eps: f64,
    cos: &Tensor<Ad<B, C>, 4>,
    sin: &Tensor<Ad<B, C>, 4>,
) -> Tensor<Ad<B, C>, 4> {
    if weight.is_require_grad() || cos.is_require_grad() || sin.is_require_grad() {
        return rms_norm_rotary_ops(x, weight, eps, cos, sin);
    }
    let (xi, wi) = (x.clone().inner(), weight.inner());
    let (ci, si) = (cos.clone().inner(), sin.clone().inner());
    let y = (forward_ops::<B>().rms_norm_rotary)(xi.clone(), wi.clone(), eps, &ci, &si);
    let x = x.into_primitive().tensor();
    let out = match NormRotaryBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = NormRotaryState {
                x: xi,
                weight: wi,
                eps,
                cos: ci,
                sin: si,
            };
            prep.finish(state, prim(y))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(y)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// What SwiGLU's backward keeps: its two inputs.
#[derive(Debug, Clone)]
struct SwigluState<B: Backend> {
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: Backend> Backward<B, 2> for SwigluBackward {
    type State = SwigluState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let dout = tensor::<B, 2>(grads.consume::<B>(&ops.node));
        let s = ops.state;
        let (dgate, dup) = (grad_ops::<B>().swiglu)(s.gate, s.up, dout);
        if let Some(node) = node_gate {
            grads.register::<B>(node.id, prim(dgate));
        }
        if let Some(node) = node_up {
            grads.register::<B>(node.id, prim(dup));
        }
    }
}

/// `silu(gate) · up` [rows, I] as one autodiff step.
fn swiglu<B: AutodiffInner, C: CheckpointStrategy>(
    gate: Tensor<Ad<B, C>, 2>,
    up: Tensor<Ad<B, C>, 2>,
) -> Tensor<Ad<B, C>, 2> {
    let (gi, ui) = (gate.clone().inner(), up.clone().inner());
    let y = (forward_ops::<B>().swiglu)(gi.clone(), ui.clone());
    let (gate, up) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
    let out = match SwigluBackward
        .prepare::<C>([gate.node.clone(), up.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(SwigluState { gate: gi, up: ui }, prim(y)),
        OpsKind::UnTracked(prep) => prep.finish(prim(y)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Autodiff backends whose decoder can run the layer steps.
pub trait LayerStepsBackend: Backend {
    /// The steps, as `layer_ops`'s table of this backend.
    fn layer_steps() -> LayerOps<Self>;
}

impl<B: AutodiffInner, C: CheckpointStrategy> LayerStepsBackend for Autodiff<B, C> {
    fn layer_steps() -> LayerOps<Self> {
        LayerOps {
            rms_norm: rms_norm::<B, C>,
            add_rms_norm: add_rms_norm::<B, C>,
            rms_norm_rotary: rms_norm_rotary::<B, C>,
            softmax_scaled: softmax_scaled_ops::<Self, 2>,
            swiglu: swiglu::<B, C>,
        }
    }
}

/// Makes the decoder on the autodiff backend `B` run the layer steps.
pub fn register<B: LayerStepsBackend>() {
    layer_ops::register_ops(B::layer_steps());
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::Flex;

    type A = Autodiff<Flex>;

    /// Deterministic values in [-scale, scale] of `shape`.
    fn wave<const D: usize>(shape: [usize; D], seed: usize, scale: f32) -> Tensor<Flex, D> {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|j| (((j * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0) * scale)
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn leaf<const D: usize>(t: &Tensor<Flex, D>) -> Tensor<A, D> {
        Tensor::from_inner(t.clone()).require_grad()
    }

    /// Largest difference relative to the largest magnitude of `want`.
    fn rel<const D: usize>(got: Tensor<Flex, D>, want: Tensor<Flex, D>) -> f32 {
        let scale = want.clone().abs().max().into_scalar().max(1e-12);
        (got - want).abs().max().into_scalar() / scale
    }

    /// The norm step (with the closed-form backward) gives the tensor ops' output and input
    /// gradient, alone and after a residual add.
    #[test]
    fn norm_steps_match_the_ops() {
        let (x, delta) = (wave([6, 10], 1, 2.0), wave([6, 10], 2, 1.0));
        let (w, c) = (wave([10], 3, 1.5), wave([6, 10], 4, 1.0));
        let w = Tensor::<A, 1>::from_inner(w);
        let run = |steps: bool| {
            let (xa, da) = (leaf(&x), leaf(&delta));
            let (sum, y) = if steps {
                add_rms_norm::<Flex, NoCheckpointing>(xa.clone(), da.clone(), w.clone(), 1e-6)
            } else {
                crate::model::layers::add_rms_norm_ops(xa.clone(), da.clone(), w.clone(), 1e-6)
            };
            let plain = if steps {
                rms_norm::<Flex, NoCheckpointing>(xa.clone(), w.clone(), 1e-6)
            } else {
                rms_norm_ops(xa.clone(), w.clone(), 1e-6)
            };
            let cc = Tensor::<A, 2>::from_inner(c.clone());
            let loss = (y.clone() * cc.clone()).sum()
                + (sum * cc.clone()).sum()
                + (plain.clone() * cc.mul_scalar(-0.5).add_scalar(0.25)).sum();
            let grads = loss.backward();
            (
                y.inner(),
                xa.grad(&grads).unwrap(),
                da.grad(&grads).unwrap(),
            )
        };
        let (want, got) = (run(false), run(true));
        assert!(rel(got.0, want.0) < 1e-6, "output");
        assert!(rel(got.1, want.1) < 1e-5, "dx");
        assert!(rel(got.2, want.2) < 1e-5, "d delta");
    }

    /// The q/k norm + rotary step gives the tensor ops' output and input gradient for a
    /// strided x (the projection's [B, T, H, d] seen as [B, H, T, d]).
    #[test]
    fn norm_rotary_step_matches_the_ops() {
        let (b, h, t, d) = (2, 3, 5, 8);
        let x = wave([b, t, h, d], 5, 2.0);
        let w = Tensor::<A, 1>::from_inner(wave([d], 6, 1.5));
        let cos = Tensor::<A, 4>::from_inner(wave([b, 1, t, d], 7, 1.0));
        let sin = Tensor::<A, 4>::from_inner(wave([b, 1, t, d], 8, 1.0));
        let c = wave([b, h, t, d], 9, 1.0);
        let run = |steps: bool| {
            let xa = leaf(&x);
            let view = xa.clone().swap_dims(1, 2);
            let y = if steps {
                rms_norm_rotary::<Flex, NoCheckpointing>(view, w.clone(), 1e-6, &cos, &sin)
            } else {
                rms_norm_rotary_ops(view, w.clone(), 1e-6, &cos, &sin)
            };
            let grads = (y.clone() * Tensor::from_inner(c.clone())).sum().backward();
            (y.inner(), xa.grad(&grads).unwrap())
        };
        let (want, got) = (run(false), run(true));
        assert!(rel(got.0, want.0) < 1e-6, "output");
        assert!(rel(got.1, want.1) < 1e-5, "dx");
    }

    /// The SwiGLU step gives the tensor ops' output and both gradients.
    #[test]
    fn swiglu_step_matches_the_ops() {
        let (g, u, c) = (
            wave([4, 9], 10, 4.0),
            wave([4, 9], 11, 2.0),
            wave([4, 9], 12, 1.0),
        );
        let run = |steps: bool| {
            let (ga, ua) = (leaf(&g), leaf(&u));
            let y = if steps {
                swiglu::<Flex, NoCheckpointing>(ga.clone(), ua.clone())
            } else {
                crate::model::text::swiglu_ops(ga.clone(), ua.clone())
            };
            let grads = (y.clone() * Tensor::from_inner(c.clone())).sum().backward();
            (
                y.inner(),
                ga.grad(&grads).unwrap(),
                ua.grad(&grads).unwrap(),
            )
        };
        let (want, got) = (run(false), run(true));
        assert!(rel(got.0, want.0) < 1e-6, "output");
        assert!(rel(got.1, want.1) < 1e-5, "d gate");
        assert!(rel(got.2, want.2) < 1e-5, "d up");
    }
}
