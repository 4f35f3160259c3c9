//! Rotary position embeddings: the text decoder's interleaved 3-axis M-RoPE and the vision
//! tower's 2-D (row, column) RoPE. Both rotate half-splits (`rotate_half`), as HF does.

use burn::prelude::*;
use burn::tensor::DType;

use super::layers::{rms_norm_ops, RmsNorm};
use super::position_ids::PositionIds;
use crate::quant::kernels::layer_ops;

/// Which axis (0 = t, 1 = h, 2 = w) drives each of the head_dim / 2 frequency slots.
///
/// Interleaved layout: slot j < 3·section[1] with j ≡ 1 (mod 3) is h, j < 3·section[2] with
/// j ≡ 2 (mod 3) is w, every other slot is t (section[0] is never read).
pub fn mrope_axis_of_slot(half: usize, section: [usize; 3]) -> Vec<usize> {
    (0..half)
        .map(|j| {
            if j % 3 == 1 && j < 3 * section[1] {
                1
            } else if j % 3 == 2 && j < 3 * section[2] {
                2
            } else {
                0
            }
        })
        .collect()
}

/// `1 / theta^(2j / dim)` for j in 0..dim/2, rounded to f32 like HF's buffers.
pub fn inverse_frequencies(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|j| (1.0 / theta.powf((2 * j) as f64 / dim as f64)) as f32)
        .collect()
}

/// Text M-RoPE tables: cos and sin, each [B, 1, T, head_dim], cast to `dtype` (as HF does).
pub fn text_cos_sin<B: Backend>(
    positions: &PositionIds,
    head_dim: usize,
    theta: f64,
    section: [usize; 3],
    dtype: DType,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let (b, t) = (positions.batch, positions.len);
    let inv = inverse_frequencies(head_dim, theta);
    let axis = mrope_axis_of_slot(head_dim / 2, section);
    let half = head_dim / 2;
    let mut cos = vec![0f32; b * t * head_dim];
    let mut sin = vec![0f32; b * t * head_dim];
    for bi in 0..b {
        for ti in 0..t {
            let base = (bi * t + ti) * head_dim;
            for j in 0..half {
                let p = positions.get(axis[j], bi, ti) as f32;
                let angle = p * inv[j];
                let (s, c) = angle.sin_cos();
                cos[base + j] = c;
                cos[base + j + half] = c;
                sin[base + j] = s;
                sin[base + j + half] = s;
            }
        }
    }
    let make = |v: Vec<f32>| {
        Tensor::<B, 4>::from_data(
            TensorData::new(v, [b, 1, t, head_dim]),
            (device, DType::F32),
        )
        .cast(dtype)
    };
    (make(cos), make(sin))
}

/// Vision 2-D RoPE tables, f32, each [N, 1, head_dim], for patches at `(row, col)`.
///
/// The first head_dim/4 slots rotate with the row, the next head_dim/4 with the column, and the
/// pattern repeats for the second half.
pub fn vision_cos_sin<B: Backend>(
    rows_cols: &[(usize, usize)],
    head_dim: usize,
    theta: f64,
    device: &B::Device,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let quarter = head_dim / 4;
    let inv = inverse_frequencies(head_dim / 2, theta); // quarter frequencies
    let n = rows_cols.len();
    let mut cos = vec![0f32; n * head_dim];
    let mut sin = vec![0f32; n * head_dim];
    for (i, &(r, c)) in rows_cols.iter().enumerate() {
        for k in 0..quarter {
            for (offset, pos) in [(0, r), (quarter, c)] {
                let (s, co) = (pos as f32 * inv[k]).sin_cos();
                for half in [0, 2 * quarter] {
                    cos[i * head_dim + half + offset + k] = co;
                    sin[i * head_dim + half + offset + k] = s;
                }
            }
        }
    }
    let make = |v: Vec<f32>| {
        Tensor::<B, 3>::from_data(TensorData::new(v, [n, 1, head_dim]), (device, DType::F32))
    };
    (make(cos), make(sin))
}

/// `x·cos + rotate_half(x)·sin` over the last dimension; `cos`/`sin` broadcast against `x`.
pub fn apply_rotary<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    cos: Tensor<B, D>,
    sin: Tensor<B, D>,
) -> Tensor<B, D> {
    let d = x.dims()[D - 1];
    let first = x.clone().narrow(D - 1, 0, d / 2);
    let second = x.clone().narrow(D - 1, d / 2, d / 2);
    let rotated = Tensor::cat(vec![second.neg(), first], D - 1);
    x * cos + rotated * sin
}

/// A head's q/k RMSNorm followed by the rotary rotation: x [B, H, T, d], cos/sin [B, 1, T, d].
/// One fused kernel where the backend registered one (burn-cuda), else the tensor ops.
pub fn norm_and_rotate<B: Backend>(
    norm: &RmsNorm<B>,
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    match layer_ops::registered::<B>() {
        Some(fused) => (fused.rms_norm_rotary)(x, norm.weight.val(), norm.eps, cos, sin),
        None => rms_norm_rotary_ops(x, norm.weight.val(), norm.eps, cos, sin),
    }
}

/// [`norm_and_rotate`] with tensor ops: [`rms_norm_ops`], then [`apply_rotary`].
pub fn rms_norm_rotary_ops<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 1>,
    eps: f64,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    apply_rotary(rms_norm_ops(x, weight, eps), cos.clone(), sin.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_slots_match_the_spec() {
        // 4B: head_dim 128, [24, 20, 20]: h = 1, 4, ..., 58; w = 2, 5, ..., 59; t elsewhere.
        let axis = mrope_axis_of_slot(64, [24, 20, 20]);
        assert_eq!(axis.iter().filter(|&&a| a == 1).count(), 20);
        assert_eq!(axis.iter().filter(|&&a| a == 2).count(), 20);
        assert_eq!(axis.iter().filter(|&&a| a == 0).count(), 24);
        assert_eq!(&axis[..6], &[0, 1, 2, 0, 1, 2]);
        assert_eq!(&axis[57..], &[0, 1, 2, 0, 0, 0, 0]);
        // Tiny: head_dim 32, [8, 4, 4]: h = 1, 4, 7, 10; w = 2, 5, 8, 11.
        let axis = mrope_axis_of_slot(16, [8, 4, 4]);
        assert_eq!(axis, vec![0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 0, 0]);
    }
}
