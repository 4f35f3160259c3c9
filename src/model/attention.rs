//! Scaled dot-product attention with grouped key/value heads and an f32 softmax.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::DType;

use crate::quant::kernels::layer_ops;

/// `softmax(q·kᵀ / √d + mask) · v` with `Hq / Hkv` query heads sharing each KV head.
///
/// * `q`: [B, Hq, L, d]; `k`, `v`: [B, Hkv, S, d]
/// * `mask`: [B, 1, L, S], `true` = not attended (broadcast over heads)
///
/// Query head `h` uses KV head `h / (Hq / Hkv)`, as HF's `repeat_kv`. KV heads are not
/// repeated in memory: the query heads of a group are stacked along the length axis instead.
/// Scores and softmax are computed in f32 and the probabilities cast back to the input dtype.
/// Returns [B, Hq, L, d].
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    let [b, hq, l, d] = q.dims();
    let [_, hkv, s, _] = k.dims();
    let rep = hq / hkv;
    let dtype = q.dtype();
    // [B, Hq, L, d] -> [B, Hkv, rep·L, d]: the rep query heads of a group share K and V.
    let q = q.reshape([b, hkv, rep * l, d]);
    let scale = (d as f64).powf(-0.5);
    let scores = q.matmul(k.swap_dims(2, 3)); // [B, Hkv, rep·L, S]
    let probs = match (mask, layer_ops::registered::<B>()) {
        (Some(mask), _) => {
            // [B, Hkv, rep·L, S] -> [B, Hkv, rep, L, S] to broadcast the [B, 1, 1, L, S] mask.
            let scores = scores
                .cast(DType::F32)
                .mul_scalar(scale)
                .reshape([b, hkv, rep, l, s]);
            let mask = mask.unsqueeze_dim::<5>(2).expand([b, hkv, rep, l, s]);
            let probs = softmax(scores.mask_fill(mask, f32::MIN), 4);
            probs.reshape([b, hkv, rep * l, s]).cast(dtype)
        }
        // One fused kernel over the [B·Hkv·rep·L, S] rows where the backend registered one.
        (None, Some(fused)) => {
            let rows = scores.reshape([b * hkv * rep * l, s]);
            (fused.softmax_scaled)(rows, scale).reshape([b, hkv, rep * l, s])
        }
        (None, None) => softmax_scaled_ops(scores, scale),
    };
    probs.matmul(v).reshape([b, hq, l, d])
}

/// `cast(softmax(scale · f32(x)))` over the last axis with tensor ops (what the fused
/// `softmax_scaled` kernel computes in one launch).
pub fn softmax_scaled_ops<B: Backend, const D: usize>(x: Tensor<B, D>, scale: f64) -> Tensor<B, D> {
    let dtype = x.dtype();
    softmax(x.cast(DType::F32).mul_scalar(scale), D - 1).cast(dtype)
}

/// Causal + padding mask [B, 1, T, T] (`true` = masked) for `attention_mask` [B, T] (1 = token).
///
/// A padded query row keeps its own diagonal so it never sees an empty row (its output is
/// unused; HF leaves such rows unspecified too).
pub fn causal_padding_mask<B: Backend>(
    attention_mask: Option<&[i64]>,
    batch: usize,
    len: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let mut m = vec![false; batch * len * len];
    for b in 0..batch {
        for i in 0..len {
            for j in 0..len {
                let pad = attention_mask.is_some_and(|am| am[b * len + j] == 0);
                m[(b * len + i) * len + j] = j > i || (pad && i != j);
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [batch, 1, len, len]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    type B = burn::backend::Flex;

    /// GQA without copies equals explicit head repetition.
    #[test]
    fn grouped_heads_match_repeated_kv() {
        let dev = Default::default();
        let dist = burn::tensor::Distribution::Normal(0.0, 1.0);
        let q = Tensor::<B, 4>::random([2, 4, 5, 8], dist, &dev);
        let k = Tensor::<B, 4>::random([2, 2, 5, 8], dist, &dev);
        let v = Tensor::<B, 4>::random([2, 2, 5, 8], dist, &dev);
        let mask = causal_padding_mask::<B>(Some(&[0, 1, 1, 1, 1, 1, 1, 1, 1, 1]), 2, 5, &dev);
        let got = attention(q.clone(), k.clone(), v.clone(), Some(mask.clone()));
        // Reference: repeat each KV head twice (heads 0,1 -> kv 0; 2,3 -> kv 1).
        let rep = |t: Tensor<B, 4>| {
            Tensor::cat((0..4).map(|h| t.clone().narrow(1, h / 2, 1)).collect(), 1)
        };
        let (k4, v4) = (rep(k), rep(v));
        let scores = q.matmul(k4.swap_dims(2, 3)).div_scalar(8f64.sqrt());
        let scores = scores.mask_fill(mask.expand([2, 4, 5, 5]), f32::MIN);
        let want = softmax(scores, 3).matmul(v4);
        let diff = (got - want).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }
}
