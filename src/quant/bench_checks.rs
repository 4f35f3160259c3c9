//! `bench nf4`'s checks of the other CUDA kernels against their tensor-op versions on the same
//! device: the fused layer kernels and their backwards, routing, AdamW and the gradient norm.

use burn::prelude::*;
use burn::tensor::DType;

use super::bench::{rel_err, to_f32, values, CheckRow};
use super::kernels::layer_ops::{self, LayerOps};

/// One check row: `got` against `want` (both on the device), relative L2 error.
fn device_check<B: Backend, const D: usize>(
    what: &str,
    (d_in, d_out, rows): (usize, usize, usize),
    got: Tensor<B, D>,
    want: Tensor<B, D>,
) -> CheckRow {
    let rel_err = match (to_f32(got), to_f32(want)) {
        (Ok(g), Ok(w)) => rel_err(&g, &w.iter().map(|&v| v as f64).collect::<Vec<_>>()),
        _ => f64::INFINITY,
    };
    CheckRow {
        what: what.into(),
        d_in,
        d_out,
        rows,
        rel_err,
    }
}

/// [`values`] as a `dtype` tensor of shape `dims` on `device`.
fn device_values<B: Backend, const D: usize>(
    dims: [usize; D],
    seed: u64,
    scale: f32,
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, D> {
    let n = dims.iter().product();
    Tensor::<B, 1>::from_data(TensorData::new(values(n, seed, scale), [n]), device)
        .cast(dtype)
        .reshape(dims)
}

/// Checks backend `B`'s registered layer kernels against their tensor-op versions on the same
/// device, for `dtype` inputs of the decoder's widths and odd sizes; `None` if nothing is
/// registered. Each row's `d_in`/`d_out` is the row width.
pub fn check_layer_ops<B: Backend>(dtype: DType, device: &B::Device) -> Option<Vec<CheckRow>> {
    let fused = layer_ops::registered::<B>()?;
    let reference = LayerOps::<B>::reference();
    let mut out = Vec::new();
    for (i, (rows, d)) in [(1, 2560), (7, 128), (33, 2560), (300, 1024), (5, 100)]
        .into_iter()
        .enumerate()
    {
        let x: Tensor<B, 2> = device_values([rows, d], 300 + i as u64, 3.0, dtype, device);
        let w: Tensor<B, 1> = device_values([d], 400 + i as u64, 2.0, dtype, device);
        let got = (fused.rms_norm)(x.clone(), w.clone(), 1e-6);
        let want = (reference.rms_norm)(x, w, 1e-6);
        out.push(device_check("rms_norm", (d, d, rows), got, want));
    }
    for (i, (rows, d)) in [(1, 2560), (8, 2560), (121, 2560), (5, 100)]
        .into_iter()
        .enumerate()
    {
        let x: Tensor<B, 2> = device_values([rows, d], 1500 + i as u64, 3.0, dtype, device);
        let delta: Tensor<B, 2> = device_values([rows, d], 1600 + i as u64, 1.0, dtype, device);
        let w: Tensor<B, 1> = device_values([d], 1700 + i as u64, 2.0, dtype, device);
        let (sum, normed) = (fused.add_rms_norm)(x.clone(), delta.clone(), w.clone(), 1e-6);
        let (want_sum, want_normed) = (reference.add_rms_norm)(x, delta, w, 1e-6);
        out.push(device_check("add (+norm)", (d, d, rows), sum, want_sum));
        out.push(device_check("add+norm", (d, d, rows), normed, want_normed));
    }
    // [B, T, H, d] seen as [B, H, T, d], as the attention's heads are.
    for (i, (b, h, t, d)) in [
        (1, 32, 1, 128),
        (2, 8, 7, 128),
        (1, 32, 121, 128),
        (3, 4, 5, 64),
    ]
    .into_iter()
    .enumerate()
    {
        let x: Tensor<B, 4> = device_values([b, t, h, d], 500 + i as u64, 3.0, dtype, device);
        let x = x.swap_dims(1, 2);
        let w: Tensor<B, 1> = device_values([d], 600 + i as u64, 2.0, dtype, device);
        let cos: Tensor<B, 4> = device_values([b, 1, t, d], 700 + i as u64, 1.0, dtype, device);
        let sin: Tensor<B, 4> = device_values([b, 1, t, d], 800 + i as u64, 1.0, dtype, device);
        let got = (fused.rms_norm_rotary)(x.clone(), w.clone(), 1e-6, &cos, &sin);
        let want = (reference.rms_norm_rotary)(x, w, 1e-6, &cos, &sin);
        out.push(device_check("norm+rotary", (d, d, b * h * t), got, want));
    }
    for (i, (rows, s)) in [(32, 184), (7, 1), (64, 1000), (5, 33)]
        .into_iter()
        .enumerate()
    {
        let x: Tensor<B, 2> = device_values([rows, s], 900 + i as u64, 20.0, dtype, device);
        let got = (fused.softmax_scaled)(x.clone(), 0.088);
        let want = (reference.softmax_scaled)(x, 0.088);
        out.push(device_check("softmax", (s, s, rows), got, want));
    }
    for (i, (rows, d)) in [(1, 9728), (7, 100), (121, 9728)].into_iter().enumerate() {
        let g: Tensor<B, 2> = device_values([rows, d], 1000 + i as u64, 4.0, dtype, device);
        let u: Tensor<B, 2> = device_values([rows, d], 1100 + i as u64, 2.0, dtype, device);
        let got = (fused.swiglu)(g.clone(), u.clone());
        let want = (reference.swiglu)(g, u);
        out.push(device_check("swiglu", (d, d, rows), got, want));
    }
    Some(out)
}

/// Checks backend `B`'s registered routing kernels (f32) against the tensor-op versions on the
/// same device: the packed [gate | probs], the mask and the logits gradient, for top-1 of 2
/// (the reference), a renormalised top-2 of 4 and a dense 3 of 3; `None` if none registered.
/// Each row's `d_in` is E, `d_out` top-k.
pub fn check_routing_kernels<B: Backend>(device: &B::Device) -> Option<Vec<CheckRow>> {
    use super::kernels::routing::{registered_kernels, RouteKernels};
    use crate::adapter::routing::RouteOptions;
    let fused = registered_kernels::<B>()?;
    let reference = RouteKernels::<B>::reference();
    let mut out = Vec::new();
    for (i, (n, e, k, renormalize)) in [(960, 2, 1, false), (37, 4, 2, true), (5, 3, 3, false)]
        .into_iter()
        .enumerate()
    {
        let o = RouteOptions {
            top_k: k,
            renormalize,
            scaling: 2.0,
        };
        let logits = device_values([n, e], 1300 + i as u64, 3.0, DType::F32, device);
        let grad = device_values([n, 2 * e], 1400 + i as u64, 3.0, DType::F32, device);
        let (packed, mask) = (fused.forward)(logits.clone(), o);
        let (want_packed, want_mask) = (reference.forward)(logits, o);
        let got_dl = (fused.backward)(packed.clone(), mask.clone(), grad.clone(), o);
        let want_dl = (reference.backward)(want_packed.clone(), want_mask.clone(), grad, o);
        for (what, got, want) in [
            ("route fwd", packed, want_packed),
            ("route mask", mask, want_mask),
            ("route bwd", got_dl, want_dl),
        ] {
            out.push(device_check(what, (e, k, n), got, want));
        }
    }
    Some(out)
}

/// Checks backend `B`'s registered AdamW kernel against the same update in tensor ops on the same
/// device: a first update (moments from zero) and a second one with weight decay and a gradient
/// scale, for a MoE-LoRA expert matrix's size and odd sizes; `None` if none is registered. Each
/// row's `d_in` is the step, `rows` the element count.
pub fn check_adamw_kernel<B: Backend>(device: &B::Device) -> Option<Vec<CheckRow>> {
    use super::kernels::adamw::{registered, step_ops, AdamWScalars};
    let kernel = registered::<B>()?;
    let mut out = Vec::new();
    for (i, n) in [2 * 8 * 9728, 1000, 257].into_iter().enumerate() {
        let seed = 1500 + 10 * i as u64;
        let p = device_values([n], seed, 1.0, DType::F32, device);
        let m = device_values([n], seed + 1, 0.1, DType::F32, device);
        let v = device_values([n], seed + 2, 0.01, DType::F32, device).abs();
        let g = device_values([n], seed + 3, 0.5, DType::F32, device);
        for (time, moments, weight_decay, grad_scale) in
            [(1, None, 0.0, 1.0), (4, Some((m, v)), 0.01, 0.25)]
        {
            let s = AdamWScalars {
                lr: 1e-3,
                beta_1: 0.9,
                beta_2: 0.999,
                epsilon: 1e-8,
                weight_decay,
                time,
                grad_scale,
            };
            let got = (kernel.step)(p.clone(), g.clone(), moments.clone(), s);
            let want = step_ops(p.clone(), g.clone(), moments, s);
            // The parameter's change, not the parameter: lr·step is ~1e-3 of p.
            let (dp_got, dp_want) = (got.0 - p.clone(), want.0 - p.clone());
            for (what, a, b) in [
                ("adamw dp", dp_got, dp_want),
                ("adamw m", got.1, want.1),
                ("adamw v", got.2, want.2),
            ] {
                out.push(device_check(what, (time, 1, n), a, b));
            }
        }
    }
    Some(out)
}

/// Checks backend `B`'s registered layer backward kernels against their tensor-op closed forms
/// on the same device in `dtype`: the 4B's norm width, q/k head rows read through a swapped
/// view, and SwiGLU at the MLP width; `None` if none are registered.
pub fn check_layer_grads<B: Backend>(dtype: DType, device: &B::Device) -> Option<Vec<CheckRow>> {
    use super::kernels::layer_grads::{registered, LayerGrads};
    let (fused, reference) = (registered::<B>()?, LayerGrads::<B>::reference());
    let mut out = Vec::new();
    for (i, (rows, d)) in [(121, 2560), (5, 100)].into_iter().enumerate() {
        let seed = 1700 + 10 * i as u64;
        let x = device_values::<B, 2>([rows, d], seed, 2.0, dtype, device);
        let w = device_values::<B, 1>([d], seed + 1, 1.5, dtype, device);
        let dy = device_values::<B, 2>([rows, d], seed + 2, 1.0, dtype, device);
        let got = (fused.rms_norm)(x.clone(), w.clone(), dy.clone(), 1e-6);
        let want = (reference.rms_norm)(x, w, dy, 1e-6);
        out.push(device_check("norm bwd", (d, d, rows), got, want));
    }
    for (i, (b, h, t, d)) in [(2, 32, 121, 128), (1, 3, 7, 64)].into_iter().enumerate() {
        let seed = 1750 + 10 * i as u64;
        let x = device_values::<B, 4>([b, t, h, d], seed, 2.0, dtype, device).swap_dims(1, 2);
        let w = device_values::<B, 1>([d], seed + 1, 1.5, dtype, device);
        let cos = device_values::<B, 4>([b, 1, t, d], seed + 2, 1.0, dtype, device);
        let sin = device_values::<B, 4>([b, 1, t, d], seed + 3, 1.0, dtype, device);
        let dy = device_values::<B, 4>([b, h, t, d], seed + 4, 1.0, dtype, device);
        let args = (x, w, cos, sin, dy);
        let got = (fused.rms_norm_rotary)(
            args.0.clone(),
            args.1.clone(),
            1e-6,
            args.2.clone(),
            args.3.clone(),
            args.4.clone(),
        );
        let want = (reference.rms_norm_rotary)(args.0, args.1, 1e-6, args.2, args.3, args.4);
        out.push(device_check("rotary bwd", (d, d, b * h * t), got, want));
    }
    for (i, (rows, n)) in [(121, 9728), (7, 100)].into_iter().enumerate() {
        let seed = 1800 + 10 * i as u64;
        let g = device_values::<B, 2>([rows, n], seed, 4.0, dtype, device);
        let u = device_values::<B, 2>([rows, n], seed + 1, 2.0, dtype, device);
        let d = device_values::<B, 2>([rows, n], seed + 2, 1.0, dtype, device);
        let got = (fused.swiglu)(g.clone(), u.clone(), d.clone());
        let want = (reference.swiglu)(g, u, d);
        out.push(device_check("swiglu dg", (n, n, rows), got.0, want.0));
        out.push(device_check("swiglu du", (n, n, rows), got.1, want.1));
    }
    Some(out)
}

/// Checks backend `B`'s registered gradient-norm kernel against the tensor ops on the same
/// device, on MoE-LoRA-like gradients: contiguous, permuted (a B matrix's gradient is a
/// swapped view), a strided narrow and an odd length; `None` if none is registered. The row's
/// `rows` is the gradients' element count.
pub fn check_grad_norm_kernel<B: Backend>(device: &B::Device) -> Option<Vec<CheckRow>> {
    use super::kernels::grad_norm::{registered, sq_sum_ops};
    let kernel = registered::<B>()?;
    let a = device_values::<B, 3>([2, 8, 2560], 1600, 0.5, DType::F32, device);
    let b = device_values::<B, 3>([2, 8, 9728], 1601, 0.5, DType::F32, device).swap_dims(1, 2);
    let narrow = device_values::<B, 2>([40, 33], 1602, 2.0, DType::F32, device).narrow(1, 3, 17);
    let odd = device_values::<B, 1>([4097], 1603, 1.0, DType::F32, device);
    let grads = || {
        vec![
            a.clone().into_primitive().tensor(),
            b.clone().into_primitive().tensor(),
            narrow.clone().into_primitive().tensor(),
            odd.clone().into_primitive().tensor(),
        ]
    };
    let n = 2 * 8 * (2560 + 9728) + 40 * 17 + 4097;
    let got = (kernel.sq_sum)(grads())?;
    let want = sq_sum_ops::<B>(grads())?;
    Some(vec![device_check("grad norm", (1, 1, n), got, want)])
}
