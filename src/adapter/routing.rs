//! Token routing of a MoE-LoRA layer, as math on tensors: softmax over the router logits, each
//! token's top-k experts (on the device), the gates — and the closed-form backward of that map,
//! which `quant::kernels::routing` uses as one autodiff step instead of ~15 recorded ops.
//!
//! For logits l [N, E]: p = softmax(l); m = the 0/1 mask of each row's k largest p (all ones
//! when k = E); a = p·m; gate = s·a / Σ_e a_e when renormalising (k < E), else s·a, with s the
//! LoRA scaling. The mask is a constant (no gradient through the choice).

use burn::prelude::*;
use burn::tensor::activation::softmax;

/// How a layer routes its tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteOptions {
    /// Experts each token keeps.
    pub top_k: usize,
    /// Renormalise the kept probabilities to sum to 1 (only when top_k < experts).
    pub renormalize: bool,
    /// The LoRA scaling folded into the gate.
    pub scaling: f64,
}

/// Routing of N tokens over E experts.
#[derive(Debug, Clone)]
pub struct Routing<B: Backend> {
    /// s · (kept probabilities, renormalised if asked), zero for the other experts: [N, E].
    pub gate: Tensor<B, 2>,
    /// Router probabilities [N, E] (the load-balancing loss's P).
    pub probs: Tensor<B, 2>,
    /// 0/1 choices [N, E] (constant), `None` when every token keeps every expert.
    pub mask: Option<Tensor<B, 2>>,
}

/// Routes `logits` [N, E] (f32) with tensor ops (under autodiff each op is recorded).
pub fn route_ops<B: Backend>(logits: Tensor<B, 2>, o: RouteOptions) -> Routing<B> {
    let e = logits.dims()[1];
    let probs = softmax(logits, 1);
    if o.top_k >= e {
        // Every token keeps every expert: no mask, the gate is the probabilities (renormalising
        // would divide by 1).
        return Routing {
            gate: probs.clone().mul_scalar(o.scaling),
            probs,
            mask: None,
        };
    }
    let mask = top_k_mask(probs.clone().detach(), o.top_k);
    let mut gate = probs.clone() * mask.clone();
    if o.renormalize {
        gate = gate.clone() / gate.sum_dim(1);
    }
    Routing {
        gate: gate.mul_scalar(o.scaling),
        probs,
        mask: Some(mask),
    }
}

/// d logits [N, E] of `Σ gate·g + Σ probs·q` (`g`, `q` [N, E]: the gradients reaching the
/// gate and the probabilities), from the forward's `probs`, `mask` (ones when dense) and
/// `gate`:
/// da = s·g, or (s·g − Σ_e g_e·gate_e) / Σ_e p_e·m_e when renormalising;
/// dp = da·m + q; dl = p · (dp − Σ_e p_e·dp_e).
pub fn route_backward<B: Backend>(
    probs: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    gate: Tensor<B, 2>,
    g: Tensor<B, 2>,
    q: Tensor<B, 2>,
    o: RouteOptions,
) -> Tensor<B, 2> {
    let e = probs.dims()[1];
    let da = if o.renormalize && o.top_k < e {
        let kept = (probs.clone() * mask.clone()).sum_dim(1); // [N, 1]
        let through_sum = (g.clone() * gate).sum_dim(1); // [N, 1]
        (g.mul_scalar(o.scaling) - through_sum) / kept
    } else {
        g.mul_scalar(o.scaling)
    };
    let dp = da * mask + q;
    let centered = dp.clone() - (probs.clone() * dp).sum_dim(1);
    probs * centered
}

/// 0/1 mask [N, E] of each row's `k` largest probabilities, chosen on the device by `k` rounds
/// of argmax (burn's `topk` sorts on the host: one device read-back per call, per layer).
pub fn top_k_mask<B: Backend>(probs: Tensor<B, 2>, k: usize) -> Tensor<B, 2> {
    let [n, e] = probs.dims();
    let columns = Tensor::<B, 1, Int>::arange(0..e as i64, &probs.device())
        .reshape([1, e])
        .expand([n, e]); // [N, E]: each entry's column index
    let mut mask = probs.zeros_like();
    let mut left = probs; // probabilities of the experts not chosen yet; chosen ones become -1
    for _ in 0..k {
        let best = left.clone().argmax(1).expand([n, e]); // [N, 1] -> [N, E]
        let chosen = columns.clone().equal(best);
        mask = mask.mask_fill(chosen.clone(), 1.0);
        left = left.mask_fill(chosen, -1.0);
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    type Ad = Autodiff<Flex>;

    fn randn(shape: [usize; 2], seed: u64) -> Tensor<Flex, 2> {
        let n = shape[0] * shape[1];
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 20_000) as f32 / 5_000.0 - 2.0
            })
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    /// The closed-form backward equals autodiff through the tensor ops, for top-1 of 2, a
    /// renormalised top-2 of 4 and the dense mixture.
    #[test]
    fn closed_form_backward_matches_autodiff_of_the_ops() {
        let cases = [
            (2, 1, false, 2.0),
            (4, 2, true, 0.5),
            (4, 2, false, 1.0),
            (3, 3, false, 2.0),
            (3, 3, true, 2.0),
        ];
        for (i, &(e, k, renormalize, scaling)) in cases.iter().enumerate() {
            let o = RouteOptions {
                top_k: k,
                renormalize,
                scaling,
            };
            let n = 9;
            let seed = 10 * i as u64;
            let logits = randn([n, e], seed + 1);
            let (g, q) = (randn([n, e], seed + 2), randn([n, e], seed + 3));
            let l = Tensor::<Ad, 2>::from_inner(logits.clone()).require_grad();
            let r = route_ops(l.clone(), o);
            let loss = (r.gate * Tensor::from_inner(g.clone())).sum()
                + (r.probs * Tensor::from_inner(q.clone())).sum();
            let want = l.grad(&loss.backward()).unwrap();

            let plain = route_ops(logits, o);
            let mask = plain.mask.unwrap_or_else(|| plain.probs.ones_like());
            let got = route_backward(plain.probs, mask, plain.gate, g, q, o);
            let err =
                (got - want.clone()).abs().max().into_scalar() / want.abs().max().into_scalar();
            assert!(err < 1e-5, "case {i}: relative error {err:e}");
        }
    }

    #[test]
    fn top_k_mask_marks_each_rows_largest_probabilities() {
        let probs = Tensor::<Flex, 2>::from_floats(
            [
                [0.1, 0.4, 0.2, 0.3],
                [0.7, 0.1, 0.15, 0.05],
                [0.2, 0.2001, 0.3, 0.2999],
            ],
            &Default::default(),
        );
        let top1 = top_k_mask(probs.clone(), 1)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let top2 = top_k_mask(probs, 2).into_data().to_vec::<f32>().unwrap();
        #[rustfmt::skip]
        assert_eq!(top1, vec![0., 1., 0., 0.,  1., 0., 0., 0.,  0., 0., 1., 0.]);
        #[rustfmt::skip]
        assert_eq!(top2, vec![0., 1., 0., 1.,  1., 0., 1., 0.,  0., 0., 1., 1.]);
    }
}
