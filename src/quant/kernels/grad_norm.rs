//! Σ‖g‖² over many gradients with one launch per gradient: each cube of one warp sums the
//! squares of a 4,096-element stretch and writes its sum to its own slot of one partial-sum
//! buffer; one sum of that buffer ends it. The tensor ops take three launches per gradient
//! (square, sum, add to the total), and the training step is bound by the host's cost per
//! launch: 756 MoE-LoRA gradients a step. The slots make the sum deterministic (no atomics).

use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, FloatDType, TensorMetadata, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim};

use super::layer_ops::{empty_like, wrap};

/// Elements per cube (and per partial sum).
const STRETCH: usize = 4096;
/// Threads per cube: one warp.
const WARP: u32 = 32;

mod kernels {
    use cubecl::prelude::*;

    /// Cube c of one warp: `partial[offset + c]` = Σ grad[i]² over i in [4096·c, 4096·(c+1))
    /// ∩ [0, n), read in buffer order (any dense layout).
    #[cube(launch)]
    pub fn sq_sum_stretch(grad: &Tensor<f32>, partial: &mut Tensor<f32>, n: u32, offset: u32) {
        let lane = UNIT_POS as usize;
        let start = CUBE_POS * 4096usize;
        let mut end = start + 4096usize;
        if end > n as usize {
            end = n as usize;
        }
        let mut sum = 0.0f32;
        let mut i = start + lane;
        while i < end {
            let v = grad[i];
            sum += v * v;
            i += 32usize;
        }
        let total = plane_sum(sum);
        if lane == 0 {
            partial[offset as usize + CUBE_POS] = total;
        }
    }
}

/// Σ‖g‖² of float gradients (any rank) on a backend without autodiff, as a [1] f32 tensor
/// (None without gradients).
pub type SqSumFn<B> = fn(Vec<FloatTensor<B>>) -> Option<Tensor<B, 1>>;

/// A backend's sum-of-squares kernel (what the kernel registry holds).
pub struct GradNormKernel<B: Backend> {
    /// Σ‖g‖² of the gradients.
    pub sq_sum: SqSumFn<B>,
}

impl<B: Backend> Clone for GradNormKernel<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for GradNormKernel<B> {}

/// Whether `t`'s elements fill its buffer exactly once (contiguous or permuted), so that
/// reading the buffer in order visits each element once.
fn dense<R: CubeRuntime>(t: &CubeTensor<R>) -> bool {
    t.is_contiguous() || (t.is_nonoverlapping() && t.is_contiguous_buffer())
}

/// [`SqSumFn`] with [`kernels::sq_sum_stretch`]: one launch per gradient, then one sum.
fn sq_sum_cube<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    grads: Vec<CubeTensor<R>>,
) -> Option<Tensor<CubeBackend<R, F, I, BT>, 1>> {
    let grads: Vec<CubeTensor<R>> = grads
        .into_iter()
        .filter(|g| g.meta.shape().num_elements() > 0)
        .map(|g| {
            let g = match g.dtype {
                DType::F32 => g,
                _ => CubeBackend::<R, F, I, BT>::float_cast(g, FloatDType::F32),
            };
            if dense(&g) {
                g
            } else {
                into_contiguous(g)
            }
        })
        .collect();
    let cubes: Vec<usize> = grads
        .iter()
        .map(|g| g.meta.shape().num_elements().div_ceil(STRETCH))
        .collect();
    let partial = empty_like(grads.first()?, vec![cubes.iter().sum()]);
    let mut offset = 0;
    for (g, &count) in grads.into_iter().zip(&cubes) {
        let n = g.meta.shape().num_elements();
        kernels::sq_sum_stretch::launch::<R>(
            &g.client.clone(),
            CubeCount::Static(count as u32, 1, 1),
            CubeDim::new_1d(WARP),
            g.into_tensor_arg(),
            partial.clone().into_tensor_arg(),
            n as u32,
            offset as u32,
        );
        offset += count;
    }
    Some(wrap::<R, F, I, BT, 1>(partial).sum())
}

/// [`SqSumFn`] with tensor ops: square, sum and add per gradient (the reference).
pub fn sq_sum_ops<B: Backend>(grads: Vec<FloatTensor<B>>) -> Option<Tensor<B, 1>> {
    grads
        .into_iter()
        .map(|g| {
            let n = g.shape().num_elements();
            let flat = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::float_reshape(
                g,
                Shape::new([n]),
            )));
            flat.cast(DType::F32).powi_scalar(2).sum()
        })
        .reduce(|a, b| a + b)
}

/// Makes the gradient norm of `CubeBackend<R, F, I, BT>` use the kernel.
pub fn register_kernel<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>() {
    register_kernel_fn(GradNormKernel::<CubeBackend<R, F, I, BT>> {
        sq_sum: sq_sum_cube::<R, F, I, BT>,
    });
}

/// Makes the gradient norm on backend `B` use `kernel`.
pub fn register_kernel_fn<B: Backend>(kernel: GradNormKernel<B>) {
    super::store(kernel);
}

/// Forgets backend `B`'s kernel.
pub fn unregister<B: Backend>() {
    super::remove::<GradNormKernel<B>>();
}

/// The sum-of-squares kernel registered for backend `B`, if any.
pub fn registered<B: Backend>() -> Option<GradNormKernel<B>> {
    super::fetch::<GradNormKernel<B>>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// The reference sums the squares of gradients of any rank and layout; no gradients give
    /// None.
    #[test]
    fn sq_sum_ops_sums_every_gradients_squares() {
        let dev = Default::default();
        let a = Tensor::<Flex, 2>::from_data([[1.0f32, -2.0], [3.0, 0.5]], &dev);
        let b = Tensor::<Flex, 3>::from_data([[[1.0f32, 2.0, -1.0]], [[0.0, 4.0, 1.0]]], &dev)
            .swap_dims(1, 2);
        let grads = vec![a.into_primitive().tensor(), b.into_primitive().tensor()];
        let got = sq_sum_ops::<Flex>(grads).unwrap().into_scalar();
        assert_eq!(got, 1.0 + 4.0 + 9.0 + 0.25 + 1.0 + 4.0 + 1.0 + 16.0 + 1.0);
        assert!(sq_sum_ops::<Flex>(Vec::new()).is_none());
    }
}
