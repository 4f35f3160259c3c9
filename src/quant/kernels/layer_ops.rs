//! Fused kernels for the decoder's element-wise steps on burn-cuda: one launch each instead of
//! the 5–10 element-wise and reduction launches of the tensor-op versions.
//!
//! * `rms_norm`: RMSNorm of each row (the input, post-attention and final norms).
//! * `add_rms_norm`: a residual add and the RMSNorm of its sum, both written (the norms that
//!   follow a residual add: post-attention, and the next layer's input norm).
//! * `rms_norm_rotary`: a head's q/k RMSNorm followed by its M-RoPE rotation, read through the
//!   strides of the [B, heads, T, d] view (no copy of the projection's output).
//! * `softmax_scaled`: `softmax(scale · scores)` with f32 statistics, back in the input dtype
//!   (attention without a mask: every decode step).
//! * `swiglu`: `silu(gate) · up` (the MLP).
//!
//! A decode step of the launch-bound 4B decoder ran ~40 launches per layer; these take ~15 of
//! them. Like the NF4 kernels they are found at run time: the binary [`register`]s the CubeCL
//! backends it runs on and the layers ask [`registered`]; where nothing is registered (the CPU,
//! autodiff backends, whose backward the tensor ops give) the layers run the tensor ops. The
//! products keep the input dtype's rounding where HF rounds (the normalised value before the
//! weight, each rotary product, silu before the product with `up`).

use crate::model::attention::softmax_scaled_ops;
use crate::model::layers::{add_rms_norm_ops, rms_norm_ops};
use crate::model::rotary::rms_norm_rotary_ops;
use crate::model::text::swiglu_ops;
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim};

/// Rows per cube for the row kernels (one warp each).
const ROWS_PER_CUBE: u32 = 8;
/// Threads per warp on NVIDIA GPUs.
const WARP: u32 = 32;
/// Threads per cube of the element-wise kernel.
pub(super) const ELEMENTWISE_CUBE: u32 = 256;

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

    /// `sum[r, j] = x[r, j] + delta[r, j]` (rounded to F, as the residual add is) and
    /// `out[r, :]` = the RMSNorm of that sum as [`rms_norm`]: one warp per row. Each lane reads
    /// back only the sums it wrote itself.
    #[cube(launch)]
    pub fn add_rms_norm<F: Float>(
        x: &Tensor<F>,
        delta: &Tensor<F>,
        weight: &Tensor<F>,
        sum: &mut Tensor<F>,
        out: &mut Tensor<F>,
        d_f32: f32,
        eps: f32,
        #[define(F)] _dtype: StorageType,
    ) {
        let rows = x.shape(0);
        let d = x.shape(1);
        let row = CUBE_POS * (CUBE_DIM_Y as usize) + UNIT_POS_Y as usize;
        if row < rows {
            let (x_row, delta_row) = (row * x.stride(0), row * delta.stride(0));
            let (sum_row, out_row) = (row * sum.stride(0), row * out.stride(0));
            let mut squares = 0.0f32;
            let mut j = UNIT_POS_X as usize;
            while j < d {
                let s = x[x_row + j] + delta[delta_row + j];
                sum[sum_row + j] = s;
                let v = f32::cast_from(s);
                squares += v * v;
                j += CUBE_DIM_X as usize;
            }
            let inv = 1.0f32 / (plane_sum(squares) / d_f32 + eps).sqrt();
            let mut k = UNIT_POS_X as usize;
            while k < d {
                let normed = F::cast_from(f32::cast_from(sum[sum_row + k]) * inv);
                out[out_row + k] = normed * weight[k];
                k += CUBE_DIM_X as usize;
            }
        }
    }

    /// Per head row of x [B, H, T, d] (any strides): RMSNorm as [`rms_norm`], then
    /// `n·cos + rotate_half(n)·sin` with cos/sin [B, 1, T, d]; out [B, H, T, d] contiguous.
    /// Each thread owns the pairs (j, j + d/2), so the rotation needs no exchange.
    #[cube(launch)]
    pub fn rms_norm_rotary<F: Float>(
        x: &Tensor<F>,
        weight: &Tensor<F>,
        cos: &Tensor<F>,
        sin: &Tensor<F>,
        out: &mut Tensor<F>,
        d_f32: f32,
        eps: f32,
        #[define(F)] _dtype: StorageType,
    ) {
        let (heads, len, d) = (x.shape(1), x.shape(2), x.shape(3));
        let rows = x.shape(0) * heads * len;
        let row = CUBE_POS * (CUBE_DIM_Y as usize) + UNIT_POS_Y as usize;
        if row < rows {
            let (b, h, t) = (row / (heads * len), (row / len) % heads, row % len);
            let x_row = b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
            let xs = x.stride(3);
            let cs_row = b * cos.stride(0) + t * cos.stride(2);
            let (cs, ss) = (cos.stride(3), sin.stride(3));
            let ss_row = b * sin.stride(0) + t * sin.stride(2);
            let out_row = b * out.stride(0) + h * out.stride(1) + t * out.stride(2);
            let os = out.stride(3);
            let half = d / 2;
            let mut sum = 0.0f32;
            let mut j = UNIT_POS_X as usize;
            while j < d {
                let v = f32::cast_from(x[x_row + j * xs]);
                sum += v * v;
                j += CUBE_DIM_X as usize;
            }
            let inv = 1.0f32 / (plane_sum(sum) / d_f32 + eps).sqrt();
            let mut k = UNIT_POS_X as usize;
            while k < half {
                let k2 = k + half;
                let n1 = F::cast_from(f32::cast_from(x[x_row + k * xs]) * inv) * weight[k];
                let n2 = F::cast_from(f32::cast_from(x[x_row + k2 * xs]) * inv) * weight[k2];
                out[out_row + k * os] = n1 * cos[cs_row + k * cs] - n2 * sin[ss_row + k * ss];
                out[out_row + k2 * os] = n2 * cos[cs_row + k2 * cs] + n1 * sin[ss_row + k2 * ss];
                k += CUBE_DIM_X as usize;
            }
        }
    }

    /// `out[r, :] = cast(softmax(scale · f32(x[r, :])))`: one warp per row (max, then the sum
    /// of exponentials, both warp reductions in f32).
    #[cube(launch)]
    pub fn softmax_scaled<F: Float>(
        x: &Tensor<F>,
        out: &mut Tensor<F>,
        scale: f32,
        #[define(F)] _dtype: StorageType,
    ) {
        let rows = x.shape(0);
        let s = x.shape(1);
        let row = CUBE_POS * (CUBE_DIM_Y as usize) + UNIT_POS_Y as usize;
        if row < rows {
            let x_row = row * x.stride(0);
            let out_row = row * out.stride(0);
            let mut lane_max = f32::new(-3.0e38);
            let mut j = UNIT_POS_X as usize;
            while j < s {
                let v = f32::cast_from(x[x_row + j]) * scale;
                if v > lane_max {
                    lane_max = v;
                }
                j += CUBE_DIM_X as usize;
            }
            let m = plane_max(lane_max);
            let mut sum = 0.0f32;
            let mut k = UNIT_POS_X as usize;
            while k < s {
                let e = f32::cast_from(x[x_row + k]) * scale - m;
                sum += e.exp();
                k += CUBE_DIM_X as usize;
            }
            let inv = 1.0f32 / plane_sum(sum);
            let mut i = UNIT_POS_X as usize;
            while i < s {
                let p = (f32::cast_from(x[x_row + i]) * scale - m).exp() * inv;
                out[out_row + i] = F::cast_from(p);
                i += CUBE_DIM_X as usize;
            }
        }
    }

    /// `out[r, c] = cast(silu(f32(gate[r, c]))) · up[r, c]`, one thread per element, each
    /// tensor read through its own strides (rows may be padded for alignment).
    #[cube(launch)]
    pub fn swiglu<F: Float>(
        gate: &Tensor<F>,
        up: &Tensor<F>,
        out: &mut Tensor<F>,
        #[define(F)] _dtype: StorageType,
    ) {
        let cols = gate.shape(1);
        let i = ABSOLUTE_POS;
        if i < gate.shape(0) * cols {
            let (r, c) = (i / cols, i % cols);
            let g = f32::cast_from(gate[r * gate.stride(0) + c * gate.stride(1)]);
            let act = F::cast_from(g / (1.0f32 + (-g).exp()));
            out[r * out.stride(0) + c * out.stride(1)] =
                act * up[r * up.stride(0) + c * up.stride(1)];
        }
    }
}

/// An output of `shape` in `like`'s dtype on its device (CubeCL may pad its rows: kernels write
/// through its strides).
pub(super) fn empty_like<R: CubeRuntime>(like: &CubeTensor<R>, shape: Vec<usize>) -> CubeTensor<R> {
    empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        like.dtype,
    )
}

/// Cubes of [`ROWS_PER_CUBE`] warps covering `rows` rows.
pub(super) fn row_cubes(rows: usize) -> (CubeCount, CubeDim) {
    (
        CubeCount::Static(rows.div_ceil(ROWS_PER_CUBE as usize) as u32, 1, 1),
        CubeDim::new_2d(WARP, ROWS_PER_CUBE),
    )
}

/// Whether the kernels take `dtype` (others take the tensor ops).
pub(super) fn supported(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32)
}

/// The primitive of a float tensor on a CubeCL backend.
pub(super) fn prim<
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
    const D: usize,
>(
    t: Tensor<CubeBackend<R, F, I, BT>, D>,
) -> CubeTensor<R> {
    t.into_primitive().tensor()
}

/// Wraps a kernel output as a tensor.
pub(super) fn wrap<
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
    const D: usize,
>(
    t: CubeTensor<R>,
) -> Tensor<CubeBackend<R, F, I, BT>, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Fused RMSNorm: x [rows, d], weight [d] -> [rows, d] in x's dtype.
fn rms_norm<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<CubeBackend<R, F, I, BT>, 2>,
    weight: Tensor<CubeBackend<R, F, I, BT>, 1>,
    eps: f64,
) -> Tensor<CubeBackend<R, F, I, BT>, 2> {
    let dtype = x.dtype();
    if !supported(dtype) {
        return rms_norm_ops(x, weight, eps);
    }
    let [rows, d] = x.dims();
    let x = into_contiguous(prim(x));
    let w = into_contiguous(prim(weight.cast(dtype)));
    let out = empty_like(&x, vec![rows, d]);
    let (count, dim) = row_cubes(rows);
    kernels::rms_norm::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        w.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        d as f32,
        eps as f32,
        dtype.into(),
    );
    wrap(out)
}

/// Fused residual add + RMSNorm: x, delta [rows, d], weight [d] -> (x + delta, its norm).
fn add_rms_norm<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<CubeBackend<R, F, I, BT>, 2>,
    delta: Tensor<CubeBackend<R, F, I, BT>, 2>,
    weight: Tensor<CubeBackend<R, F, I, BT>, 1>,
    eps: f64,
) -> SumAndNorm<CubeBackend<R, F, I, BT>> {
    let dtype = x.dtype();
    if !supported(dtype) || delta.dtype() != dtype || delta.dims() != x.dims() {
        return add_rms_norm_ops(x, delta, weight, eps);
    }
    let [rows, d] = x.dims();
    let x = into_contiguous(prim(x));
    let delta = into_contiguous(prim(delta));
    let w = into_contiguous(prim(weight.cast(dtype)));
    let sum = empty_like(&x, vec![rows, d]);
    let out = empty_like(&x, vec![rows, d]);
    let (count, dim) = row_cubes(rows);
    kernels::add_rms_norm::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        delta.into_tensor_arg(),
        w.into_tensor_arg(),
        sum.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        d as f32,
        eps as f32,
        dtype.into(),
    );
    (wrap(sum), wrap(out))
}

/// Fused per-head RMSNorm + rotary: x [B, H, T, d] (a strided view is fine), weight [d],
/// cos/sin [B, 1, T, d] -> [B, H, T, d].
fn rms_norm_rotary<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<CubeBackend<R, F, I, BT>, 4>,
    weight: Tensor<CubeBackend<R, F, I, BT>, 1>,
    eps: f64,
    cos: &Tensor<CubeBackend<R, F, I, BT>, 4>,
    sin: &Tensor<CubeBackend<R, F, I, BT>, 4>,
) -> Tensor<CubeBackend<R, F, I, BT>, 4> {
    let dtype = x.dtype();
    let [b, h, t, d] = x.dims();
    if !supported(dtype) || d % 2 != 0 || cos.dtype() != dtype || sin.dtype() != dtype {
        return rms_norm_rotary_ops(x, weight, eps, cos, sin);
    }
    let x = prim(x);
    let w = into_contiguous(prim(weight.cast(dtype)));
    let (c, s) = (prim(cos.clone()), prim(sin.clone()));
    let out = empty_like(&x, vec![b, h, t, d]);
    let (count, dim) = row_cubes(b * h * t);
    kernels::rms_norm_rotary::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        w.into_tensor_arg(),
        c.into_tensor_arg(),
        s.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        d as f32,
        eps as f32,
        dtype.into(),
    );
    wrap(out)
}

/// Fused `cast(softmax(scale · f32(x)))` over the last axis of x [rows, S].
fn softmax_scaled<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<CubeBackend<R, F, I, BT>, 2>,
    scale: f64,
) -> Tensor<CubeBackend<R, F, I, BT>, 2> {
    let dtype = x.dtype();
    if !supported(dtype) {
        return softmax_scaled_ops(x, scale);
    }
    let [rows, s] = x.dims();
    let x = into_contiguous(prim(x));
    let out = empty_like(&x, vec![rows, s]);
    let (count, dim) = row_cubes(rows);
    kernels::softmax_scaled::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        scale as f32,
        dtype.into(),
    );
    wrap(out)
}

/// Fused `silu(gate) · up`, both [rows, I].
fn swiglu<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    gate: Tensor<CubeBackend<R, F, I, BT>, 2>,
    up: Tensor<CubeBackend<R, F, I, BT>, 2>,
) -> Tensor<CubeBackend<R, F, I, BT>, 2> {
    let dtype = gate.dtype();
    let dims = gate.dims();
    let n = dims[0] * dims[1];
    if !supported(dtype) || up.dtype() != dtype || up.dims() != dims || n > u32::MAX as usize {
        return swiglu_ops(gate, up);
    }
    let (g, u) = (prim(gate), prim(up));
    let out = empty_like(&g, dims.to_vec());
    kernels::swiglu::launch::<R>(
        &g.client.clone(),
        CubeCount::Static(n.div_ceil(ELEMENTWISE_CUBE as usize) as u32, 1, 1),
        CubeDim::new_1d(ELEMENTWISE_CUBE),
        g.into_tensor_arg(),
        u.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtype.into(),
    );
    wrap(out)
}

/// A residual sum and its RMSNorm, both [rows, d].
pub type SumAndNorm<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// Residual add then RMSNorm: (x, delta, weight, eps) -> (x + delta, its norm).
pub type AddNormFn<B> = fn(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1>, f64) -> SumAndNorm<B>;

/// Per-head RMSNorm then rotary: (x, weight, eps, cos, sin) -> normed and rotated x.
pub type NormRotaryFn<B> =
    fn(Tensor<B, 4>, Tensor<B, 1>, f64, &Tensor<B, 4>, &Tensor<B, 4>) -> Tensor<B, 4>;

/// A backend's fused layer kernels (what the registry holds).
pub struct LayerOps<B: Backend> {
    /// RMSNorm: x [rows, d], weight [d], eps -> [rows, d].
    pub rms_norm: fn(Tensor<B, 2>, Tensor<B, 1>, f64) -> Tensor<B, 2>,
    /// Residual add then RMSNorm: x, delta [rows, d], weight [d], eps -> (x + delta, norm).
    pub add_rms_norm: AddNormFn<B>,
    /// Per-head RMSNorm then rotary: x [B, H, T, d], weight [d], eps, cos, sin [B, 1, T, d].
    pub rms_norm_rotary: NormRotaryFn<B>,
    /// `softmax(scale · x)` over the last axis of [rows, S], statistics in f32.
    pub softmax_scaled: fn(Tensor<B, 2>, f64) -> Tensor<B, 2>,
    /// `silu(gate) · up`, [rows, I] each.
    pub swiglu: fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>,
}

impl<B: Backend> Clone for LayerOps<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for LayerOps<B> {}

impl<B: Backend> LayerOps<B> {
    /// The tensor-op versions (what the layers run when nothing is registered).
    pub fn reference() -> Self {
        Self {
            rms_norm: rms_norm_ops::<B, 2>,
            add_rms_norm: add_rms_norm_ops::<B, 2>,
            rms_norm_rotary: rms_norm_rotary_ops::<B>,
            softmax_scaled: softmax_scaled_ops::<B, 2>,
            swiglu: swiglu_ops::<B, 2>,
        }
    }
}

/// Makes the decoder on the CubeCL backend `CubeBackend<R, F, I, BT>` use the fused kernels.
pub fn register<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>() {
    register_ops(LayerOps::<CubeBackend<R, F, I, BT>> {
        rms_norm: rms_norm::<R, F, I, BT>,
        add_rms_norm: add_rms_norm::<R, F, I, BT>,
        rms_norm_rotary: rms_norm_rotary::<R, F, I, BT>,
        softmax_scaled: softmax_scaled::<R, F, I, BT>,
        swiglu: swiglu::<R, F, I, BT>,
    });
}

/// Makes the decoder on backend `B` use `ops` (how tests route a CPU backend through the
/// registry).
pub fn register_ops<B: Backend>(ops: LayerOps<B>) {
    super::store(ops);
}

/// Forgets backend `B`'s fused layer kernels (the tensor ops again).
pub fn unregister<B: Backend>() {
    super::remove::<LayerOps<B>>();
}

/// The fused layer kernels registered for backend `B`, if any.
pub fn registered<B: Backend>() -> Option<LayerOps<B>> {
    super::fetch::<LayerOps<B>>()
}
