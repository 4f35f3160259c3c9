//! MoE-LoRA's two products as one autodiff step each, with closed-form backwards. The training
//! step is bound by the host's cost per recorded op (its forward launch, its graph node and its
//! backward's launches), and the tensor ops of `adapter::experts` record ~5 ops for the router
//! (cast, mask, transpose, matmul) and ~12 for the experts (casts, reshapes, swaps, two
//! matmuls, the gate product, the add to the base output):
//!
//! * router: `logits = (x·mask)·Rᵀ` in f32; backward dR = dLᵀ·x_d, dx = (dL·R)·mask;
//! * experts: `out = y + (h ⊙ g)·B_cat`, `h = x_e·A_catᵀ`; backward dy = dO,
//!   dB_cat = (h ⊙ g)ᵀ·dO, dH = dO·B_catᵀ, dg = Σ_r dH ⊙ h, dA_cat = (dH ⊙ g)ᵀ·x_e,
//!   dx = ((dH ⊙ g)·A_cat)·mask.
//!
//! Found at run time like the routing step: the binary [`register`]s its autodiff backends and
//! `MoeLoraLinear` asks [`registered`]; elsewhere the tensor ops run (autodiff through them).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};

use super::autodiff::{prim, tensor, AutodiffInner};
use crate::adapter::experts::ExpertInputs;

/// Router logits of (x, router, the router's dropout mask).
pub type RouterLogitsFn<B> = fn(Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 2>>) -> Tensor<B, 2>;

/// A backend's MoE-LoRA steps (what the registry holds).
pub struct ExpertSteps<B: Backend> {
    /// Router logits [N, E] (f32) of x [N, in], the router [E, in] (f32) and the router's
    /// dropout mask [N, in] (f32, 1/keep folded in): see `adapter::experts::router_logits_ops`.
    pub router_logits: RouterLogitsFn<B>,
    /// The base output plus the experts' update [N, out]: see
    /// `adapter::experts::add_experts_ops`.
    pub add_experts: fn(ExpertInputs<B>) -> Tensor<B, 2>,
}

impl<B: Backend> Clone for ExpertSteps<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for ExpertSteps<B> {}

/// What the router's backward keeps: the masked f32 input [N, in], the router [E, in], the
/// mask and the input's dtype.
#[derive(Debug, Clone)]
struct RouterState<B: Backend> {
    x: Tensor<B, 2>,
    router: Tensor<B, 2>,
    mask: Option<Tensor<B, 2>>,
    dtype: DType,
}

/// Backward of the router logits with respect to x and the router.
#[derive(Debug)]
struct RouterBackward;

impl<B: Backend> Backward<B, 2> for RouterBackward {
    type State = RouterState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_router] = ops.parents;
        let dl = tensor::<B, 2>(grads.consume::<B>(&ops.node)); // [N, E] f32
        let s = ops.state;
        if let Some(node) = node_router {
            let dr = dl.clone().transpose().matmul(s.x); // [E, in]
            grads.register::<B>(node.id, prim(dr));
        }
        if let Some(node) = node_x {
            let dx = dl.matmul(s.router); // [N, in] f32
            let dx = match s.mask {
                Some(m) => dx * m,
                None => dx,
            };
            grads.register::<B>(node.id, prim(dx.cast(s.dtype)));
        }
    }
}

/// The router's logits as one autodiff step (see the module doc).
fn router_logits<B: AutodiffInner, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    router: Tensor<Autodiff<B, C>, 2>,
    mask: Option<Tensor<Autodiff<B, C>, 2>>,
) -> Tensor<Autodiff<B, C>, 2> {
    let dtype = x.dtype();
    let mask = mask.map(|m| m.inner());
    let xd = x.clone().inner().cast(DType::F32);
    let xd = match &mask {
        Some(m) => xd * m.clone(),
        None => xd,
    };
    let r = router.clone().inner();
    let logits = xd.clone().matmul(r.clone().transpose()); // [N, E]
    let (x, router) = (
        x.into_primitive().tensor(),
        router.into_primitive().tensor(),
    );
    let out = match RouterBackward
        .prepare::<C>([x.node.clone(), router.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = RouterState {
                x: xd,
                router: r,
                mask,
                dtype,
            };
            prep.finish(state, prim(logits))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(logits)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// What the experts' backward keeps (inner backend, compute dtype): the masked input x_e
/// [N, in], A_cat [E·r, in], B_cat [E·r, out], the gates [N, E], h = x_e·A_catᵀ and h ⊙ g
/// [N, E·r], the mask, and the experts' count and rank.
#[derive(Debug, Clone)]
struct ExpertState<B: Backend> {
    x: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    gate: Tensor<B, 2>,
    h: Tensor<B, 2>,
    hg: Tensor<B, 2>,
    mask: Option<Tensor<B, 2>>,
    experts: usize,
    rank: usize,
}

/// Backward of `y + (h ⊙ g)·B_cat` with respect to y, x, A, B and the gates.
#[derive(Debug)]
struct ExpertBackward;

impl<B: Backend> Backward<B, 5> for ExpertBackward {
    type State = ExpertState<B>;

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_y, node_x, node_a, node_b, node_gate] = ops.parents;
        let d_out = tensor::<B, 2>(grads.consume::<B>(&ops.node)); // [N, out]
        let s = ops.state;
        let (n, e, r) = (s.x.dims()[0], s.experts, s.rank);
        let [_, d_in] = s.a.dims();
        let [_, width] = s.b.dims();
        if let Some(node) = node_b {
            // [E·r, out] -> [E, r, out] -> [E, out, r]
            let db = s.hg.transpose().matmul(d_out.clone()).cast(DType::F32);
            let db = db.reshape([e, r, width]).swap_dims(1, 2);
            grads.register::<B>(node.id, prim(db));
        }
        if node_x.is_some() || node_a.is_some() || node_gate.is_some() {
            let dh = d_out.clone().matmul(s.b.transpose()); // [N, E·r]
            if let Some(node) = node_gate {
                let dg = (dh.clone() * s.h).cast(DType::F32).reshape([n, e, r]);
                grads.register::<B>(node.id, prim(dg.sum_dim(2).reshape([n, e])));
            }
            let dh = (dh.reshape([n, e, r]) * s.gate.unsqueeze_dim::<3>(2)).reshape([n, e * r]);
            if let Some(node) = node_a {
                let da = dh.clone().transpose().matmul(s.x).cast(DType::F32); // [E·r, in]
                grads.register::<B>(node.id, prim(da.reshape([e, r, d_in])));
            }
            if let Some(node) = node_x {
                let dx = dh.matmul(s.a); // [N, in]
                let dx = match s.mask {
                    Some(m) => dx * m,
                    None => dx,
                };
                grads.register::<B>(node.id, prim(dx));
            }
        }
        if let Some(node) = node_y {
            grads.register::<B>(node.id, prim(d_out));
        }
    }
}

/// The base output plus the experts' update as one autodiff step (see the module doc).
fn add_experts<B: AutodiffInner, C: CheckpointStrategy>(
    i: ExpertInputs<Autodiff<B, C>>,
) -> Tensor<Autodiff<B, C>, 2> {
    let [e, r, d_in] = i.a.dims();
    let [_, d_out, _] = i.b.dims();
    let n = i.x.dims()[0];
    let dtype = i.x.dtype();
    let mask = i.mask.map(|m| m.inner());
    let x = i.x.clone().inner();
    let x = match &mask {
        Some(m) => x * m.clone(),
        None => x,
    };
    let a = i.a.clone().inner().reshape([e * r, d_in]).cast(dtype); // [E·r, in]
    let b = i.b.clone().inner().cast(dtype).swap_dims(1, 2); // [E, r, out]
    let b = b.reshape([e * r, d_out]); // [E·r, out]
    let gate = i.gate.clone().inner().cast(dtype); // [N, E]
    let h = x.clone().matmul(a.clone().transpose()); // [N, E·r]
    let hg =
        (h.clone().reshape([n, e, r]) * gate.clone().unsqueeze_dim::<3>(2)).reshape([n, e * r]);
    let out = i.y.clone().inner() + hg.clone().matmul(b.clone());
    let nodes = [i.y, i.x, i.gate].map(|t| t.into_primitive().tensor().node);
    let [y, xn, g] = nodes;
    let (an, bn) = (
        i.a.into_primitive().tensor().node,
        i.b.into_primitive().tensor().node,
    );
    let out = match ExpertBackward
        .prepare::<C>([y, xn, an, bn, g])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = ExpertState {
                x,
                a,
                b,
                gate,
                h,
                hg,
                mask,
                experts: e,
                rank: r,
            };
            prep.finish(state, prim(out))
        }
        OpsKind::UnTracked(prep) => prep.finish(prim(out)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Autodiff backends that can run MoE-LoRA's products as one step each.
pub trait OneStepExperts: Backend {
    /// The steps for this backend.
    fn expert_steps() -> ExpertSteps<Self>;
}

impl<B: AutodiffInner, C: CheckpointStrategy> OneStepExperts for Autodiff<B, C> {
    fn expert_steps() -> ExpertSteps<Self> {
        ExpertSteps {
            router_logits: router_logits::<B, C>,
            add_experts: add_experts::<B, C>,
        }
    }
}

/// Makes `MoeLoraLinear` on the autodiff backend `B` run its products as one step each.
pub fn register<B: OneStepExperts>() {
    super::store(B::expert_steps());
}

/// Forgets backend `B`'s steps (autodiff through the tensor ops again).
pub fn unregister<B: Backend>() {
    super::remove::<ExpertSteps<B>>();
}

/// The steps registered for backend `B`, if any.
pub fn registered<B: Backend>() -> Option<ExpertSteps<B>> {
    super::fetch::<ExpertSteps<B>>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::experts::{add_experts_ops, router_logits_ops};
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::Flex;

    type Ad = Autodiff<Flex>;

    /// Deterministic values in [-1, 1] of `shape`.
    fn wave<const D: usize>(shape: [usize; D], seed: usize) -> Tensor<Flex, D> {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|j| ((j * 7919 + seed * 104_729) % 2003) as f32 / 1001.5 - 1.0)
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    /// A 0/1 mask of `shape` (about a quarter zeros).
    fn mask(shape: [usize; 2], seed: usize) -> Tensor<Flex, 2> {
        wave(shape, seed).greater_elem(-0.5).float()
    }

    fn leaf<const D: usize>(t: &Tensor<Flex, D>) -> Tensor<Ad, D> {
        Tensor::from_inner(t.clone()).require_grad()
    }

    /// Largest difference relative to the largest magnitude of `want`.
    fn rel<const D: usize>(got: Tensor<Flex, D>, want: Tensor<Flex, D>) -> f32 {
        let scale = want.clone().abs().max().into_scalar().max(1e-12);
        (got - want).abs().max().into_scalar() / scale
    }

    /// The router step gives the tensor ops' logits and the same gradients for x and the
    /// router, with and without a dropout mask.
    #[test]
    fn router_step_matches_the_ops() {
        let (n, d_in, e) = (7, 5, 3);
        let (x, r, c) = (wave([n, d_in], 1), wave([e, d_in], 2), wave([n, e], 3));
        for m in [None, Some(mask([n, d_in], 4).mul_scalar(1.25))] {
            let run = |one_step: bool| {
                let (xa, ra) = (leaf(&x), leaf(&r));
                let ma = m.clone().map(Tensor::<Ad, 2>::from_inner);
                let logits = if one_step {
                    router_logits::<Flex, NoCheckpointing>(xa.clone(), ra.clone(), ma)
                } else {
                    router_logits_ops(xa.clone(), ra.clone(), ma)
                };
                let grads = (logits.clone() * Tensor::from_inner(c.clone()))
                    .sum()
                    .backward();
                let gx = xa.grad(&grads).unwrap();
                (logits.inner(), gx, ra.grad(&grads).unwrap())
            };
            let (want, got) = (run(false), run(true));
            let masked = m.is_some();
            assert!(rel(got.0, want.0) < 1e-6, "logits (mask {masked})");
            assert!(rel(got.1, want.1) < 1e-6, "dx (mask {masked})");
            assert!(rel(got.2, want.2) < 1e-6, "d router (mask {masked})");
        }
    }

    /// The experts' step gives the tensor ops' output and the same gradients for y, x, A, B
    /// and the gates, with and without a dropout mask, and with the gates of top-1 routing.
    #[test]
    fn expert_step_matches_the_ops() {
        let (n, d_in, d_out, e, r) = (7, 5, 4, 3, 2);
        let (y, x) = (wave([n, d_out], 5), wave([n, d_in], 6));
        let (a, b) = (wave([e, r, d_in], 7), wave([e, d_out, r], 8));
        let c = wave([n, d_out], 9);
        let dense_gate = wave([n, e], 10);
        let top1_gate = dense_gate.clone() * mask([n, e], 11);
        for (case, gate, m) in [
            ("dense", &dense_gate, None),
            ("masked", &dense_gate, Some(mask([n, d_in], 12))),
            ("top-1", &top1_gate, None),
        ] {
            let run = |one_step: bool| {
                let leaves = (leaf(&y), leaf(&x), leaf(&a), leaf(&b), leaf(gate));
                let inputs = ExpertInputs {
                    y: leaves.0.clone(),
                    x: leaves.1.clone(),
                    mask: m.clone().map(Tensor::from_inner),
                    a: leaves.2.clone(),
                    b: leaves.3.clone(),
                    gate: leaves.4.clone(),
                };
                let out = if one_step {
                    add_experts::<Flex, NoCheckpointing>(inputs)
                } else {
                    add_experts_ops(inputs)
                };
                let grads = (out.clone() * Tensor::from_inner(c.clone()))
                    .sum()
                    .backward();
                let g2 = |t: &Tensor<Ad, 2>| t.grad(&grads).unwrap();
                let g3 = |t: &Tensor<Ad, 3>| t.grad(&grads).unwrap();
                (
                    out.inner(),
                    [g2(&leaves.0), g2(&leaves.1), g2(&leaves.4)],
                    [g3(&leaves.2), g3(&leaves.3)],
                )
            };
            let (want, got) = (run(false), run(true));
            assert!(rel(got.0, want.0) < 1e-6, "{case}: output");
            for (name, (g, w)) in ["dy", "dx", "d gate"]
                .iter()
                .zip(got.1.into_iter().zip(want.1))
            {
                assert!(rel(g, w) < 1e-5, "{case}: {name}");
            }
            for (name, (g, w)) in ["dA", "dB"].iter().zip(got.2.into_iter().zip(want.2)) {
                assert!(rel(g, w) < 1e-5, "{case}: {name}");
            }
        }
    }
}
