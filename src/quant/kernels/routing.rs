//! MoE-LoRA routing as one autodiff step: the forward runs on the inner backend (no graph of
//! ~15 recorded ops: softmax, k argmax rounds, masks, products) and the backward is the closed
//! form of `adapter::routing::route_backward` — a handful of ops instead of the ops' recorded
//! backward, and with gradient checkpointing the routing is kept, not recomputed.
//!
//! The inner forward and backward are a [`RouteKernels`] table: tensor ops by default, or two
//! CubeCL kernels on burn-cuda (one thread per token row: softmax, top-k, gates; and the
//! closed-form backward) when registered ([`register_kernels`]).
//!
//! Found at run time like the other kernels: the binary [`register`]s its autodiff backends and
//! `MoeLoraLinear` asks [`registered`]; elsewhere `route_ops` runs (autodiff through the ops).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim};

use super::autodiff::AutodiffInner;
use super::layer_ops::{empty_like, prim, wrap};
use crate::adapter::routing::{route_backward, route_ops, RouteOptions, Routing};

/// Token rows per cube of the routing kernels (one thread each).
const ROWS_PER_CUBE: u32 = 128;

mod kernels {
    use cubecl::prelude::*;

    /// One thread per token row of `logits` [N, E] (f32): `packed` [N, 2E] = [gate | probs],
    /// `mask` [N, E] = the row's `top_k` < E largest probabilities (the first on ties, as
    /// argmax); gate = scaling · p · m, divided by Σ p·m when `renormalize` = 1. (Dense routing,
    /// top_k >= E, takes the tensor ops: a dense branch here failed its GPU check.)
    #[cube(launch)]
    pub fn route_forward(
        logits: &Tensor<f32>,
        packed: &mut Tensor<f32>,
        mask: &mut Tensor<f32>,
        top_k: u32,
        renormalize: u32,
        scaling: f32,
    ) {
        let (n, e) = (logits.shape(0), logits.shape(1));
        let row = ABSOLUTE_POS;
        if row < n {
            let (l, pk, mk) = (
                row * logits.stride(0),
                row * packed.stride(0),
                row * mask.stride(0),
            );
            let mut top = f32::new(-3.0e38);
            let mut j = 0;
            while j < e {
                let v = logits[l + j];
                if v > top {
                    top = v;
                }
                j += 1;
            }
            let mut sum = 0.0f32;
            let mut j = 0;
            while j < e {
                sum += (logits[l + j] - top).exp();
                j += 1;
            }
            let mut j = 0;
            while j < e {
                packed[pk + e + j] = (logits[l + j] - top).exp() / sum;
                mask[mk + j] = 0.0f32;
                j += 1;
            }
            let mut round = 0u32;
            while round < top_k {
                let mut best = 0;
                let mut best_p = f32::new(-1.0);
                let mut j = 0;
                while j < e {
                    let p = packed[pk + e + j];
                    if mask[mk + j] == 0.0f32 && p > best_p {
                        best_p = p;
                        best = j;
                    }
                    j += 1;
                }
                mask[mk + best] = 1.0f32;
                round += 1;
            }
            let mut kept = 0.0f32;
            let mut j = 0;
            while j < e {
                kept += packed[pk + e + j] * mask[mk + j];
                j += 1;
            }
            let mut norm = scaling;
            if renormalize == 1 {
                norm = scaling / kept;
            }
            let mut j = 0;
            while j < e {
                packed[pk + j] = packed[pk + e + j] * mask[mk + j] * norm;
                j += 1;
            }
        }
    }

    /// One thread per token row: d logits [N, E] from the forward's `packed` [gate | probs],
    /// `mask` and `grad` [N, 2E] (the gradients of gate and probs), the closed form of
    /// `adapter::routing::route_backward`, for top_k < E.
    #[cube(launch)]
    pub fn route_backward(
        packed: &Tensor<f32>,
        mask: &Tensor<f32>,
        grad: &Tensor<f32>,
        out: &mut Tensor<f32>,
        renormalize: u32,
        scaling: f32,
    ) {
        let (n, e) = (mask.shape(0), mask.shape(1));
        let row = ABSOLUTE_POS;
        if row < n {
            let (pk, mk) = (row * packed.stride(0), row * mask.stride(0));
            let (gk, ok) = (row * grad.stride(0), row * out.stride(0));
            let mut through_sum = 0.0f32;
            let mut kept = 0.0f32;
            let mut j = 0;
            while j < e {
                through_sum += grad[gk + j] * packed[pk + j];
                kept += packed[pk + e + j] * mask[mk + j];
                j += 1;
            }
            let renorm = renormalize == 1;
            // dp_j = da_j · m_j + q_j, da_j = s·g_j (renormalised: (s·g_j − Σ g·gate) / Σ p·m)
            // dp goes to `out` first, then out = p · (dp − Σ p·dp).
            let mut p_dp = 0.0f32;
            let mut j = 0;
            while j < e {
                let mut da = scaling * grad[gk + j];
                if renorm {
                    da = (da - through_sum) / kept;
                }
                let dp = da * mask[mk + j] + grad[gk + e + j];
                out[ok + j] = dp;
                p_dp += packed[pk + e + j] * dp;
                j += 1;
            }
            let mut j = 0;
            while j < e {
                out[ok + j] = packed[pk + e + j] * (out[ok + j] - p_dp);
                j += 1;
            }
        }
    }
}

/// [gate | probs] [N, 2E] and the mask [N, E] (ones when dense).
pub type PackedAndMask<B> = (Tensor<B, 2>, Tensor<B, 2>);
/// Routing forward on a (non-autodiff) backend: logits [N, E] (f32) -> [`PackedAndMask`].
pub type RouteForwardFn<B> = fn(Tensor<B, 2>, RouteOptions) -> PackedAndMask<B>;
/// Routing backward: (packed [N, 2E], mask [N, E], grad [N, 2E], options) -> d logits [N, E].
pub type RouteBackwardFn<B> =
    fn(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>, RouteOptions) -> Tensor<B, 2>;

/// The routing step's forward and backward on a backend (what the kernel registry holds).
pub struct RouteKernels<B: Backend> {
    /// Forward.
    pub forward: RouteForwardFn<B>,
    /// Backward.
    pub backward: RouteBackwardFn<B>,
}

impl<B: Backend> Clone for RouteKernels<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for RouteKernels<B> {}

impl<B: Backend> RouteKernels<B> {
    /// The tensor-op versions.
    pub fn reference() -> Self {
        Self {
            forward: forward_ops::<B>,
            backward: backward_ops::<B>,
        }
    }
}

/// [`RouteForwardFn`] with tensor ops.
fn forward_ops<B: Backend>(logits: Tensor<B, 2>, o: RouteOptions) -> PackedAndMask<B> {
    let r = route_ops(logits, o);
    let mask = r.mask.unwrap_or_else(|| r.probs.ones_like());
    (Tensor::cat(vec![r.gate, r.probs], 1), mask)
}

/// [`RouteBackwardFn`] with tensor ops.
fn backward_ops<B: Backend>(
    packed: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    grad: Tensor<B, 2>,
    o: RouteOptions,
) -> Tensor<B, 2> {
    let e = mask.dims()[1];
    let (gate, probs) = (packed.clone().narrow(1, 0, e), packed.narrow(1, e, e));
    let (g, q) = (grad.clone().narrow(1, 0, e), grad.narrow(1, e, e));
    route_backward(probs, mask, gate, g, q, o)
}

/// Cubes covering `rows` token rows, one thread each.
fn row_cubes(rows: usize) -> (CubeCount, CubeDim) {
    (
        CubeCount::Static(rows.div_ceil(ROWS_PER_CUBE as usize).max(1) as u32, 1, 1),
        CubeDim::new_1d(ROWS_PER_CUBE),
    )
}

/// [`RouteForwardFn`] as one CubeCL kernel (f32 logits and top_k < E; other dtypes and dense
/// routing take the tensor ops).
fn forward_cube<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    logits: Tensor<CubeBackend<R, F, I, BT>, 2>,
    o: RouteOptions,
) -> PackedAndMask<CubeBackend<R, F, I, BT>> {
    let [n, e] = logits.dims();
    if logits.dtype() != DType::F32 || o.top_k >= e {
        return forward_ops(logits, o);
    }
    let l = into_contiguous(prim(logits));
    let packed = empty_like(&l, vec![n, 2 * e]);
    let mask = empty_like(&l, vec![n, e]);
    let (count, dim) = row_cubes(n);
    kernels::route_forward::launch::<R>(
        &l.client.clone(),
        count,
        dim,
        l.into_tensor_arg(),
        packed.clone().into_tensor_arg(),
        mask.clone().into_tensor_arg(),
        o.top_k as u32,
        o.renormalize as u32,
        o.scaling as f32,
    );
    (wrap(packed), wrap(mask))
}

/// [`RouteBackwardFn`] as one CubeCL kernel (f32 and top_k < E; otherwise the tensor ops).
fn backward_cube<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    packed: Tensor<CubeBackend<R, F, I, BT>, 2>,
    mask: Tensor<CubeBackend<R, F, I, BT>, 2>,
    grad: Tensor<CubeBackend<R, F, I, BT>, 2>,
    o: RouteOptions,
) -> Tensor<CubeBackend<R, F, I, BT>, 2> {
    let [n, e] = mask.dims();
    if [packed.dtype(), mask.dtype(), grad.dtype()] != [DType::F32; 3] || o.top_k >= e {
        return backward_ops(packed, mask, grad, o);
    }
    let (p, m, g) = (
        into_contiguous(prim(packed)),
        into_contiguous(prim(mask)),
        into_contiguous(prim(grad)),
    );
    let out = empty_like(&m, vec![n, e]);
    let (count, dim) = row_cubes(n);
    kernels::route_backward::launch::<R>(
        &m.client.clone(),
        count,
        dim,
        p.into_tensor_arg(),
        m.into_tensor_arg(),
        g.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        o.renormalize as u32,
        o.scaling as f32,
    );
    wrap(out)
}

/// Makes the routing step on `Autodiff<CubeBackend<R, F, I, BT>>` run the CubeCL kernels.
pub fn register_kernels<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>() {
    register_kernel_ops(RouteKernels::<CubeBackend<R, F, I, BT>> {
        forward: forward_cube::<R, F, I, BT>,
        backward: backward_cube::<R, F, I, BT>,
    });
}

/// Makes the routing step on `Autodiff<B>` use `kernels` (how tests route a CPU backend through
/// the registry).
pub fn register_kernel_ops<B: Backend>(kernels: RouteKernels<B>) {
    super::store(kernels);
}

/// Forgets backend `B`'s routing kernels (tensor ops again).
pub fn unregister_kernels<B: Backend>() {
    super::remove::<RouteKernels<B>>();
}

/// The routing kernels registered for the (non-autodiff) backend `B`, if any.
pub fn registered_kernels<B: Backend>() -> Option<RouteKernels<B>> {
    super::fetch::<RouteKernels<B>>()
}

/// Routes `logits` [N, E] (f32) on a backend without autodiff (the graph-free forward of layer
/// recomputation): backend `B`'s registered kernels when it has them (one launch instead of
/// ~15), else the tensor ops.
pub fn route_plain<B: Backend>(logits: Tensor<B, 2>, o: RouteOptions) -> Routing<B> {
    let Some(kernels) = registered_kernels::<B>() else {
        return route_ops(logits, o);
    };
    let (packed, mask) = (kernels.forward)(logits, o); // [N, 2E], [N, E]
    unpack(packed, mask, o)
}

/// The [`Routing`] held by the routing step's output `packed` [N, 2E] = [gate | probs] and
/// `mask` [N, E] (kept only when top_k < E).
fn unpack<B: Backend>(packed: Tensor<B, 2>, mask: Tensor<B, 2>, o: RouteOptions) -> Routing<B> {
    let e = mask.dims()[1];
    Routing {
        gate: packed.clone().narrow(1, 0, e),
        probs: packed.narrow(1, e, e),
        mask: (o.top_k < e).then_some(mask),
    }
}

/// The forward's tensors the backward needs (inner backend): [gate | probs] [N, 2E] and the
/// mask [N, E] (ones when dense).
#[derive(Debug, Clone)]
struct RouteState<B: Backend> {
    packed: Tensor<B, 2>,
    mask: Tensor<B, 2>,
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
            let kernels = registered_kernels::<B>().unwrap_or_else(RouteKernels::reference);
            let dl = (kernels.backward)(s.packed, s.mask, grad, s.options);
            grads.register::<B>(node.id, dl.into_primitive().tensor());
        }
    }
}

/// Routes `logits` [N, E] as one autodiff step (see the module doc).
fn route<B: AutodiffInner, C: CheckpointStrategy>(
    logits: Tensor<Autodiff<B, C>, 2>,
    o: RouteOptions,
) -> Routing<Autodiff<B, C>> {
    let kernels = registered_kernels::<B>().unwrap_or_else(RouteKernels::reference);
    let (packed, mask) = (kernels.forward)(logits.clone().inner(), o); // [N, 2E], [N, E]
    let logits = logits.into_primitive().tensor();
    let out = match RouteBackward
        .prepare::<C>([logits.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = RouteState {
                packed: packed.clone(),
                mask: mask.clone(),
                options: o,
            };
            prep.finish(state, packed.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => prep.finish(packed.into_primitive().tensor()),
    };
    let out = Tensor::<Autodiff<B, C>, 2>::from_primitive(TensorPrimitive::Float(out));
    unpack(out, Tensor::from_inner(mask), o)
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
        RoutingOps {
            route: route::<B, C>,
        }
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
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

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
                (
                    r.gate.inner(),
                    r.probs.inner(),
                    r.mask.map(|m| m.inner()),
                    grad,
                )
            };
            let (want, got) = (run(false), run(true));
            got.0
                .into_data()
                .assert_approx_eq::<f32>(&want.0.into_data(), Default::default());
            got.1
                .into_data()
                .assert_approx_eq::<f32>(&want.1.into_data(), Default::default());
            assert_eq!(got.2.is_some(), want.2.is_some(), "case {i}: mask presence");
            if let (Some(a), Some(b)) = (got.2, want.2) {
                a.into_data().assert_eq(&b.into_data(), true);
            }
            let err = (got.3 - want.3.clone()).abs().max().into_scalar()
                / want.3.abs().max().into_scalar();
            assert!(err < 1e-5, "case {i}: gradient relative error {err:e}");
        }
    }

    static FORWARDS: AtomicUsize = AtomicUsize::new(0);
    /// Held by the tests that register Flex's routing kernels (the registry is process-wide).
    static REGISTRY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    static BACKWARDS: AtomicUsize = AtomicUsize::new(0);

    fn counted_forward(logits: Tensor<Flex, 2>, o: RouteOptions) -> PackedAndMask<Flex> {
        FORWARDS.fetch_add(1, SeqCst);
        (RouteKernels::<Flex>::reference().forward)(logits, o)
    }

    fn counted_backward(
        packed: Tensor<Flex, 2>,
        mask: Tensor<Flex, 2>,
        grad: Tensor<Flex, 2>,
        o: RouteOptions,
    ) -> Tensor<Flex, 2> {
        BACKWARDS.fetch_add(1, SeqCst);
        (RouteKernels::<Flex>::reference().backward)(packed, mask, grad, o)
    }

    /// Without autodiff, routing takes the backend's registered forward when there is one, and
    /// gives the tensor ops' gates, probabilities and choices (a mask only when top_k < E).
    #[test]
    fn plain_routing_uses_registered_kernels() {
        let logits = Tensor::<Flex, 2>::from_data(
            TensorData::from([[0.5f32, -1.0, 0.2], [2.0, 0.25, -0.5], [-0.3, 0.1, 0.0]]),
            &Default::default(),
        );
        let _registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        register_kernel_ops(RouteKernels::<Flex> {
            forward: counted_forward,
            backward: counted_backward,
        });
        for (k, renormalize) in [(1, false), (2, true), (3, false)] {
            let o = RouteOptions {
                top_k: k,
                renormalize,
                scaling: 2.0,
            };
            let f0 = FORWARDS.load(SeqCst);
            let got = route_plain(logits.clone(), o);
            assert!(
                FORWARDS.load(SeqCst) > f0,
                "top-{k}: registered forward not called"
            );
            let want = route_ops(logits.clone(), o);
            got.gate
                .into_data()
                .assert_approx_eq::<f32>(&want.gate.into_data(), Default::default());
            got.probs
                .into_data()
                .assert_approx_eq::<f32>(&want.probs.into_data(), Default::default());
            assert_eq!(got.mask.is_some(), want.mask.is_some(), "top-{k}: mask");
            if let (Some(a), Some(b)) = (got.mask, want.mask) {
                a.into_data().assert_eq(&b.into_data(), true);
            }
        }
        unregister_kernels::<Flex>();
    }

    /// The routing step runs the inner backend's registered forward and backward.
    #[test]
    fn one_step_routing_uses_registered_kernels() {
        let o = RouteOptions {
            top_k: 1,
            renormalize: false,
            scaling: 2.0,
        };
        let logits = Tensor::<Flex, 2>::from_data(
            TensorData::from([[0.5f32, -1.0], [2.0, 0.25], [-0.3, 0.1]]),
            &Default::default(),
        );
        let _registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        register_kernel_ops(RouteKernels::<Flex> {
            forward: counted_forward,
            backward: counted_backward,
        });
        let (f0, b0) = (FORWARDS.load(SeqCst), BACKWARDS.load(SeqCst));
        let l = Tensor::<Ad, 2>::from_inner(logits).require_grad();
        let r = route::<Flex, NoCheckpointing>(l.clone(), o);
        let grad = l.grad(&(r.gate.sum() + r.probs.sum()).backward());
        unregister_kernels::<Flex>();
        assert!(grad.is_some());
        assert!(
            FORWARDS.load(SeqCst) > f0,
            "the registered forward was not called"
        );
        assert!(
            BACKWARDS.load(SeqCst) > b0,
            "the registered backward was not called"
        );
    }
}
