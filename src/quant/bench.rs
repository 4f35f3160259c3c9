//! `bench nf4`: checks the backend's NF4 kernels against a host reference, then times them on
//! the 4B model's layer shapes next to burn's matmul on a pre-dequantized weight and the
//! portable dequantize-then-matmul path.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Distribution};
use rayon::prelude::*;
use serde::Serialize;

use super::kernels::layer_ops::{self, LayerOps};
use super::kernels::{registered, Nf4Ops, Nf4Parts, GEMV_MAX_ROWS};
use super::{Nf4Linear, Nf4Tensor};
use crate::cli::forward::median;
use crate::error::{Error, Result};

/// The 4B model's NF4 layer shapes as (in, out): q, k/v, o, gate/up, down.
pub const QWEN3_VL_4B_SHAPES: [(usize, usize); 5] = [
    (2560, 4096),
    (2560, 1024),
    (4096, 2560),
    (2560, 9728),
    (9728, 2560),
];

/// One kernel check's (in, out, rows).
pub type CheckCase = (usize, usize, usize);

/// The kernel checks' (in, out, rows): odd sizes, an input width that is not a multiple of 8
/// (no GEMV), rows on both sides of the GEMV limit, the grouped GEMV (several rows) with 1 and 2
/// W rows per warp, the sliced one-row GEMV with 1 and 2 words per lane and 3, 8 and 19 warps
/// (with `QWEN3VL_GEMV=flat`, the flat one with 1 and 2 W rows per warp and x in shared memory
/// at its largest), and real layers.
pub const CHECK_CASES: [CheckCase; 10] = [
    (200, 72, 1),
    (192, 45, 5),
    (256, 60, 3),
    (9728, 2560, 1),
    (4096, 1024, 1),
    (768, 40, 1),
    (264, 40, 33),
    (100, 32, 2),
    (2560, 9728, 8),
    (9728, 2560, 100),
];

/// The checks `bench nf4 --checks NAME` runs: the NF4 layer cases, and whether the fused
/// decoder (and backward), routing, AdamW and gradient-norm kernels are checked too. `all`, `nf4` (every NF4 case), `gemv`
/// (the NF4 cases of at most [`GEMV_MAX_ROWS`] rows), `others` (no NF4 case, the other
/// kernels) or `none`; `None` for any other name.
pub fn check_selection(name: &str) -> Option<(Vec<CheckCase>, bool)> {
    let gemv = || CHECK_CASES.iter().copied().filter(|c| c.2 <= GEMV_MAX_ROWS);
    match name {
        "all" => Some((CHECK_CASES.to_vec(), true)),
        "nf4" => Some((CHECK_CASES.to_vec(), false)),
        "gemv" => Some((gemv().collect(), false)),
        "others" => Some((Vec::new(), true)),
        "none" => Some((Vec::new(), false)),
        _ => None,
    }
}

/// What `bench nf4` runs.
#[derive(Debug, Clone)]
pub struct Nf4BenchOptions {
    /// Layer shapes (in, out).
    pub shapes: Vec<(usize, usize)>,
    /// Row counts for the GEMV (decoding).
    pub gemv_rows: Vec<usize>,
    /// Row counts for the GEMM (prefill, training).
    pub gemm_rows: Vec<usize>,
    /// Compute dtype (f16 or bf16).
    pub dtype: DType,
    /// Calls per timed repeat.
    pub iters: usize,
    /// Timed repeats (the median is reported).
    pub repeats: usize,
}

/// One kernel result against the host reference.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    /// What was checked ("forward" or "backward dX").
    pub what: String,
    /// Layer in, out and rows.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// Rows of x.
    pub rows: usize,
    /// ‖got − ref‖ / ‖ref‖.
    pub rel_err: f64,
}

/// One timing row (per call, median).
#[derive(Debug, Clone, Serialize)]
pub struct TimingRow {
    /// Layer input width.
    pub d_in: usize,
    /// Layer output width.
    pub d_out: usize,
    /// Rows of x.
    pub rows: usize,
    /// Our kernel path (GEMV, or dequantize + matmul), µs.
    pub kernel_us: f64,
    /// burn's matmul on the pre-dequantized weight, µs.
    pub dense_us: f64,
    /// The portable path (burn-op dequantization + matmul), µs.
    pub reference_us: f64,
    /// Packed weight + scale bytes read per µs of the kernel path, GB/s.
    pub weight_gb_s: f64,
    /// The kernel path's device time per call, µs: calls queued behind busy work so they run
    /// back to back, without the host's per-call cost (see `queued_time_per_call`).
    pub queued_us: f64,
    /// Weight bytes per µs of `queued_us`, GB/s.
    pub queued_weight_gb_s: f64,
    /// The pre-dequantized matmul's device time per call, µs (queued like `queued_us`).
    pub dense_queued_us: f64,
    /// 2·rows·in·out / kernel time, TFLOP/s.
    pub kernel_tflops: f64,
    /// The same for the pre-dequantized matmul.
    pub dense_tflops: f64,
}

/// Everything `bench nf4` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Nf4BenchReport {
    /// Kernel vs host reference.
    pub checks: Vec<CheckRow>,
    /// Element-wise copy bandwidth of the device (read + write), GB/s.
    pub copy_gb_s: f64,
    /// Dequantization kernel alone per shape: (in, out, µs).
    pub dequantize_us: Vec<(usize, usize, f64)>,
    /// Timings.
    pub timings: Vec<TimingRow>,
}

/// Largest relative error the f16/bf16 kernels may show against the f64 host reference.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 8e-3,
        _ => 1e-3,
    }
}

fn ops<B: Backend>() -> Result<Nf4Ops<B>> {
    registered::<B>().ok_or_else(|| {
        Error::Input(
            "no NF4 kernels for this backend: `bench nf4` needs a CUDA device \
             (and QWEN3VL_NF4_KERNELS not set to 0)"
                .into(),
        )
    })
}

/// Deterministic pseudo-random values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Rounds to the compute dtype and back, as the device sees the values.
fn rounded(v: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => v
            .iter()
            .map(|x| half::bf16::from_f32(*x).to_f32())
            .collect(),
        DType::F16 => v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}

/// `a [rows, k] · b` with b [n, k] (`transpose_b`) or [k, n], in f64 on the host.
fn host_matmul(
    a: &[f32],
    b: &[f32],
    rows: usize,
    k: usize,
    n: usize,
    transpose_b: bool,
) -> Vec<f64> {
    (0..rows * n)
        .into_par_iter()
        .map(|i| {
            let (r, c) = (i / n, i % n);
            (0..k)
                .map(|j| {
                    let bv = if transpose_b {
                        b[c * k + j]
                    } else {
                        b[j * n + c]
                    };
                    a[r * k + j] as f64 * bv as f64
                })
                .sum()
        })
        .collect()
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let (mut d, mut w) = (0.0f64, 0.0f64);
    for (g, r) in got.iter().zip(want) {
        d += (*g as f64 - r).powi(2);
        w += r * r;
    }
    (d / w.max(f64::MIN_POSITIVE)).sqrt()
}

fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.cast(DType::F32)
        .into_data()
        .to_vec()
        .map_err(|e| Error::Input(format!("reading a result back: {e:?}")))
}

/// Runs the kernels under autodiff on `(in, out, rows)` cases — shapes that are not multiples
/// of any tile, rows on both sides of the GEMV limit — and compares the forward output and the
/// input gradient with the host reference.
pub fn check_kernels<B: AutodiffBackend>(
    cases: &[(usize, usize, usize)],
    dtype: DType,
    device: &B::Device,
) -> Result<Vec<CheckRow>> {
    ops::<B>()?;
    let mut rows_out = Vec::new();
    for (case, &(d_in, d_out, rows)) in cases.iter().enumerate() {
        let w = values(d_in * d_out, case as u64, 0.05);
        let q = Nf4Tensor::quantize(&w, &[d_out, d_in], "float32", 64, true)?;
        let layer = Nf4Linear::<B>::new(&q, None, dtype, device)?;
        let wd = rounded(&q.dequantize(), dtype);
        let x = rounded(&values(rows * d_in, 100 + case as u64, 1.0), dtype);
        let r = rounded(&values(rows * d_out, 200 + case as u64, 1.0), dtype);
        let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [rows, d_in]), device)
            .require_grad();
        let rt = Tensor::<B, 2>::from_data(TensorData::new(r.clone(), [rows, d_out]), device);
        let y = layer.forward(xt.clone());
        let grads = (y.clone().cast(DType::F32) * rt).sum().backward();
        let dx = xt
            .grad(&grads)
            .ok_or_else(|| Error::Input("no input gradient".into()))?;
        let want_y = host_matmul(&x, &wd, rows, d_in, d_out, true);
        let want_dx = host_matmul(&r, &wd, rows, d_out, d_in, false);
        for (what, got, want) in [
            ("forward", to_f32(y)?, want_y),
            ("backward dX", to_f32(dx)?, want_dx),
        ] {
            rows_out.push(CheckRow {
                what: what.into(),
                d_in,
                d_out,
                rows,
                rel_err: rel_err(&got, &want),
            });
        }
    }
    Ok(rows_out)
}

/// A kernel's result against the same computation by tensor ops on the same device, as a
/// [`CheckRow`] for `(d_in, d_out, rows)` (an unreadable result counts as an infinite error).
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

/// Prints one line per check; returns how many are above the tolerance.
pub fn print_checks(checks: &[CheckRow], dtype: DType) -> usize {
    let limit = tolerance(dtype);
    for c in checks {
        let verdict = if c.rel_err <= limit { "ok" } else { "FAILED" };
        println!(
            "check {:<11} {:>5}->{:<5} rows {:>3}: rel err {:.2e} {verdict}",
            c.what, c.d_in, c.d_out, c.rows, c.rel_err
        );
    }
    checks.iter().filter(|c| c.rel_err > limit).count()
}

/// Waits for `device` to finish its queued work.
fn sync<B: Backend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| Error::Input(format!("device error: {e:?}")))
}

/// Median seconds per call of `f` (`iters` calls per repeat, results kept until the device
/// has finished them).
fn time_per_call<B: Backend, T>(
    device: &B::Device,
    o: &Nf4BenchOptions,
    mut f: impl FnMut() -> T,
) -> Result<f64> {
    let sync = || sync::<B>(device);
    for _ in 0..3 {
        drop(f());
    }
    sync()?;
    let mut per_call = Vec::new();
    for _ in 0..o.repeats {
        let start = Instant::now();
        let outs: Vec<T> = (0..o.iters).map(|_| f()).collect();
        sync()?;
        per_call.push(start.elapsed().as_secs_f64() / o.iters as f64);
        drop(outs);
    }
    Ok(median(&per_call).unwrap_or(f64::NAN))
}

/// Device-side seconds per call of `f`: `o.iters` calls queued behind `rounds` element-wise
/// passes over `busy`, which keep the device working while the host enqueues the calls, so the
/// calls run back to back without the host's per-call cost: (time of busy + calls − time of
/// busy alone) / calls, the median of `o.repeats`. `rounds` must cover the host's enqueue time.
fn queued_time_per_call<B: Backend, T>(
    device: &B::Device,
    o: &Nf4BenchOptions,
    busy: &Tensor<B, 1>,
    rounds: usize,
    mut f: impl FnMut() -> T,
) -> Result<f64> {
    let sync = || sync::<B>(device);
    let keep_busy = || (0..rounds).for_each(|_| drop(busy.clone().add_scalar(1.0)));
    sync()?;
    let mut per_call = Vec::new();
    for _ in 0..o.repeats {
        let start = Instant::now();
        keep_busy();
        sync()?;
        let alone = start.elapsed().as_secs_f64();
        let start = Instant::now();
        keep_busy();
        let outs: Vec<T> = (0..o.iters).map(|_| f()).collect();
        sync()?;
        let with_calls = start.elapsed().as_secs_f64();
        drop(outs);
        per_call.push((with_calls - alone) / o.iters as f64);
    }
    Ok(median(&per_call).unwrap_or(f64::NAN))
}

/// Times the kernels on `device` (a backend with registered NF4 kernels).
pub fn bench_nf4<B: Backend>(
    o: &Nf4BenchOptions,
    checks: Vec<CheckRow>,
    device: &B::Device,
) -> Result<Nf4BenchReport> {
    let ops = ops::<B>()?;
    // 256 Mi values of the compute dtype, read and written once per call.
    let big = Tensor::<B, 1>::random([1 << 28], Distribution::Default, device).cast(o.dtype);
    let copy_s = time_per_call::<B, _>(device, o, || big.clone().add_scalar(1.0))?;
    let copy_gb_s = 2.0 * (1u64 << 28) as f64 * o.dtype.size() as f64 / copy_s / 1e9;
    eprintln!("element-wise copy: {copy_gb_s:.0} GB/s");
    let mut report = Nf4BenchReport {
        checks,
        copy_gb_s,
        dequantize_us: Vec::new(),
        timings: Vec::new(),
    };
    for (i, &(d_in, d_out)) in o.shapes.iter().enumerate() {
        let w = values(d_in * d_out, 1000 + i as u64, 0.05);
        let q = Nf4Tensor::quantize(&w, &[d_out, d_in], "float32", 64, true)?;
        let layer = Nf4Linear::<B>::new(&q, None, o.dtype, device)?;
        let parts = Nf4Parts::of(&layer);
        let weight_bytes = (d_in * d_out) as f64 * (0.5 + 1.0 / 64.0);
        let deq = time_per_call::<B, _>(device, o, || (ops.dequantize)(&parts))?;
        report.dequantize_us.push((d_in, d_out, deq * 1e6));
        let dense_t = (ops.dequantize)(&parts).transpose(); // [in, out]
        for &rows in o.gemv_rows.iter().chain(&o.gemm_rows) {
            let x =
                Tensor::<B, 2>::random([rows, d_in], Distribution::Default, device).cast(o.dtype);
            let kernel = time_per_call::<B, _>(device, o, || (ops.matmul)(x.clone(), &parts))?;
            // Busy passes covering twice the calls' wall time (their host cost bounds it).
            let rounds = ((2.0 * o.iters as f64 * kernel / copy_s).ceil() as usize).clamp(1, 64);
            let queued = queued_time_per_call::<B, _>(device, o, &big, rounds, || {
                (ops.matmul)(x.clone(), &parts)
            })?;
            let dense = time_per_call::<B, _>(device, o, || x.clone().matmul(dense_t.clone()))?;
            let dense_queued = queued_time_per_call::<B, _>(device, o, &big, rounds, || {
                x.clone().matmul(dense_t.clone())
            })?;
            let reference = time_per_call::<B, _>(device, o, || {
                x.clone().matmul(parts.dequantize_reference().transpose())
            })?;
            let flops = 2.0 * (rows * d_in * d_out) as f64;
            let row = TimingRow {
                d_in,
                d_out,
                rows,
                kernel_us: kernel * 1e6,
                dense_us: dense * 1e6,
                reference_us: reference * 1e6,
                weight_gb_s: weight_bytes / kernel / 1e9,
                queued_us: queued * 1e6,
                queued_weight_gb_s: weight_bytes / queued / 1e9,
                dense_queued_us: dense_queued * 1e6,
                kernel_tflops: flops / kernel / 1e12,
                dense_tflops: flops / dense / 1e12,
            };
            eprintln!(
                "{d_in:>5}->{d_out:<5} rows {rows:>4}: kernel {:>8.1} us ({:>6.0} GB/s, {:>6.1} \
                 TFLOP/s; queued {:>6.1} us, {:>6.0} GB/s) | dense {:>8.1} us ({:>6.1} TFLOP/s; \
                 queued {:>6.1} us) | reference {:>8.1} us",
                row.kernel_us,
                row.weight_gb_s,
                row.kernel_tflops,
                row.queued_us,
                row.queued_weight_gb_s,
                row.dense_us,
                row.dense_tflops,
                row.dense_queued_us,
                row.reference_us
            );
            report.timings.push(row);
        }
    }
    drop(big);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn options() -> Nf4BenchOptions {
        Nf4BenchOptions {
            shapes: Vec::new(),
            gemv_rows: Vec::new(),
            gemm_rows: Vec::new(),
            dtype: DType::F32,
            iters: 4,
            repeats: 3,
        }
    }

    /// The queued timing runs the calls it is given (and the busy passes) and gives a finite
    /// per-call time on any backend.
    #[test]
    fn check_selection_names_its_cases() {
        let (all, others) = check_selection("all").unwrap();
        assert_eq!((all.len(), others), (CHECK_CASES.len(), true));
        let (gemv, others) = check_selection("gemv").unwrap();
        assert!(!others && !gemv.is_empty() && gemv.len() < all.len());
        assert!(gemv.iter().all(|c| c.2 <= GEMV_MAX_ROWS));
        assert_eq!(check_selection("none"), Some((Vec::new(), false)));
        assert_eq!(check_selection("others"), Some((Vec::new(), true)));
        assert_eq!(check_selection("some"), None);
    }

    #[test]
    fn queued_timing_runs_every_call_and_is_finite() {
        let dev = Default::default();
        let o = options();
        let busy = Tensor::<Flex, 1>::ones([1 << 16], &dev);
        let x = Tensor::<Flex, 2>::ones([64, 64], &dev);
        let mut calls = 0;
        let t = queued_time_per_call::<Flex, _>(&dev, &o, &busy, 3, || {
            calls += 1;
            x.clone().matmul(x.clone())
        })
        .unwrap();
        assert_eq!(calls, o.iters * o.repeats);
        assert!(t.is_finite(), "{t}");
    }
}
