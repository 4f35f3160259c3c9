//! A fused RMSNorm kernel for burn-cuda: one launch per norm instead of the ~10 element-wise
//! and reduction launches of the tensor-op version (`RmsNorm::forward`'s reference path).
//! Decoding one token runs 145 norms in the 4B text decoder (2 per layer plus the q/k norms,
//! and the final one), which made norms about half of a decode step's kernel launches.
//!
//! Like the NF4 kernels, it is found at run time: the binary [`register`]s the CubeCL
//! backends it runs on, and `RmsNorm` asks [`registered`]; where nothing is registered (the
//! CPU, autodiff backends, whose backward the tensor ops give) it runs `rms_norm_ops`.

use crate::model::layers::rms_norm_ops;
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim};

/// Rows normalised per cube (one warp each).
const ROWS_PER_CUBE: u32 = 8;
/// Threads per warp on NVIDIA GPUs.
const WARP: u32 = 32;

mod kernels {
    use cubecl::prelude::*;

    /// `out[r, j] = cast(x[r, j] · 1/sqrt(Σ_j x[r, j]² / d + eps)) · weight[j]`: one warp per
    /// row, the sum of squares in f32 (a warp sum), the weight product in F as HF does it.
    #[cube(launch)]
    pub fn rms_norm<F: Float>(
        x: &Tensor<F>,
        weight: &Tensor<F>,
        out: &mut Tensor<F>,
        d_f32: f32,
        eps: f32,
        #[define(F)] _dtype: StorageType,
    ) {
        let rows = x.shape(0);
        let d = x.shape(1);
        let row = CUBE_POS * (CUBE_DIM_Y as usize) + UNIT_POS_Y as usize;
        if row < rows {
            let x_row = row * x.stride(0);
            let out_row = row * out.stride(0);
            let mut sum = 0.0f32;
            let mut j = UNIT_POS_X as usize;
            while j < d {
                let v = f32::cast_from(x[x_row + j]);
                sum += v * v;
                j += CUBE_DIM_X as usize;
            }
            let inv = 1.0f32 / (plane_sum(sum) / d_f32 + eps).sqrt();
            let mut k = UNIT_POS_X as usize;
            while k < d {
                let normed = F::cast_from(f32::cast_from(x[x_row + k]) * inv);
                out[out_row + k] = normed * weight[k];
                k += CUBE_DIM_X as usize;
            }
        }
    }
}

/// RMSNorm of x [rows, d] with `weight` [d] (both in x's dtype).
fn rms_norm_cube<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    eps: f32,
) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let weight = into_contiguous(weight);
    assert_eq!(
        x.dtype, weight.dtype,
        "RMSNorm weight must be in the input's dtype"
    );
    let (rows, d) = (x.meta.shape()[0], x.meta.shape()[1]);
    let client = x.client.clone();
    let out = empty_device_dtype(
        client.clone(),
        x.device.clone(),
        Shape::new([rows, d]),
        x.dtype,
    );
    let cubes = rows.div_ceil(ROWS_PER_CUBE as usize) as u32;
    let dtype = x.dtype;
    kernels::rms_norm::launch::<R>(
        &client,
        CubeCount::Static(cubes, 1, 1),
        CubeDim::new_2d(WARP, ROWS_PER_CUBE),
        x.into_tensor_arg(),
        weight.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        d as f32,
        eps,
        dtype.into(),
    );
    out
}

/// The fused RMSNorm on a CubeCL backend: x [rows, d], weight [d] -> [rows, d] in x's dtype.
/// Dtypes other than f16, bf16 and f32 take the reference ops.
fn rms_norm<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<CubeBackend<R, F, I, BT>, 2>,
    weight: Tensor<CubeBackend<R, F, I, BT>, 1>,
    eps: f64,
) -> Tensor<CubeBackend<R, F, I, BT>, 2> {
    let dtype = x.dtype();
    if !matches!(dtype, DType::F16 | DType::BF16 | DType::F32) {
        return rms_norm_ops(x, weight, eps);
    }
    let x = x.into_primitive().tensor();
    let w = weight.cast(dtype).into_primitive().tensor();
    Tensor::from_primitive(TensorPrimitive::Float(rms_norm_cube(x, w, eps as f32)))
}

/// A backend's fused RMSNorm (what the registry holds): x [rows, d], weight [d], eps.
pub struct NormOps<B: Backend> {
    /// The fused RMSNorm.
    pub rms_norm: fn(Tensor<B, 2>, Tensor<B, 1>, f64) -> Tensor<B, 2>,
}

impl<B: Backend> Clone for NormOps<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for NormOps<B> {}

/// Makes `RmsNorm` on the CubeCL backend `CubeBackend<R, F, I, BT>` use the fused kernel.
pub fn register<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>() {
    register_ops(NormOps::<CubeBackend<R, F, I, BT>> {
        rms_norm: rms_norm::<R, F, I, BT>,
    });
}

/// Makes `RmsNorm` on backend `B` use `ops` (how tests route a CPU backend through the registry).
pub fn register_ops<B: Backend>(ops: NormOps<B>) {
    super::store(ops);
}

/// Forgets backend `B`'s fused RMSNorm (the tensor ops again).
pub fn unregister<B: Backend>() {
    super::remove::<NormOps<B>>();
}

/// The fused RMSNorm registered for backend `B`, if any.
pub fn registered<B: Backend>() -> Option<NormOps<B>> {
    super::fetch::<NormOps<B>>()
}

/// Relative error ‖kernel − reference‖ / ‖reference‖ of backend `B`'s registered RMSNorm
/// against the reference ops on the same device, for `dtype` inputs of each (rows, d) shape
/// (the decoder's hidden and head widths, odd row counts); `None` if nothing is registered.
pub fn check_against_reference<B: Backend>(
    dtype: DType,
    device: &B::Device,
) -> Option<Vec<(usize, usize, f64)>> {
    let ops = registered::<B>()?;
    let shapes = [(1, 2560), (7, 128), (33, 2560), (300, 1024), (5, 100)];
    let mut out = Vec::new();
    for (i, &(rows, d)) in shapes.iter().enumerate() {
        let wave = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|k| (((k * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 3.0)
                .collect()
        };
        let x = Tensor::<B, 2>::from_data(TensorData::new(wave(rows * d, i), [rows, d]), device)
            .cast(dtype);
        let w = Tensor::<B, 1>::from_data(TensorData::new(wave(d, i + 9), [d]), device);
        let got = (ops.rms_norm)(x.clone(), w.clone(), 1e-6).cast(DType::F32);
        let want = rms_norm_ops(x, w, 1e-6).cast(DType::F32);
        let diff = (got - want.clone())
            .square()
            .sum()
            .into_scalar()
            .elem::<f64>();
        let norm = want.square().sum().into_scalar().elem::<f64>();
        out.push((rows, d, (diff / norm).sqrt()));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::RmsNorm;
    use burn::backend::Flex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static CALLS: AtomicUsize = AtomicUsize::new(0);

    /// The tensor ops, counting calls: numerically what `RmsNorm` computes without a kernel.
    fn counted(x: Tensor<Flex, 2>, w: Tensor<Flex, 1>, eps: f64) -> Tensor<Flex, 2> {
        CALLS.fetch_add(1, Ordering::SeqCst);
        rms_norm_ops(x, w, eps)
    }

    /// `RmsNorm` sends a registered backend's input through its fused op as [rows, d] and
    /// restores the shape; the result equals the tensor ops.
    #[test]
    fn rms_norm_uses_the_registered_kernel_with_the_rows_flattened() {
        let dev = Default::default();
        let mut norm = RmsNorm::<Flex>::init(4, 1e-6, &dev);
        let w = Tensor::<Flex, 1>::from_data(TensorData::from([0.5f32, -1.0, 2.0, 1.5]), &dev);
        norm.weight = burn::module::Param::from_tensor(w.clone());
        let x = Tensor::<Flex, 3>::from_data(
            TensorData::new((0..24).map(|i| i as f32 * 0.37 - 4.0).collect(), [2, 3, 4]),
            &dev,
        );
        let want = rms_norm_ops(x.clone(), w, 1e-6);
        register_ops(NormOps::<Flex> { rms_norm: counted });
        let before = CALLS.load(Ordering::SeqCst);
        let got = norm.forward(x);
        let after = CALLS.load(Ordering::SeqCst);
        unregister::<Flex>();
        assert!(after > before, "the registered op was not called");
        assert_eq!(got.dims(), [2, 3, 4]);
        got.into_data().assert_eq(&want.into_data(), true);
    }
}
