//! Basic layers with Hugging Face parameter layouts and names (`weight` [out, in], `bias`).
//!
//! Parameters are created lazily (burn's `Initializer`), so building a 4B model to count its
//! parameters allocates nothing; loading replaces them with checkpoint tensors.

use burn::module::{Initializer, Module, Param};
use burn::prelude::*;
use burn::tensor::DType;

use crate::quant::kernels::layer_ops;

/// Default std of the normal initialisation (HF's `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// `nn.Linear` in HF layout: `y = x · weightᵀ + bias`, weight [out, in].
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// [out, in]
    pub weight: Param<Tensor<B, 2>>,
    /// [out]
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// A lazily initialised layer (normal, std 0.02, as HF's `_init_weights`; bias zero).
    pub fn init(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        let weight = Initializer::Normal {
            mean: 0.0,
            std: INIT_STD,
        }
        .init([d_out, d_in], device);
        let bias = bias.then(|| Initializer::Zeros.init([d_out], device));
        Self { weight, bias }
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.weight.lazy_shape().dims::<2>()[1]
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        self.weight.lazy_shape().dims::<2>()[0]
    }

    /// Applies the layer to the last dimension of `x` ([..., in] -> [..., out]).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let w = self.weight.val().transpose();
        burn::tensor::module::linear(x, w, self.bias.as_ref().map(|b| b.val()))
    }
}

/// `nn.LayerNorm` with weight and bias; statistics and affine in f32, result in the input dtype.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// [d]
    pub weight: Param<Tensor<B, 1>>,
    /// [d]
    pub bias: Param<Tensor<B, 1>>,
    /// Added to the variance.
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// Ones / zeros, as PyTorch initialises it.
    pub fn init(d: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Initializer::Ones.init([d], device),
            bias: Initializer::Zeros.init([d], device),
            eps,
        }
    }

    /// Normalises the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let mean = x.clone().mean_dim(D - 1);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(D - 1);
        let normed = centered * (var + self.eps).sqrt().recip();
        let w = self.weight.val().cast(DType::F32).unsqueeze::<D>();
        let b = self.bias.val().cast(DType::F32).unsqueeze::<D>();
        (normed * w + b).cast(dtype)
    }
}

/// Qwen's RMSNorm: `weight · cast(x · rsqrt(mean(x²) + eps))`, statistics in f32.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// [d]
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square.
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Weight of ones.
    pub fn init(d: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Initializer::Ones.init([d], device),
            eps,
        }
    }

    /// Normalises the last dimension; the weight multiplies after the cast back, as HF does.
    /// One fused kernel where the backend registered one (burn-cuda), else [`rms_norm_ops`].
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let Some(fused) = layer_ops::registered::<B>() else {
            return rms_norm_ops(x, self.weight.val(), self.eps);
        };
        let dims = x.dims();
        (fused.rms_norm)(as_rows(x), self.weight.val(), self.eps).reshape(dims)
    }

    /// `(x + delta, norm(x + delta))` — the residual stream after an add and its norm, in one
    /// fused kernel where the backend registered one; without `delta`, `(x, norm(x))`.
    pub fn forward_added<const D: usize>(
        &self,
        x: Tensor<B, D>,
        delta: Option<Tensor<B, D>>,
    ) -> (Tensor<B, D>, Tensor<B, D>) {
        let Some(delta) = delta else {
            return (x.clone(), self.forward(x));
        };
        let Some(fused) = layer_ops::registered::<B>() else {
            return add_rms_norm_ops(x, delta, self.weight.val(), self.eps);
        };
        let dims = x.dims();
        let (sum, normed) =
            (fused.add_rms_norm)(as_rows(x), as_rows(delta), self.weight.val(), self.eps);
        (sum.reshape(dims), normed.reshape(dims))
    }
}

/// x [..., d] viewed as [rows, d] (rows = the product of the leading dims), the layout of the
/// fused norm kernels.
fn as_rows<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, 2> {
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product();
    x.reshape([rows, dims[D - 1]])
}

/// `(x + delta, rms_norm_ops(x + delta))` with tensor ops (what the fused `add_rms_norm`
/// kernel computes in one launch).
pub fn add_rms_norm_ops<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    delta: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, D>, Tensor<B, D>) {
    let sum = x + delta;
    (sum.clone(), rms_norm_ops(sum, weight, eps))
}

/// RMSNorm with tensor ops: `weight · cast(x · 1/sqrt(mean(x²) + eps))` over the last
/// dimension, the statistics in f32 and the weight product in x's dtype.
pub fn rms_norm_ops<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let xf = x.cast(DType::F32);
    let ms = xf.clone().square().mean_dim(D - 1);
    let normed = (xf * (ms + eps).sqrt().recip()).cast(dtype);
    normed * weight.cast(dtype).unsqueeze::<D>()
}

/// A lookup table `weight` [rows, d] (token embeddings, vision position table).
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// [rows, d]
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Embedding<B> {
    /// Normal(0, 0.02), as HF initialises embeddings.
    pub fn init(rows: usize, d: usize, device: &B::Device) -> Self {
        Self {
            weight: Initializer::Normal {
                mean: 0.0,
                std: INIT_STD,
            }
            .init([rows, d], device),
        }
    }

    /// Rows for `ids` [B, T] -> [B, T, d].
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        burn::tensor::module::embedding(self.weight.val(), ids)
    }
}
