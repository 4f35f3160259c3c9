//! `bench nf4`: checks the backend's NF4 kernels against a host reference, then times them on
//! the 4B model's layer shapes next to burn's matmul on a pre-dequantized weight and the
//! portable dequantize-then-matmul path.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Distribution};
use rayon::prelude::*;
use serde::Serialize;

use super::kernels::{registered, Nf4Ops, Nf4Parts, GEMV_MAX_ROWS};
use super::{Nf4Linear, Nf4Tensor};
use crate::cli::forward::median;
use crate::error::{Error, Result};

pub use super::bench_checks::{
    check_adamw_kernel, check_grad_norm_kernel, check_layer_grads, check_layer_ops,
    check_routing_kernels,
};

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
/// W rows per warp, the one-row tensor-core GEMV (the default for one row since session 25)
/// with 2, 10, 13 and 16 warps, W in registers or through one ring slot (512, 2560, 4096 and
/// 9728 inputs), the sliced one-row GEMV where that one does not fit (200 inputs, 40 outputs;
/// with `QWEN3VL_GEMV=sliced` on all one-row cases: 1 and 2 words per lane, 3, 8 and 19 warps;
/// with `QWEN3VL_GEMV=flat`, the flat one with 1 and 2 W rows per warp and x in shared memory
/// at its largest), the tiled GEMM with partial tiles on both sides (forward, then its
/// transposed backward), on a real layer, real layers, and the tensor-core GEMV with a warp of
/// fewer blocks (640 inputs: 10 blocks over warps of 4), 3, 5 and 8 rows of x, and outputs
/// whose rows CubeCL pads (48 values).
pub const CHECK_CASES: [CheckCase; 18] = [
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
    (320, 72, 37),
    (200, 128, 20),
    (2560, 1024, 128),
    (640, 48, 5),
    (2560, 1024, 3),
    (2560, 48, 8),
    (2560, 9728, 1),
    (512, 48, 1),
];

/// The checks `bench nf4 --checks NAME` runs: the NF4 layer cases, and whether the fused
/// decoder (and backward), routing, AdamW and gradient-norm kernels are checked too. `all`, `nf4` (every NF4 case), `gemv`
/// (the NF4 cases of at most [`GEMV_MAX_ROWS`] rows), `gemm` (the other NF4 cases), `others`
/// (no NF4 case, the other
/// kernels) or `none`; `None` for any other name.
pub fn check_selection(name: &str) -> Option<(Vec<CheckCase>, bool)> {
    let gemv = || CHECK_CASES.iter().copied().filter(|c| c.2 <= GEMV_MAX_ROWS);
    match name {
        "all" => Some((CHECK_CASES.to_vec(), true)),
        "nf4" => Some((CHECK_CASES.to_vec(), false)),
        "gemv" => Some((gemv().collect(), false)),
        "gemm" => Some((
            CHECK_CASES
                .iter()
                .copied()
                .filter(|c| c.2 > GEMV_MAX_ROWS)
                .collect(),
            false,
        )),
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
    /// The element-wise copy at each shape's packed size (read + write of as many bytes as the
    /// GEMV reads; an `abs`, so a profiler can tell it from the other passes): (in, out, GB/s).
    pub copy_at_size_gb_s: Vec<(usize, usize, f64)>,
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
pub(super) fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
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

pub(super) fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let (mut d, mut w) = (0.0f64, 0.0f64);
    for (g, r) in got.iter().zip(want) {
        d += (*g as f64 - r).powi(2);
        w += r * r;
    }
    (d / w.max(f64::MIN_POSITIVE)).sqrt()
}

pub(super) fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
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
        copy_at_size_gb_s: Vec::new(),
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
        let same_size = weight_bytes as usize / o.dtype.size();
        let same = Tensor::<B, 1>::random([same_size], Distribution::Default, device).cast(o.dtype);
        let copy_at_size = time_per_call::<B, _>(device, o, || same.clone().abs())?;
        let copy_at_size_gb_s = 2.0 * (same_size * o.dtype.size()) as f64 / copy_at_size / 1e9;
        eprintln!(
            "{d_in:>5}->{d_out:<5} copy of its {same_size} values: {copy_at_size_gb_s:.0} GB/s"
        );
        report
            .copy_at_size_gb_s
            .push((d_in, d_out, copy_at_size_gb_s));
        drop(same);
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
        let (gemm, _) = check_selection("gemm").unwrap();
        assert_eq!(gemv.len() + gemm.len(), all.len());
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
