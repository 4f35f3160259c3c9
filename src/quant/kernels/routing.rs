//! MoE-LoRA routing as one autodiff step: the forward runs on the inner backend (no graph of
//! ~15 recorded ops: softmax, k argmax rounds, masks, products) and the backward is the closed
//! form of `adapter::routing::route_backward` — a handful of ops instead of the ops' recorded
//! backward, and with gradient checkpointing the routing is kept, not recomputed.
//!
//! Found at run time like the other kernels: the binary [`register`]s its autodiff backends and
//! `MoeLoraLinear` asks [`registered`]; elsewhere `route_ops` runs (autodiff through the ops).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use super::autodiff::AutodiffInner;
use crate::adapter::routing::{route_backward, route_ops, RouteOptions, Routing};

/// The forward's tensors the backward needs: probabilities, mask (ones when dense), gate, each
/// [N, E] on the inner backend.
#[derive(Debug, Clone)]
struct RouteState<B: Backend> {
    probs: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    gate: Tensor<B, 2>,
    options: RouteOptions,
}

/// Backward of the packed output [gate | probs] [N, 2E] with respect to the logits [N, E].
#[derive(Debug)]
struct RouteBackward;

impl<B: Backend> Backward<B, 1> for RouteBackward {
    type State = RouteState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_logits] = ops.parents;
        let grad = grads.consume::<B>(&ops.node); // [N, 2E]
        if let Some(node) = node_logits {
            let s = ops.state;
            let grad = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad));
            let e = s.probs.dims()[1];
            let (g, q) = (grad.clone().narrow(1, 0, e), grad.narrow(1, e, e));
            let dl = route_backward(s.probs, s.mask, s.gate, g, q, s.options);
            grads.register::<B>(node.id, dl.into_primitive().tensor());
        }
    }
}

/// Routes `logits` [N, E] as one autodiff step (see the module doc).
fn route<B: AutodiffInner, C: CheckpointStrategy>(
    logits: Tensor<Autodiff<B, C>, 2>,
    o: RouteOptions,
) -> Routing<Autodiff<B, C>> {
    let inner = route_ops::<B>(logits.clone().inner(), o);
    let e = inner.probs.dims()[1];
    // [N, 2E]: the two differentiable outputs side by side.
    let packed = Tensor::cat(vec![inner.gate.clone(), inner.probs.clone()], 1);
    let logits = logits.into_primitive().tensor();
    let out = match RouteBackward
        .prepare::<C>([logits.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = RouteState {
                mask: inner.mask.clone().unwrap_or_else(|| inner.probs.ones_like()),
                probs: inner.probs,
                gate: inner.gate,
                options: o,
            };
            prep.finish(state, packed.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => prep.finish(packed.into_primitive().tensor()),
    };
    let out = Tensor::<Autodiff<B, C>, 2>::from_primitive(TensorPrimitive::Float(out));
    Routing {
        gate: out.clone().narrow(1, 0, e),
        probs: out.narrow(1, e, e),
        mask: inner.mask.map(Tensor::from_inner),
    }
}

/// A backend's routing step (what the registry holds).
pub struct RoutingOps<B: Backend> {
    /// Logits [N, E] (f32) -> gates, probabilities, choices.
    pub route: fn(Tensor<B, 2>, RouteOptions) -> Routing<B>,
}

impl<B: Backend> Clone for RoutingOps<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for RoutingOps<B> {}

/// Autodiff backends that can route in one step.
pub trait OneStepRouting: Backend {
    /// The routing step for this backend.
    fn routing_ops() -> RoutingOps<Self>;
}

impl<B: AutodiffInner, C: CheckpointStrategy> OneStepRouting for Autodiff<B, C> {
    fn routing_ops() -> RoutingOps<Self> {
        RoutingOps { route: route::<B, C> }
    }
}

/// Makes `MoeLoraLinear` on the autodiff backend `B` route in one autodiff step.
pub fn register<B: OneStepRouting>() {
    super::store(B::routing_ops());
}

/// Forgets the routing step of backend `B` (autodiff through the ops again).
pub fn unregister<B: Backend>() {
    super::remove::<RoutingOps<B>>();
}

/// The routing step registered for backend `B`, if any.
pub fn registered<B: Backend>() -> Option<RoutingOps<B>> {
    super::fetch::<RoutingOps<B>>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::Flex;

    type Ad = Autodiff<Flex>;

    /// The one-step routing gives the ops' gates, probabilities and choices, and the same
    /// logits gradient for a loss that reaches both the gates and the probabilities.
    #[test]
    fn one_step_routing_matches_the_ops_forward_and_backward() {
        let dev = Default::default();
        for (i, &(e, k, renormalize)) in [(2, 1, false), (4, 2, true), (3, 3, false)]
            .iter()
            .enumerate()
        {
            let o = RouteOptions {
                top_k: k,
                renormalize,
                scaling: 2.0,
            };
            let n = 11;
            let wave = |seed: usize| -> Tensor<Flex, 2> {
                let v = (0..n * e)
                    .map(|j| (((j * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 2.0)
                    .collect();
                Tensor::from_data(TensorData::new(v, [n, e]), &dev)
            };
            let (logits, g, q) = (wave(3 * i), wave(3 * i + 1), wave(3 * i + 2));
            let run = |one_step: bool| {
                let l = Tensor::<Ad, 2>::from_inner(logits.clone()).require_grad();
                let r = if one_step {
                    route::<Flex, NoCheckpointing>(l.clone(), o)
                } else {
                    route_ops(l.clone(), o)
                };
                let loss = (r.gate.clone() * Tensor::from_inner(g.clone())).sum()
                    + (r.probs.clone() * Tensor::from_inner(q.clone())).sum();
                let grad = l.grad(&loss.backward()).unwrap();
                (r.gate.inner(), r.probs.inner(), r.mask.map(|m| m.inner()), grad)
            };
            let (want, got) = (run(false), run(true));
            got.0.into_data().assert_approx_eq::<f32>(&want.0.into_data(), Default::default());
            got.1.into_data().assert_approx_eq::<f32>(&want.1.into_data(), Default::default());
            assert_eq!(got.2.is_some(), want.2.is_some(), "case {i}: mask presence");
            if let (Some(a), Some(b)) = (got.2, want.2) {
                a.into_data().assert_eq(&b.into_data(), true);
            }
            let err = (got.3 - want.3.clone()).abs().max().into_scalar()
                / want.3.abs().max().into_scalar();
            assert!(err < 1e-5, "case {i}: gradient relative error {err:e}");
        }
    }
}
