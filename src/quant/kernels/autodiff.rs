//! [`Nf4Backend`] under burn's autodiff: the product's backward keeps only the packed layer and
//! computes dX = dY·W from it ([`Nf4Backend::nf4_matmul_transposed`]; the weight is frozen: no
//! weight gradient).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

use super::{Nf4Backend, Nf4Parts};

/// What burn's `Autodiff<B>` needs of `B` to be an autodiff backend: any backend, or with the
/// `ddp` feature (burn's `distributed`) a distributed one.
#[cfg(not(feature = "ddp"))]
pub trait AutodiffInner: Backend {}
#[cfg(not(feature = "ddp"))]
impl<B: Backend> AutodiffInner for B {}
/// What burn's `Autodiff<B>` needs of `B` to be an autodiff backend: any backend, or with the
/// `ddp` feature (burn's `distributed`) a distributed one.
#[cfg(feature = "ddp")]
pub trait AutodiffInner: burn::tensor::backend::distributed::DistributedBackend {}
#[cfg(feature = "ddp")]
impl<B: burn::tensor::backend::distributed::DistributedBackend> AutodiffInner for B {}

/// The primitive of a float tensor (the autodiff steps' inner tensors and gradients).
pub(super) fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> B::FloatTensorPrimitive {
    t.into_primitive().tensor()
}

/// A float tensor of a primitive (a gradient the autodiff steps receive).
pub(super) fn tensor<B: Backend, const D: usize>(p: B::FloatTensorPrimitive) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// Backward of `x · Wᵀ` with W NF4: dX = dY · W from the packed state.
#[derive(Debug)]
struct Nf4MatmulBackward;

impl<B: Nf4Backend> Backward<B, 1> for Nf4MatmulBackward {
    type State = Nf4Parts<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node); // dY [M, out]
        if let Some(node) = node_x {
            let w = ops.state;
            let dy =
                Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad)).cast(w.meta.compute);
            let dx = B::nf4_matmul_transposed(dy, &w); // [M, in]
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
    }
}

impl<B: Nf4Backend + AutodiffInner, C: CheckpointStrategy> Nf4Backend for Autodiff<B, C> {
    fn nf4_dequantize(w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        Tensor::from_inner(B::nf4_dequantize(&w.inner()))
    }

    fn nf4_gemv(x: Tensor<Self, 2>, w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        Self::nf4_matmul(x, w)
    }

    fn nf4_matmul(x: Tensor<Self, 2>, w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        let inner = w.inner();
        let x = x.into_primitive().tensor();
        let forward = |x, w: &Nf4Parts<B>| {
            B::nf4_matmul(Tensor::from_primitive(TensorPrimitive::Float(x)), w)
                .into_primitive()
                .tensor()
        };
        let out = match Nf4MatmulBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = forward(x.primitive, &inner);
                prep.finish(inner, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, &inner)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}
