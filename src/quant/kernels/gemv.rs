//! Two NF4 GEMV kernels for decoding (the one-row kernels in `gemv_row.rs` and
//! `gemv_sliced.rs` come first where they apply; the one-warp-per-row kernel in `cube.rs` takes
//! the rest):
//! * grouped (2..8 rows of x): each warp computes `wrows` rows of W at once, so every x value it
//!   reads (and converts to f32) serves `wrows` weights, and each lane has `wrows · unroll`
//!   128-bit weight loads in flight before it uses any.
//! * flat (one row of x, where the sliced kernel does not apply, or `QWEN3VL_GEMV=flat`): each
//!   warp takes whole rows of W as one contiguous run of weight vectors, every lane busy in
//!   every step; x is staged once per cube in shared memory as f32, laid out so that the
//!   lanes of a warp read consecutive 16-byte chunks (no bank conflicts), and the cubes loop
//!   over the rows of W (the staging is paid once per cube).
//!
//! The layout is `Nf4Linear`'s (see `cube.rs`): 8 codes per little-endian i32 word, the even
//! element in a byte's high nibble; a row of W is `d_in / 32` vectors of 4 words here.

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::{ComputeClient, TensorArg};
use cubecl::{CubeCount, CubeDim};

use super::cube::WARP;
use super::overrides::overrides;
use super::Nf4Meta;

/// Warps per cube of the grouped kernel.
const WARPS: u32 = 8;
/// Fewest warp tasks (groups of W rows) for the one-row kernel.
const MIN_FLAT_TASKS: usize = 2048;
/// Most f32 values of x staged in shared memory (40 KiB, under the 48 KiB static limit).
const X_SHARED_MAX: usize = 10240;

mod kernels {
    use cubecl::prelude::*;

    use crate::quant::kernels::cube::kernels::{block_scale, nibble_shift, stage_tables};

    /// Stages x [rows, d_in] (`x_len` = rows · d_in values) in shared memory as f32 chunks of
    /// 4: chunk `e` (0..8) of 128-bit weight vector `j` of row `m` sits at
    /// `m · d_in/4 + e · d_in/32 + j`, so lane j's reads of one chunk are consecutive. Each of
    /// the cube's `threads` threads issues all its loads before it stores any.
    #[cube]
    fn stage_x<F: Float, NX: Size>(
        x: &Tensor<Vector<F, NX>>,
        xs: &mut SharedMemory<Vector<f32, Const<4>>>,
        #[comptime] x_len: usize,
        #[comptime] threads: usize,
    ) {
        let d_in = x.shape(1);
        let per_row = d_in / 32usize;
        let x_pitch = x.stride(0) / 8usize;
        let n = comptime!(x_len / 8);
        let iters = comptime!((x_len / 8).div_ceil(threads));
        let t = (UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X) as usize;
        // Vector v of x: row m, 8-value group k8 of the row (a thread past the end reads the
        // last vector again and does not store it).
        let mut xv = Array::<Vector<F, NX>>::new(iters);
        #[unroll]
        for it in 0..iters {
            let v = min(t + it * threads, n - 1usize);
            xv[it] = x[(v / (d_in / 8usize)) * x_pitch + v % (d_in / 8usize)];
        }
        #[unroll]
        for it in 0..iters {
            let v = t + it * threads;
            if v < n {
                let m = v / (d_in / 8usize);
                let k8 = v % (d_in / 8usize);
                let j = k8 / 4usize;
                let q = k8 % 4usize;
                let mut lo = Vector::<f32, Const<4>>::empty();
                let mut hi = Vector::<f32, Const<4>>::empty();
                #[unroll]
                for i in 0..4usize {
                    lo[i] = f32::cast_from(xv[it][i]);
                    hi[i] = f32::cast_from(xv[it][i + 4usize]);
                }
                let base = m * (d_in / 4usize) + j;
                xs[base + (2usize * q) * per_row] = lo;
                xs[base + (2usize * q + 1usize) * per_row] = hi;
            }
        }
    }

    /// `out[m, n] = Σ_k x[m, k] · W[n, k]` for `rows` rows of x; see the module comment.
    #[cube(launch_unchecked)]
    pub fn nf4_gemv_grouped<F: Float, NX: Size>(
        x: &Tensor<Vector<F, NX>>,
        words: &Tensor<Vector<i32, Const<4>>>,
        absmax: &Tensor<f32>,
        scale_words: &Tensor<i32>,
        scale_map: &Tensor<f32>,
        code: &Tensor<f32>,
        out: &mut Tensor<F>,
        offset: f32,
        #[comptime] rows: usize,
        #[comptime] wrows: usize,
        #[comptime] unroll: usize,
        #[comptime] blocksize: usize,
        #[comptime] nested: bool,
        #[comptime] nested_blocksize: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let mut lut = SharedMemory::<f32>::new(16usize);
        let mut smap = SharedMemory::<f32>::new(256usize);
        stage_tables(code, scale_map, &mut lut, &mut smap, nested);

        let d_in = x.shape(1);
        let d_out = out.shape(1);
        let per_row = d_in / 32usize;
        let x_pitch = x.stride(0) / 8usize;
        let out_pitch = out.stride(0);
        let groups = d_out / wrows;
        let warps = (CUBE_COUNT_X * CUBE_DIM_Y) as usize;
        let lane = UNIT_POS_X as usize;
        let mut g = (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) as usize;
        while g < groups {
            let n0 = g * wrows;
            // acc[r · rows + m]: W row n0 + r against x row m.
            let mut acc = Array::<f32>::new(wrows * rows);
            #[unroll]
            for a in 0..wrows * rows {
                acc[a] = 0.0f32;
            }
            let mut j0 = lane;
            while j0 < per_row {
                // Every weight vector and scale of `unroll` steps first (an index past the row
                // reads the row's last vector again and is not used).
                let mut w = Array::<Vector<i32, Const<4>>>::new(wrows * unroll);
                let mut s = Array::<f32>::new(wrows * unroll);
                #[unroll]
                for u in 0..unroll {
                    let j = min(j0 + u * 32usize, per_row - 1usize);
                    #[unroll]
                    for r in 0..wrows {
                        w[u * wrows + r] = words[(n0 + r) * per_row + j];
                    }
                }
                #[unroll]
                for u in 0..unroll {
                    let j = min(j0 + u * 32usize, per_row - 1usize);
                    #[unroll]
                    for r in 0..wrows {
                        let block = ((n0 + r) * per_row + j) * 32usize / blocksize;
                        s[u * wrows + r] = block_scale(
                            absmax,
                            scale_words,
                            &smap,
                            offset,
                            block,
                            nested,
                            nested_blocksize,
                        );
                    }
                }
                #[unroll]
                for u in 0..unroll {
                    let j = j0 + u * 32usize;
                    if j < per_row {
                        let mut part = Array::<f32>::new(wrows * rows);
                        #[unroll]
                        for a in 0..wrows * rows {
                            part[a] = 0.0f32;
                        }
                        #[unroll]
                        for q in 0..4usize {
                            // The 8 weights of word q of each W row, dequantized once.
                            let mut wf = Array::<f32>::new(8 * wrows);
                            #[unroll]
                            for r in 0..wrows {
                                let word = u32::cast_from(w[u * wrows + r][q]);
                                #[unroll]
                                for i in 0..8u32 {
                                    let c = (word >> nibble_shift(i)) & 15u32;
                                    wf[r * 8 + i as usize] = lut[c as usize];
                                }
                            }
                            #[unroll]
                            for m in 0..rows {
                                let xv = x[m * x_pitch + j * 4usize + q];
                                let mut xf = Array::<f32>::new(8usize);
                                #[unroll]
                                for i in 0..8usize {
                                    xf[i] = f32::cast_from(xv[i]);
                                }
                                #[unroll]
                                for r in 0..wrows {
                                    let mut dot = part[r * rows + m];
                                    #[unroll]
                                    for i in 0..8usize {
                                        dot += wf[r * 8 + i] * xf[i];
                                    }
                                    part[r * rows + m] = dot;
                                }
                            }
                        }
                        #[unroll]
                        for r in 0..wrows {
                            #[unroll]
                            for m in 0..rows {
                                acc[r * rows + m] += part[r * rows + m] * s[u * wrows + r];
                            }
                        }
                    }
                }
                j0 += unroll * 32usize;
            }
            #[unroll]
            for r in 0..wrows {
                #[unroll]
                for m in 0..rows {
                    let total = plane_sum(acc[r * rows + m]);
                    if lane == 0usize {
                        out[m * out_pitch + n0 + r] = F::cast_from(total);
                    }
                }
            }
            g += warps;
        }
    }
    /// One row of x: `out[0, n] = Σ_k x[k] · W[n, k]`. Each warp takes `wrows` whole rows of W,
    /// which are one contiguous run of `wrows · d_in / 32` weight vectors, a multiple of 32: in
    /// each step every lane takes one vector (no idle lanes), `unroll` steps' loads first. x
    /// sits in shared memory (see `stage_x`); `d_in` is fixed at compile time, so the row and
    /// column of a vector cost a multiply and a shift.
    #[cube(launch_unchecked)]
    pub fn nf4_gemv_flat<F: Float, NX: Size>(
        x: &Tensor<Vector<F, NX>>,
        words: &Tensor<Vector<i32, Const<4>>>,
        absmax: &Tensor<f32>,
        scale_words: &Tensor<i32>,
        scale_map: &Tensor<f32>,
        code: &Tensor<f32>,
        out: &mut Tensor<F>,
        offset: f32,
        #[comptime] d_in: usize,
        #[comptime] wrows: usize,
        #[comptime] unroll: usize,
        #[comptime] cube_warps: usize,
        #[comptime] blocksize: usize,
        #[comptime] nested: bool,
        #[comptime] nested_blocksize: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let mut lut = SharedMemory::<f32>::new(16usize);
        let mut smap = SharedMemory::<f32>::new(256usize);
        let mut xs = SharedMemory::<Vector<f32, Const<4>>>::new(comptime!(d_in / 4));
        stage_x::<F, NX>(x, &mut xs, d_in, comptime!(cube_warps * 32));
        stage_tables(code, scale_map, &mut lut, &mut smap, nested);

        let per_row = comptime!(d_in / 32);
        let steps = comptime!(wrows * d_in / 1024);
        let groups = out.shape(1) / wrows;
        let warps = (CUBE_COUNT_X * CUBE_DIM_Y) as usize;
        let lane = UNIT_POS_X as usize;
        let mut g = (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) as usize;
        while g < groups {
            let first = g * (wrows * per_row) + lane;
            let mut acc = Array::<f32>::new(wrows);
            #[unroll]
            for r in 0..wrows {
                acc[r] = 0.0f32;
            }
            let mut t0 = 0usize;
            while t0 < steps {
                // `unroll` steps' weight vectors and scales first (a step past the end reads
                // the last one again and is not used).
                let mut w = Array::<Vector<i32, Const<4>>>::new(unroll);
                let mut s = Array::<f32>::new(unroll);
                #[unroll]
                for u in 0..unroll {
                    w[u] = words[first + 32usize * min(t0 + u, steps - 1usize)];
                }
                #[unroll]
                for u in 0..unroll {
                    let block =
                        (first + 32usize * min(t0 + u, steps - 1usize)) * 32usize / blocksize;
                    s[u] = block_scale(
                        absmax,
                        scale_words,
                        &smap,
                        offset,
                        block,
                        nested,
                        nested_blocksize,
                    );
                }
                #[unroll]
                for u in 0..unroll {
                    let t = t0 + u;
                    if t < steps {
                        let v = lane + 32usize * t;
                        let row = v / per_row;
                        let j = v % per_row;
                        // Four independent sums of 8 (one per word) for more FMAs in flight;
                        // `lo`/`hi` hold x for the word's values 0..4 and 4..8.
                        let mut c = Array::<f32>::new(4usize);
                        #[unroll]
                        for q in 0..4usize {
                            let lo = xs[(2usize * q) * per_row + j];
                            let hi = xs[(2usize * q + 1usize) * per_row + j];
                            let word = u32::cast_from(w[u][q]);
                            let mut sum = 0.0f32;
                            #[unroll]
                            for i in 0..4u32 {
                                let c4 = (word >> nibble_shift(i)) & 15u32;
                                sum += lut[c4 as usize] * lo[i as usize];
                            }
                            #[unroll]
                            for i in 0..4u32 {
                                let c4 = (word >> nibble_shift(i + 4u32)) & 15u32;
                                sum += lut[c4 as usize] * hi[i as usize];
                            }
                            c[q] = sum;
                        }
                        let part = ((c[0] + c[1]) + (c[2] + c[3])) * s[u];
                        #[unroll]
                        for r in 0..wrows {
                            if row == r {
                                acc[r] += part;
                            }
                        }
                    }
                }
                t0 += unroll;
            }
            #[unroll]
            for r in 0..wrows {
                let total = plane_sum(acc[r]);
                if lane == 0usize {
                    out[g * wrows + r] = F::cast_from(total);
                }
            }
            g += warps;
        }
    }
}

/// How the grouped GEMV is laid out for one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupedPlan {
    /// Rows of W per warp.
    pub wrows: usize,
    /// 128-bit weight loads per lane and W row issued before any is used.
    pub unroll: usize,
    /// Most cubes launched (the cubes loop over the rows of W).
    pub max_cubes: usize,
}

impl GroupedPlan {
    /// The plan for `rows` rows of x against `meta`'s weight, or `None` when the grouped
    /// kernel does not apply (16-bit compute, `d_in` a multiple of 32, more than one row
    /// unless `QWEN3VL_GEMV=grouped`, and `QWEN3VL_GEMV` not `v4`). `QWEN3VL_GEMV_WROWS`,
    /// `_UNROLL` and `_CUBES` override the defaults (for measurements).
    pub fn for_call(rows: usize, meta: Nf4Meta) -> Option<Self> {
        let o = overrides();
        if o.choice == "v4"
            || (rows == 1 && o.choice != "grouped")
            || !meta.d_in.is_multiple_of(32)
            || meta.compute.size() != 2
        {
            return None;
        }
        let mut wrows = o.wrows.unwrap_or(2);
        while wrows > 1 && !meta.d_out.is_multiple_of(wrows) {
            wrows /= 2;
        }
        let unroll = o.unroll.unwrap_or(2).clamp(1, 4);
        let max_cubes = o.cubes.unwrap_or(1 << 16);
        Some(Self {
            wrows: wrows.max(1),
            unroll,
            max_cubes: max_cubes.max(1),
        })
    }
}

/// Launches the grouped kernel writing `out` [rows, out] from the contiguous x [rows, in]
/// (`cube::gemv` prepares both and the weight's kernel arguments).
pub(super) fn launch_grouped<R: CubeRuntime>(
    client: &ComputeClient<R>,
    x: CubeTensor<R>,
    [words, absmax, scale_words, scale_map, code]: [TensorArg<R>; 5],
    out: &CubeTensor<R>,
    meta: Nf4Meta,
    plan: GroupedPlan,
) {
    let rows = x.meta.shape()[0];
    let groups = meta.d_out / plan.wrows;
    let cubes = groups.div_ceil(WARPS as usize).min(plan.max_cubes) as u32;
    // SAFETY: every index is in range by construction: W rows `n0 + r < d_out` (wrows divides
    // d_out), vector indices clamped to the row, x indices below rows · d_in.
    unsafe {
        kernels::nf4_gemv_grouped::launch_unchecked::<R>(
            client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_2d(WARP, WARPS),
            8,
            x.into_tensor_arg(),
            words,
            absmax,
            scale_words,
            scale_map,
            code,
            out.clone().into_tensor_arg(),
            meta.offset,
            rows,
            plan.wrows,
            plan.unroll,
            meta.blocksize,
            meta.nested,
            meta.nested_blocksize,
            meta.compute.into(),
        );
    }
}

/// How the one-row GEMV is laid out for one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlatPlan {
    /// Rows of W per warp: the fewest that make a whole number of 32-vector steps.
    pub wrows: usize,
    /// Steps whose loads are issued before any is used.
    pub unroll: usize,
    /// Warps per cube.
    pub cube_warps: usize,
    /// Most cubes launched (the cubes loop over the rows of W).
    pub max_cubes: usize,
}

impl FlatPlan {
    /// The plan for one row of x against `meta`'s weight, or `None` when the one-row kernel
    /// does not apply (16-bit compute; x fits in shared memory; some `wrows` ≤ 16 that divides
    /// `d_out` makes `wrows · d_in` a multiple of 1024; `QWEN3VL_GEMV` not `v4`/`grouped`).
    /// `QWEN3VL_GEMV_UNROLL`, `_CUBE_WARPS` and `_CUBES` override the defaults.
    pub fn for_call(rows: usize, meta: Nf4Meta) -> Option<Self> {
        let o = overrides();
        if rows != 1
            || o.choice == "v4"
            || o.choice == "grouped"
            || meta.compute.size() != 2
            || !meta.d_in.is_multiple_of(32)
            || meta.d_in > X_SHARED_MAX
        {
            return None;
        }
        let wrows = [1, 2, 4, 8, 16]
            .into_iter()
            .find(|&w| (w * meta.d_in).is_multiple_of(1024) && meta.d_out.is_multiple_of(w))?;
        // Too few warp tasks for an even spread of 8-warp cubes over an H200's 132 SMs: the
        // one-warp-per-row kernel was faster there (H200, boost clocks: 2560 -> 1024 6.4
        // against 7.7 us, 9728 -> 2560 17.9 against 20.1 us).
        if meta.d_out / wrows < MIN_FLAT_TASKS && o.choice != "flat" {
            return None;
        }
        Some(Self {
            wrows,
            unroll: o.unroll.unwrap_or(4).clamp(1, 8),
            cube_warps: o.cube_warps.unwrap_or(8).clamp(1, 32),
            max_cubes: o.cubes.unwrap_or(1056).max(1),
        })
    }

    /// Cubes to launch for `groups` warp tasks: every warp gets the same number of tasks.
    fn cubes(&self, groups: usize) -> usize {
        let per_warp = groups.div_ceil(self.cube_warps * self.max_cubes);
        groups.div_ceil(self.cube_warps * per_warp)
    }
}

/// Launches the one-row kernel writing `out` [1, out] from the contiguous x [1, in] (`cube::gemv`
/// prepares both and the weight's kernel arguments).
pub(super) fn launch_flat<R: CubeRuntime>(
    client: &ComputeClient<R>,
    x: CubeTensor<R>,
    [words, absmax, scale_words, scale_map, code]: [TensorArg<R>; 5],
    out: &CubeTensor<R>,
    meta: Nf4Meta,
    plan: FlatPlan,
) {
    let cubes = plan.cubes(meta.d_out / plan.wrows) as u32;
    // SAFETY: every index is in range by construction: groups `g < d_out / wrows`, steps
    // clamped to the group's last, x indices below d_in.
    unsafe {
        kernels::nf4_gemv_flat::launch_unchecked::<R>(
            client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_2d(WARP, plan.cube_warps as u32),
            8,
            x.into_tensor_arg(),
            words,
            absmax,
            scale_words,
            scale_map,
            code,
            out.clone().into_tensor_arg(),
            meta.offset,
            meta.d_in,
            plan.wrows,
            plan.unroll,
            plan.cube_warps,
            meta.blocksize,
            meta.nested,
            meta.nested_blocksize,
            meta.compute.into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::DType;

    fn meta(d_in: usize, d_out: usize, compute: DType) -> Nf4Meta {
        Nf4Meta::for_plan_test(d_in, d_out, compute)
    }

    #[test]
    fn one_row_takes_the_flat_kernel_only_where_it_fills_the_card() {
        // 2560 inputs: 80 vectors a row, so two rows make 160 = 5 steps of 32.
        let plan = FlatPlan::for_call(1, meta(2560, 9728, DType::F16)).unwrap();
        assert_eq!(plan.wrows, 2);
        assert!((plan.wrows * 2560 / 32).is_multiple_of(32));
        assert_eq!(
            FlatPlan::for_call(1, meta(4096, 2560, DType::BF16))
                .unwrap()
                .wrows,
            1
        );
        // Too few rows of W, several rows of x, f32 compute, inputs not a multiple of 32,
        // x larger than shared memory: not the flat kernel.
        assert!(FlatPlan::for_call(1, meta(2560, 1024, DType::F16)).is_none());
        assert!(FlatPlan::for_call(2, meta(2560, 9728, DType::F16)).is_none());
        assert!(FlatPlan::for_call(1, meta(2560, 9728, DType::F32)).is_none());
        assert!(FlatPlan::for_call(1, meta(2568, 9728, DType::F16)).is_none());
        assert!(FlatPlan::for_call(1, meta(12288, 4096, DType::F16)).is_none());
    }

    #[test]
    fn flat_cubes_give_every_warp_the_same_number_of_tasks() {
        let plan = FlatPlan::for_call(1, meta(2560, 9728, DType::F16)).unwrap();
        for groups in [2048, 4864, 9728, 100_000] {
            let cubes = plan.cubes(groups);
            assert!(cubes <= plan.max_cubes, "{groups}: {cubes} cubes");
            let warps = cubes * plan.cube_warps;
            let per_warp = groups.div_ceil(warps);
            // No warp idles for a whole round: the last round is at least partly full.
            assert!(warps * (per_warp - 1) < groups, "{groups}: {warps} warps");
        }
    }

    #[test]
    fn several_rows_take_the_grouped_kernel() {
        let plan = GroupedPlan::for_call(8, meta(2560, 9728, DType::F16)).unwrap();
        assert_eq!(plan.wrows, 2);
        // An odd number of W rows falls back to one per warp.
        assert_eq!(
            GroupedPlan::for_call(5, meta(192, 45, DType::F16))
                .unwrap()
                .wrows,
            1
        );
        assert!(GroupedPlan::for_call(1, meta(2560, 9728, DType::F16)).is_none());
        assert!(GroupedPlan::for_call(3, meta(200, 72, DType::F16)).is_none());
    }
}
