//! AdamW's update of one parameter as one CubeCL kernel: new parameter, first and second moment
//! in a single pass (burn's AdamW runs ~14 tensor ops per parameter, and the training step is
//! bound by the host's cost per launch: 756 MoE-LoRA parameters make ~10,000 launches a step).
//!
//! The math is burn 0.21's AdamW exactly (`train::optim` falls back to it where no kernel is
//! registered): with g = grad · grad_scale, m = β1·m + (1−β1)·g, v = β2·v + (1−β2)·g², and
//! p = p·(1 − lr·wd) − lr · (m / (1−β1^t)) / (√(v / (1−β2^t)) + ε); on the first step m and
//! v start from zero.

use burn::prelude::*;
use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim};

use super::layer_ops::{empty_like, prim, wrap};

/// Threads per cube (one element each).
const THREADS: u32 = 256;

/// The scalars of one AdamW update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// Learning rate.
    pub lr: f64,
    /// β1.
    pub beta_1: f32,
    /// β2.
    pub beta_2: f32,
    /// ε.
    pub epsilon: f32,
    /// Decoupled weight decay (the parameter is multiplied by 1 − lr·wd).
    pub weight_decay: f32,
    /// The update's step count t (1 on the first update: the moments start from zero).
    pub time: usize,
    /// Factor the gradient is multiplied by first (1.0: none).
    pub grad_scale: f32,
}

mod kernels {
    use cubecl::prelude::*;

    /// One thread per element: the AdamW update of `param` with `grad` and the moments `m`,
    /// `v` (unread when `first` = 1), into `p_out`, `m_out`, `v_out`. `c1`, `c2` are the bias
    /// corrections 1 − β^t, `keep` = 1 − lr·wd.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        param: &Tensor<f32>,
        grad: &Tensor<f32>,
        m: &Tensor<f32>,
        v: &Tensor<f32>,
        p_out: &mut Tensor<f32>,
        m_out: &mut Tensor<f32>,
        v_out: &mut Tensor<f32>,
        lr: f32,
        b1: f32,
        b2: f32,
        eps: f32,
        keep: f32,
        c1: f32,
        c2: f32,
        scale: f32,
        first: u32,
    ) {
        let i = ABSOLUTE_POS;
        if i < param.len() {
            let g = grad[i] * scale;
            let mut m_new = g * (1.0f32 - b1);
            let mut v_new = g * g * (1.0f32 - b2);
            if first == 0 {
                m_new += m[i] * b1;
                v_new += v[i] * b2;
            }
            m_out[i] = m_new;
            v_out[i] = v_new;
            let step = (m_new / c1) / ((v_new / c2).sqrt() + eps);
            p_out[i] = param[i] * keep - step * lr;
        }
    }
}

/// The moments (m, v), flat [n].
pub type Moments<B> = (Tensor<B, 1>, Tensor<B, 1>);
/// The updated (param, m, v), flat [n].
pub type Updated<B> = (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>);

/// One AdamW update on a backend without autodiff: (param, grad, moments (None on the first
/// step), scalars) -> (param, m, v), all flat [n] f32.
pub type AdamWStepFn<B> =
    fn(Tensor<B, 1>, Tensor<B, 1>, Option<Moments<B>>, AdamWScalars) -> Updated<B>;

/// A backend's one-launch AdamW update (what the kernel registry holds).
pub struct AdamWKernel<B: Backend> {
    /// The update.
    pub step: AdamWStepFn<B>,
}

impl<B: Backend> Clone for AdamWKernel<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for AdamWKernel<B> {}

/// The bias corrections (1 − β1^t, 1 − β2^t) as burn's AdamW computes them (f32 powers).
pub fn bias_corrections(s: &AdamWScalars) -> (f32, f32) {
    let t = s.time as i32;
    (1.0 - s.beta_1.powi(t), 1.0 - s.beta_2.powi(t))
}

/// [`AdamWStepFn`] as one CubeCL kernel.
fn step_cube<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    param: Tensor<CubeBackend<R, F, I, BT>, 1>,
    grad: Tensor<CubeBackend<R, F, I, BT>, 1>,
    moments: Option<Moments<CubeBackend<R, F, I, BT>>>,
    s: AdamWScalars,
) -> Updated<CubeBackend<R, F, I, BT>> {
    let n = param.dims()[0];
    assert!(
        param.dtype() == DType::F32 && grad.dtype() == DType::F32,
        "the AdamW kernel takes f32 parameters and gradients"
    );
    let first = moments.is_none();
    let p = into_contiguous(prim(param));
    let g = into_contiguous(prim(grad));
    let (m, v) = match moments {
        Some((m, v)) => (into_contiguous(prim(m)), into_contiguous(prim(v))),
        None => (g.clone(), g.clone()), // unread on the first step
    };
    let (p_out, m_out, v_out) = (
        empty_like(&p, vec![n]),
        empty_like(&p, vec![n]),
        empty_like(&p, vec![n]),
    );
    let (c1, c2) = bias_corrections(&s);
    let keep = (1.0 - s.lr * s.weight_decay as f64) as f32;
    let count = CubeCount::Static(n.div_ceil(THREADS as usize).max(1) as u32, 1, 1);
    kernels::adamw_step::launch::<R>(
        &p.client.clone(),
        count,
        CubeDim::new_1d(THREADS),
        p.into_tensor_arg(),
        g.into_tensor_arg(),
        m.into_tensor_arg(),
        v.into_tensor_arg(),
        p_out.clone().into_tensor_arg(),
        m_out.clone().into_tensor_arg(),
        v_out.clone().into_tensor_arg(),
        s.lr as f32,
        s.beta_1,
        s.beta_2,
        s.epsilon,
        keep,
        c1,
        c2,
        s.grad_scale,
        first as u32,
    );
    (wrap(p_out), wrap(m_out), wrap(v_out))
}

/// Makes the optimizer update parameters of `CubeBackend<R, F, I, BT>` with the kernel.
pub fn register_kernel<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>() {
    register_kernel_fn(AdamWKernel::<CubeBackend<R, F, I, BT>> {
        step: step_cube::<R, F, I, BT>,
    });
}

/// Makes the optimizer on backend `B` use `kernel` (how tests route a CPU backend through it).
pub fn register_kernel_fn<B: Backend>(kernel: AdamWKernel<B>) {
    super::store(kernel);
}

/// Forgets backend `B`'s AdamW kernel.
pub fn unregister<B: Backend>() {
    super::remove::<AdamWKernel<B>>();
}

/// The AdamW kernel registered for backend `B`, if any.
pub fn registered<B: Backend>() -> Option<AdamWKernel<B>> {
    super::fetch::<AdamWKernel<B>>()
}

/// [`AdamWStepFn`] with tensor ops: the same expression the kernel evaluates (CPU tests register
/// it to check the optimizer's kernel path against burn's AdamW; the GPU check compares the
/// kernel with it).
pub fn step_ops<B: Backend>(
    param: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    moments: Option<Moments<B>>,
    s: AdamWScalars,
) -> Updated<B> {
    let g = grad.mul_scalar(s.grad_scale);
    let mut m = g.clone().mul_scalar(1.0 - s.beta_1);
    let mut v = g.clone().mul(g).mul_scalar(1.0 - s.beta_2);
    if let Some((m0, v0)) = moments {
        m = m + m0.mul_scalar(s.beta_1);
        v = v + v0.mul_scalar(s.beta_2);
    }
    let (c1, c2) = bias_corrections(&s);
    let step = m.clone().div_scalar(c1) / (v.clone().div_scalar(c2).sqrt().add_scalar(s.epsilon));
    let keep = (1.0 - s.lr * s.weight_decay as f64) as f32;
    let p = param.mul_scalar(keep) - step.mul_scalar(s.lr as f32);
    (p, m, v)
}
