//! Closed-form backwards of the fused layer steps (`layer_steps`): the input gradient of an
//! RMSNorm, of a q/k RMSNorm followed by the rotary rotation, and of SwiGLU. On burn-cuda each
//! is one CubeCL kernel (the tensor ops' recorded backward runs ~20 launches per norm); the
//! tensor-op versions here are the reference and the path of other backends.
//!
//! With r = 1/√(mean(x²) + ε), y = (x·r)·w: dx = r·g − x·r³·Σ(g·x)/d, g = dy·w (the rounding
//! casts of the forward pass straight through, as autodiff treats them). Rotary, per pair
//! (j, j + d/2): out₁ = n₁c₁ − n₂s₁, out₂ = n₂c₂ + n₁s₂, so dn₁ = dy₁c₁ + dy₂s₂ and
//! dn₂ = dy₂c₂ − dy₁s₁. SwiGLU out = silu(g)·u: du = dout·silu(g), dg = dout·u·σ(g)·(1 +
//! g·(1 − σ(g))).

use burn::prelude::*;
use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim};

use super::layer_ops::{empty_like, prim, row_cubes, supported, wrap, ELEMENTWISE_CUBE};

mod kernels {
    use cubecl::prelude::*;

    /// One warp per row of x [rows, d]: `dx = r·g − x·r³·Σ(g·x)/d` with g = dy·weight, all
    /// in f32, written in F.
    #[cube(launch)]
    pub fn rms_norm_backward<F: Float>(
        x: &Tensor<F>,
        weight: &Tensor<F>,
        dy: &Tensor<F>,
        dx: &mut Tensor<F>,
        d_f32: f32,
        eps: f32,
        #[define(F)] _dtype: StorageType,
    ) {
        let rows = x.shape(0);
        let d = x.shape(1);
        let row = CUBE_POS * (CUBE_DIM_Y as usize) + UNIT_POS_Y as usize;
        if row < rows {
            let (x_row, dy_row, dx_row) =
                (row * x.stride(0), row * dy.stride(0), row * dx.stride(0));
            let mut squares = 0.0f32;
            let mut dot = 0.0f32;
            let mut j = UNIT_POS_X as usize;
            while j < d {
                let v = f32::cast_from(x[x_row + j]);
                squares += v * v;
                dot += f32::cast_from(dy[dy_row + j]) * f32::cast_from(weight[j]) * v;
                j += CUBE_DIM_X as usize;
            }
            let r = 1.0f32 / (plane_sum(squares) / d_f32 + eps).sqrt();
            let c = r * r * r * plane_sum(dot) / d_f32;
            let mut k = UNIT_POS_X as usize;
            while k < d {
                let g = f32::cast_from(dy[dy_row + k]) * f32::cast_from(weight[k]);
                dx[dx_row + k] = F::cast_from(r * g - f32::cast_from(x[x_row + k]) * c);
                k += CUBE_DIM_X as usize;
            }
        }
    }

    /// One warp per head row of x [B, H, T, d] (any strides), dy and dx [B, H, T, d]
    /// contiguous, cos/sin [B, 1, T, d]: the rotation's transpose gives dn, then the RMSNorm
    /// backward as [`rms_norm_backward`]. Each thread owns the pairs (j, j + d/2).
    #[cube(launch)]
    pub fn rms_norm_rotary_backward<F: Float>(
        x: &Tensor<F>,
        weight: &Tensor<F>,
        cos: &Tensor<F>,
        sin: &Tensor<F>,
        dy: &Tensor<F>,
        dx: &mut Tensor<F>,
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
            let ss_row = b * sin.stride(0) + t * sin.stride(2);
            let (cs, ss) = (cos.stride(3), sin.stride(3));
            let dy_row = b * dy.stride(0) + h * dy.stride(1) + t * dy.stride(2);
            let dx_row = b * dx.stride(0) + h * dx.stride(1) + t * dx.stride(2);
            let (dys, dxs) = (dy.stride(3), dx.stride(3));
            let half = d / 2;
            let mut squares = 0.0f32;
            let mut dot = 0.0f32;
            let mut k = UNIT_POS_X as usize;
            while k < half {
                let k2 = k + half;
                let (x1, x2) = (
                    f32::cast_from(x[x_row + k * xs]),
                    f32::cast_from(x[x_row + k2 * xs]),
                );
                let (dy1, dy2) = (
                    f32::cast_from(dy[dy_row + k * dys]),
                    f32::cast_from(dy[dy_row + k2 * dys]),
                );
                let dn1 = dy1 * f32::cast_from(cos[cs_row + k * cs])
                    + dy2 * f32::cast_from(sin[ss_row + k2 * ss]);
                let dn2 = dy2 * f32::cast_from(cos[cs_row + k2 * cs])
                    - dy1 * f32::cast_from(sin[ss_row + k * ss]);
                squares += x1 * x1 + x2 * x2;
                dot += dn1 * f32::cast_from(weight[k]) * x1 + dn2 * f32::cast_from(weight[k2]) * x2;
                k += CUBE_DIM_X as usize;
            }
            let r = 1.0f32 / (plane_sum(squares) / d_f32 + eps).sqrt();
            let c = r * r * r * plane_sum(dot) / d_f32;
            let mut k = UNIT_POS_X as usize;
            while k < half {
                let k2 = k + half;
                let (dy1, dy2) = (
                    f32::cast_from(dy[dy_row + k * dys]),
                    f32::cast_from(dy[dy_row + k2 * dys]),
                );
                let dn1 = dy1 * f32::cast_from(cos[cs_row + k * cs])
                    + dy2 * f32::cast_from(sin[ss_row + k2 * ss]);
                let dn2 = dy2 * f32::cast_from(cos[cs_row + k2 * cs])
                    - dy1 * f32::cast_from(sin[ss_row + k * ss]);
                let g1 = dn1 * f32::cast_from(weight[k]);
                let g2 = dn2 * f32::cast_from(weight[k2]);
                let x1 = f32::cast_from(x[x_row + k * xs]);
                let x2 = f32::cast_from(x[x_row + k2 * xs]);
                dx[dx_row + k * dxs] = F::cast_from(r * g1 - x1 * c);
                dx[dx_row + k2 * dxs] = F::cast_from(r * g2 - x2 * c);
                k += CUBE_DIM_X as usize;
            }
        }
    }

    /// One thread per element of gate, up, dout [rows, I] (each through its own strides):
    /// `dup = dout·silu(g)` (silu rounded to F as the forward), `dgate = dout·u·σ(g)·(1 +
    /// g·(1 − σ(g)))`; dgate, dup contiguous.
    #[cube(launch)]
    pub fn swiglu_backward<F: Float>(
        gate: &Tensor<F>,
        up: &Tensor<F>,
        dout: &Tensor<F>,
        dgate: &mut Tensor<F>,
        dup: &mut Tensor<F>,
        #[define(F)] _dtype: StorageType,
    ) {
        let cols = gate.shape(1);
        let i = ABSOLUTE_POS;
        if i < gate.shape(0) * cols {
            let (r, c) = (i / cols, i % cols);
            let g = f32::cast_from(gate[r * gate.stride(0) + c * gate.stride(1)]);
            let u = f32::cast_from(up[r * up.stride(0) + c * up.stride(1)]);
            let d = f32::cast_from(dout[r * dout.stride(0) + c * dout.stride(1)]);
            let s = 1.0f32 / (1.0f32 + (-g).exp());
            let act = f32::cast_from(F::cast_from(g * s));
            dup[r * dup.stride(0) + c * dup.stride(1)] = F::cast_from(d * act);
            dgate[r * dgate.stride(0) + c * dgate.stride(1)] =
                F::cast_from(d * u * s * (1.0f32 + g * (1.0f32 - s)));
        }
    }
}

/// RMSNorm's input gradient: (x [rows, d], weight [d], dy [rows, d], eps) -> dx.
pub type NormGradFn<B> = fn(Tensor<B, 2>, Tensor<B, 1>, Tensor<B, 2>, f64) -> Tensor<B, 2>;
/// q/k RMSNorm + rotary's input gradient: (x, weight, eps, cos, sin, dy) -> dx [B, H, T, d].
pub type NormRotaryGradFn<B> =
    fn(Tensor<B, 4>, Tensor<B, 1>, f64, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) -> Tensor<B, 4>;
/// A pair of [rows, I] tensors (SwiGLU's dgate, dup).
pub type GatePair<B> = (Tensor<B, 2>, Tensor<B, 2>);
/// SwiGLU's gradients: (gate, up, dout) -> (dgate, dup), [rows, I] each.
pub type SwigluGradFn<B> = fn(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) -> GatePair<B>;

/// A backend's layer backwards (what the registry holds).
pub struct LayerGrads<B: Backend> {
    /// RMSNorm.
    pub rms_norm: NormGradFn<B>,
    /// q/k RMSNorm + rotary.
    pub rms_norm_rotary: NormRotaryGradFn<B>,
    /// SwiGLU.
    pub swiglu: SwigluGradFn<B>,
}

impl<B: Backend> Clone for LayerGrads<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for LayerGrads<B> {}

impl<B: Backend> LayerGrads<B> {
    /// The tensor-op closed forms.
    pub fn reference() -> Self {
        Self {
            rms_norm: rms_norm_grad_ops::<B, 2>,
            rms_norm_rotary: rms_norm_rotary_grad_ops::<B>,
            swiglu: swiglu_grad_ops::<B>,
        }
    }
}

/// RMSNorm's input gradient in tensor ops (f32, back in x's dtype).
pub fn rms_norm_grad_ops<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    dy: Tensor<B, D>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let d = x.dims()[D - 1] as f64;
    let xf = x.cast(DType::F32);
    let r = (xf.clone().square().mean_dim(D - 1) + eps).sqrt().recip(); // [.., 1]
    let g = dy.cast(DType::F32) * weight.cast(DType::F32).unsqueeze::<D>();
    let dot = (g.clone() * xf.clone()).sum_dim(D - 1); // [.., 1]
    let c = r.clone().powi_scalar(3) * dot.div_scalar(d);
    (g * r - xf * c).cast(dtype)
}

/// q/k RMSNorm + rotary's input gradient in tensor ops: the rotation's transpose, then
/// [`rms_norm_grad_ops`].
pub fn rms_norm_rotary_grad_ops<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 1>,
    eps: f64,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    dy: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let d = dy.dims()[3];
    let ds = dy.clone() * sin;
    let (first, second) = (ds.clone().narrow(3, 0, d / 2), ds.narrow(3, d / 2, d / 2));
    let dn = dy * cos + Tensor::cat(vec![second, first.neg()], 3);
    rms_norm_grad_ops(x, weight, dn, eps)
}

/// SwiGLU's gradients in tensor ops.
pub fn swiglu_grad_ops<B: Backend>(
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    dout: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let dtype = gate.dtype();
    let g = gate.cast(DType::F32);
    let s = burn::tensor::activation::sigmoid(g.clone());
    let act = (g.clone() * s.clone()).cast(dtype);
    let dup = dout.clone() * act;
    let one_minus = s.clone().neg().add_scalar(1.0);
    let dg = dout.cast(DType::F32) * up.cast(DType::F32) * s * (g * one_minus).add_scalar(1.0);
    (dg.cast(dtype), dup)
}

/// [`NormGradFn`] as one kernel.
fn rms_norm_grad<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<CubeBackend<R, F, I, BT>, 2>,
    weight: Tensor<CubeBackend<R, F, I, BT>, 1>,
    dy: Tensor<CubeBackend<R, F, I, BT>, 2>,
    eps: f64,
) -> Tensor<CubeBackend<R, F, I, BT>, 2> {
    let dtype = x.dtype();
    if !supported(dtype) || dy.dtype() != dtype {
        return rms_norm_grad_ops(x, weight, dy, eps);
    }
    let [rows, d] = x.dims();
    let (x, dy) = (into_contiguous(prim(x)), into_contiguous(prim(dy)));
    let w = into_contiguous(prim(weight.cast(dtype)));
    let dx = empty_like(&x, vec![rows, d]);
    let (count, dim) = row_cubes(rows);
    kernels::rms_norm_backward::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        w.into_tensor_arg(),
        dy.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        d as f32,
        eps as f32,
        dtype.into(),
    );
    wrap(dx)
}

/// [`NormRotaryGradFn`] as one kernel.
fn rms_norm_rotary_grad<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: Tensor<CubeBackend<R, F, I, BT>, 4>,
    weight: Tensor<CubeBackend<R, F, I, BT>, 1>,
    eps: f64,
    cos: Tensor<CubeBackend<R, F, I, BT>, 4>,
    sin: Tensor<CubeBackend<R, F, I, BT>, 4>,
    dy: Tensor<CubeBackend<R, F, I, BT>, 4>,
) -> Tensor<CubeBackend<R, F, I, BT>, 4> {
    let dtype = x.dtype();
    let [b, h, t, d] = x.dims();
    let same = [cos.dtype(), sin.dtype(), dy.dtype()]
        .iter()
        .all(|&t| t == dtype);
    if !supported(dtype) || d % 2 != 0 || !same {
        return rms_norm_rotary_grad_ops(x, weight, eps, cos, sin, dy);
    }
    let (x, c, s) = (prim(x), prim(cos), prim(sin));
    let dy = into_contiguous(prim(dy));
    let w = into_contiguous(prim(weight.cast(dtype)));
    let dx = empty_like(&dy, vec![b, h, t, d]);
    let (count, dim) = row_cubes(b * h * t);
    kernels::rms_norm_rotary_backward::launch::<R>(
        &dy.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        w.into_tensor_arg(),
        c.into_tensor_arg(),
        s.into_tensor_arg(),
        dy.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        d as f32,
        eps as f32,
        dtype.into(),
    );
    wrap(dx)
}

/// [`SwigluGradFn`] as one kernel.
fn swiglu_grad<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    gate: Tensor<CubeBackend<R, F, I, BT>, 2>,
    up: Tensor<CubeBackend<R, F, I, BT>, 2>,
    dout: Tensor<CubeBackend<R, F, I, BT>, 2>,
) -> GatePair<CubeBackend<R, F, I, BT>> {
    let dtype = gate.dtype();
    let dims = gate.dims();
    let n = dims[0] * dims[1];
    let same = up.dtype() == dtype && dout.dtype() == dtype;
    if !supported(dtype) || !same || n > u32::MAX as usize {
        return swiglu_grad_ops(gate, up, dout);
    }
    let (g, u, d) = (prim(gate), prim(up), prim(dout));
    let (dg, du) = (empty_like(&g, dims.to_vec()), empty_like(&g, dims.to_vec()));
    kernels::swiglu_backward::launch::<R>(
        &g.client.clone(),
        CubeCount::Static(n.div_ceil(ELEMENTWISE_CUBE as usize) as u32, 1, 1),
        CubeDim::new_1d(ELEMENTWISE_CUBE),
        g.into_tensor_arg(),
        u.into_tensor_arg(),
        d.into_tensor_arg(),
        dg.clone().into_tensor_arg(),
        du.clone().into_tensor_arg(),
        dtype.into(),
    );
    (wrap(dg), wrap(du))
}

/// Makes the layer steps' backwards on `CubeBackend<R, F, I, BT>` run the kernels.
pub fn register<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>() {
    super::store(LayerGrads::<CubeBackend<R, F, I, BT>> {
        rms_norm: rms_norm_grad::<R, F, I, BT>,
        rms_norm_rotary: rms_norm_rotary_grad::<R, F, I, BT>,
        swiglu: swiglu_grad::<R, F, I, BT>,
    });
}

/// The layer backwards registered for backend `B`, if any.
pub fn registered<B: Backend>() -> Option<LayerGrads<B>> {
    super::fetch::<LayerGrads<B>>()
}
