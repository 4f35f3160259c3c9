//! `LoraLinear`: a frozen base layer plus a low-rank update `(alpha / r) · B·A·dropout(x)`.

use burn::module::{Initializer, Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::prelude::*;

use super::{AdapterStats, FrozenLinear};

/// LoRA on a frozen linear layer. A [r, in] starts Kaiming-uniform (bound 1/√in, as peft),
/// B [out, r] starts at zero, so a fresh adapter leaves the layer unchanged. A and B are kept in
/// f32 and cast to the activation dtype in the forward pass.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend, W> {
    /// The frozen layer.
    pub base: W,
    /// [r, in]
    pub lora_a: Param<Tensor<B, 2>>,
    /// [out, r]
    pub lora_b: Param<Tensor<B, 2>>,
    /// alpha / r.
    pub scaling: f64,
    /// Dropout on the adapter's input (training only).
    pub dropout: Dropout,
}

/// A's initialiser: peft's `kaiming_uniform_(a=√5)`, i.e. U(−1/√in, 1/√in).
pub fn lora_a_init(d_in: usize) -> Initializer {
    let bound = 1.0 / (d_in as f64).sqrt();
    Initializer::Uniform {
        min: -bound,
        max: bound,
    }
}

impl<B: Backend, W: FrozenLinear<B>> LoraLinear<B, W> {
    /// Wraps `base` (frozen here) with a rank-`r` adapter.
    pub fn new(base: W, r: usize, alpha: f64, dropout: f64) -> Self {
        let (d_in, d_out) = (base.d_in(), base.d_out());
        let device = base.device();
        Self {
            base: super::freeze(base),
            lora_a: lora_a_init(d_in).init([r, d_in], &device),
            lora_b: Initializer::Zeros.init([d_out, r], &device),
            scaling: alpha / r as f64,
            dropout: DropoutConfig::new(dropout).init(),
        }
    }

    /// The adapter's contribution for `x` [..., in] -> [..., out], in `x`'s dtype.
    pub fn delta<const D: usize>(&self, x: Tensor<B, D>, stats: &AdapterStats<B>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let a = self.lora_a.val().cast(dtype).transpose();
        let b = self.lora_b.val().cast(dtype).transpose();
        let h = burn::tensor::module::linear(stats.dropout(&self.dropout, x), a, None);
        burn::tensor::module::linear(h, b, None).mul_scalar(self.scaling)
    }

    /// `base(x) + delta(x)` (`stats`: the pass, which says whether dropout applies).
    pub fn forward<const D: usize>(
        &self,
        x: Tensor<B, D>,
        stats: &AdapterStats<B>,
    ) -> Tensor<B, D> {
        self.base.forward_frozen(x.clone()) + self.delta(x, stats)
    }

    /// The dense update `scaling · B·A` [out, in] (for merging into the base weight).
    pub fn merged_delta(&self) -> Tensor<B, 2> {
        self.lora_b
            .val()
            .matmul(self.lora_a.val())
            .mul_scalar(self.scaling)
    }
}
