//! `MoeLoraLinear`: a frozen base layer plus a token-routed mixture of LoRA experts.
//!
//! A router (no bias) scores the layer input for E experts; softmax; each token keeps its top-k
//! experts (k = E is the dense mixture), optionally renormalised. Each expert runs only on the
//! tokens routed to it (gather, two small matmuls, scatter-add). The load-balancing loss
//! `E · Σ_i f_i · P_i` (f_i = share of routing slots that went to expert i, P_i = mean router
//! probability of expert i) is 1.0 for a perfectly uniform router and grows with imbalance.

use burn::module::{Initializer, Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, IndexingUpdateOp};

use super::lora::lora_a_init;
use super::{AdapterStats, FrozenLinear};
use crate::model::layers::Linear;

/// Mixture-of-LoRA-experts on a frozen linear layer.
#[derive(Module, Debug)]
pub struct MoeLoraLinear<B: Backend> {
    /// The frozen layer.
    pub base: Linear<B>,
    /// Router weight [E, in].
    pub router: Param<Tensor<B, 2>>,
    /// Expert A matrices [E, r, in].
    pub experts_a: Param<Tensor<B, 3>>,
    /// Expert B matrices [E, out, r] (zero at init).
    pub experts_b: Param<Tensor<B, 3>>,
    /// alpha / r.
    pub scaling: f64,
    /// Experts each token uses.
    pub top_k: usize,
    /// Renormalise the kept router weights to sum to 1.
    pub renormalize: bool,
    /// Dropout on the experts' input.
    pub dropout: Dropout,
    /// Dropout on the router's input.
    pub router_dropout: Dropout,
}

/// Settings of a mixture-of-LoRA layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeLoraOptions {
    /// Rank of each expert.
    pub r: usize,
    /// LoRA alpha (scaling = alpha / r).
    pub alpha: f64,
    /// Experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Renormalise the kept router weights.
    pub renormalize: bool,
    /// Expert input dropout.
    pub dropout: f64,
    /// Router input dropout.
    pub router_dropout: f64,
}

impl<B: Backend> MoeLoraLinear<B> {
    /// Wraps `base` (frozen here) with `o.experts` LoRA experts and a router.
    pub fn new(base: Linear<B>, o: MoeLoraOptions) -> Self {
        let (d_in, d_out) = (base.d_in(), base.d_out());
        let device = base.weight.lazy_device();
        let bound = 1.0 / (d_in as f64).sqrt();
        Self {
            base: base.no_grad(),
            router: Initializer::Uniform {
                min: -bound,
                max: bound,
            }
            .init([o.experts, d_in], &device),
            experts_a: lora_a_init(d_in).init([o.experts, o.r, d_in], &device),
            experts_b: Initializer::Zeros.init([o.experts, d_out, o.r], &device),
            scaling: o.alpha / o.r as f64,
            top_k: o.top_k.clamp(1, o.experts),
            renormalize: o.renormalize,
            dropout: DropoutConfig::new(o.dropout).init(),
            router_dropout: DropoutConfig::new(o.router_dropout).init(),
        }
    }

    /// Number of experts.
    pub fn experts(&self) -> usize {
        self.router.lazy_shape().dims::<2>()[0]
    }

    /// `base(x) + Σ_{e ∈ topk(x)} w_e · scaling · B_e·A_e·x`, recording the router statistics.
    pub fn forward<const D: usize>(
        &self,
        x: Tensor<B, D>,
        stats: &AdapterStats<B>,
    ) -> Tensor<B, D> {
        let y = self.base.forward_frozen(x.clone());
        let dims = x.dims();
        let d_in = dims[D - 1];
        let n: usize = dims[..D - 1].iter().product();
        let (e_count, k) = (self.experts(), self.top_k);
        let dtype = x.dtype();
        let xf = x.reshape([n, d_in]);

        // Router in f32: [N, E] probabilities, top-k per token.
        let logits = self
            .router_dropout
            .forward(xf.clone().cast(DType::F32))
            .matmul(self.router.val().transpose());
        let probs = softmax(logits, 1);
        let (mut top_w, top_i) = probs.clone().topk_with_indices(k, 1); // [N, k]
        if self.renormalize {
            top_w = top_w.clone() / top_w.sum_dim(1);
        }
        let choice: Vec<i64> = top_i
            .into_data()
            .convert::<i64>()
            .to_vec()
            .expect("int data");

        // Which (token, slot) pairs each expert serves.
        let mut rows: Vec<Vec<i64>> = vec![Vec::new(); e_count];
        let mut slots: Vec<Vec<i64>> = vec![Vec::new(); e_count];
        for (pos, &e) in choice.iter().enumerate() {
            rows[e as usize].push((pos / k) as i64);
            slots[e as usize].push(pos as i64);
        }
        let counts: Vec<usize> = rows.iter().map(Vec::len).collect();
        let device = xf.device();
        let top_w = top_w.reshape([n * k]);
        let d_out = y.dims()[D - 1];
        let mut delta = Tensor::<B, 2>::zeros([n, d_out], (&device, dtype));
        for e in 0..e_count {
            if rows[e].is_empty() {
                continue;
            }
            let m = rows[e].len();
            let idx =
                Tensor::<B, 1, Int>::from_data(TensorData::new(rows[e].clone(), [m]), &device);
            let sel =
                Tensor::<B, 1, Int>::from_data(TensorData::new(slots[e].clone(), [m]), &device);
            let xe = self.dropout.forward(xf.clone().select(0, idx.clone())); // [m, in]
            let a = self
                .experts_a
                .val()
                .narrow(0, e, 1)
                .squeeze_dim::<2>(0)
                .cast(dtype); // [r, in]
            let b = self
                .experts_b
                .val()
                .narrow(0, e, 1)
                .squeeze_dim::<2>(0)
                .cast(dtype); // [out, r]
            let w = top_w
                .clone()
                .select(0, sel)
                .cast(dtype)
                .unsqueeze_dim::<2>(1); // [m, 1]
            let he = xe
                .matmul(a.transpose())
                .matmul(b.transpose())
                .mul_scalar(self.scaling)
                * w;
            delta = delta.select_assign(0, idx, he, IndexingUpdateOp::Add);
        }

        // Load-balancing loss: f_i from the (constant) routing counts, P_i carries the gradient.
        let f: Vec<f32> = counts.iter().map(|&c| c as f32 / (n * k) as f32).collect();
        let f = Tensor::<B, 1>::from_data(TensorData::new(f, [e_count]), (&device, DType::F32));
        let p = probs.mean_dim(0).reshape([e_count]);
        stats.record((f * p).sum().mul_scalar(e_count as f64), counts);

        let mut out_dims = dims;
        out_dims[D - 1] = d_out;
        y + delta.reshape(out_dims)
    }

    /// Dense `scaling · B_e·A_e` [out, in] of expert `e`.
    pub fn expert_delta(&self, e: usize) -> Tensor<B, 2> {
        let a = self.experts_a.val().narrow(0, e, 1).squeeze_dim::<2>(0);
        let b = self.experts_b.val().narrow(0, e, 1).squeeze_dim::<2>(0);
        b.matmul(a).mul_scalar(self.scaling)
    }
}
