//! The sliced NF4 GEMV for one row of x (batch-1 decoding): the columns of W are cut into
//! slices, one per warp of a cube, and each lane owns `8 · nw` consecutive columns for the
//! whole run, so its part of x sits in registers (as f32) and never goes through shared
//! memory. A cube takes 8 rows of W at a time: every lane loads its `nw` packed words of each
//! row, dequantizes them through a table of value pairs (one shared-memory read per packed byte,
//! i.e. per two weights, instead of one per weight), the warp folds its 8 row sums so that
//! each lane ends with one row's sum (9 shuffles for 8 rows instead of 40), and the cube adds
//! its warps' sums through shared memory once all its batches are done. The 8 rows' block
//! scales are expanded once per warp (a lane per scale) and handed to the lanes by shuffles.
//!
//! H200, f16, ncu at boost clocks (session 16): 2560→9728 11.1–11.4 µs (~1.15 TB/s of packed
//! weight, 30 % of copy bandwidth), 1.15–1.5x faster than the flat / one-warp-per-row kernels on
//! the five 4B shapes. nvcc still spends ~7 instructions per weight (four integer ones per table
//! read); the floor with this table is ~2.5.
//!
//! The pair table holds, for every byte value `b`, `(code[b >> 4], code[b & 15])` (the even
//! element sits in the high nibble), 16 times over: lane `l` reads copy `l % 16`, so a half
//! warp's 64-bit reads never share a bank.

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::{ComputeClient, TensorArg};
use cubecl::{CubeCount, CubeDim};

use super::cube::WARP;
use super::overrides::overrides;
use super::Nf4Meta;

/// Rows of W a cube takes at a time (one per lane group after the warp's fold).
const ROWS: usize = 8;
/// Shared-memory slots for the warps' row sums (8 KiB).
const SUMS: usize = 2048;

// Cube code has no `is_multiple_of`.
#[allow(clippy::manual_is_multiple_of)]
mod kernels {
    use cubecl::prelude::*;

    use super::SUMS;
    use crate::quant::kernels::cube::kernels::{block_scale, stage_tables};

    /// Folds `2 · half` per-lane values across the lanes `mask` apart: the lane with the `mask`
    /// bit set keeps the upper half, its partner the lower half, and each adds what the other
    /// sent, so `vals[0..half]` afterwards hold sums over both lanes.
    #[cube]
    fn fold_half(vals: &mut Array<f32>, #[comptime] half: usize, mask: u32, lane: u32) {
        let upper = (lane & mask) != 0u32;
        #[unroll]
        for i in 0..half {
            let lo = vals[i];
            let hi = vals[i + half];
            let keep = select(upper, hi, lo);
            let send = select(upper, lo, hi);
            vals[i] = keep + plane_shuffle_xor(send, mask);
        }
    }

    /// `out[0, n] = Σ_k x[0, k] · W[n, k]`; see the module comment. The cube has one warp per
    /// slice of `256 · nw` columns (`d_in` is fixed at compile time).
    #[cube(launch_unchecked)]
    pub fn nf4_gemv_sliced<F: Float, NX: Size, NW: Size>(
        x: &Tensor<Vector<F, NX>>,
        words: &Tensor<Vector<i32, NW>>,
        absmax: &Tensor<f32>,
        scale_words: &Tensor<i32>,
        scale_map: &Tensor<f32>,
        code: &Tensor<f32>,
        out: &mut Tensor<F>,
        offset: f32,
        #[comptime] d_in: usize,
        #[comptime] nw: usize,
        #[comptime] blocksize: usize,
        #[comptime] nested: bool,
        #[comptime] nested_blocksize: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let slices = comptime!(d_in / (256 * nw));
        let threads = comptime!(32 * slices);
        // Lanes per scale block and blocks per warp row (both powers of two, product 32).
        let lpb = comptime!((blocksize / (8 * nw)).min(32));
        let bpw = comptime!(32 / lpb);
        // Each lane expands `slots` of the batch's 8 · bpw scales (see below).
        let slots = comptime!((8 * bpw).div_ceil(32));
        let lane = UNIT_POS_X as usize;
        let warp = UNIT_POS_Y as usize;
        // This lane's vector of `nw` words within a row: columns `8 · nw · col` onwards.
        let col = warp * 32usize + lane;
        let per_row = comptime!(d_in / (8 * nw));
        let batches = out.shape(1) / 8usize;
        let step = CUBE_COUNT_X as usize;
        let mut b = CUBE_POS_X as usize;

        // The first batch's weights are loaded before the tables are staged (a cube without a
        // batch reads the last one and stores nothing).
        let mut w = Array::<Vector<i32, NW>>::new(8usize);
        #[unroll]
        for r in 0..8usize {
            let row = min(b, batches - 1usize) * 8usize + r;
            w[r] = words[row * per_row + col];
        }
        let mut xr = Array::<f32>::new(comptime!(8 * nw));
        #[unroll]
        for q in 0..nw {
            let xv = x[col * nw + q];
            #[unroll]
            for i in 0..8usize {
                xr[q * 8usize + i] = f32::cast_from(xv[i]);
            }
        }

        let mut lut = SharedMemory::<f32>::new(16usize);
        let mut smap = SharedMemory::<f32>::new(256usize);
        stage_tables(code, scale_map, &mut lut, &mut smap, nested);
        // Pair table entry `byte · 16 + copy`, built from the staged code table.
        let mut pairs = SharedMemory::<Vector<f32, Const<2>>>::new(4096usize);
        let t = warp * 32usize + lane;
        #[unroll]
        for i in 0..comptime!(4096usize.div_ceil(threads)) {
            let e = t + i * threads;
            if e < 4096usize {
                let byte = e / 16usize;
                let mut p = Vector::<f32, Const<2>>::empty();
                p[0] = lut[byte / 16usize];
                p[1] = lut[byte % 16usize];
                pairs[e] = p;
            }
        }
        // The warps' row sums of up to `round` batches, [batch][warp][row], added up once per
        // round (one barrier pair per round; a round is usually all of a cube's batches).
        let round = comptime!(SUMS / (8 * slices));
        let mut sums = SharedMemory::<f32>::new(SUMS);
        sync_cube();

        let copy = lane % 16usize;
        let mut first = b;
        while first < batches {
            let mut n = 0usize;
            while n < round && b < batches {
                let row0 = b * 8usize;
                // Scale `i = r · bpw + k` of the batch (row r, the warp's k-th block) is
                // expanded by lane `i % 32` into its slot `i / 32`; lane l then fetches row
                // r's from lane `(r · bpw) % 32 + l / lpb`.
                let mut sv = Array::<f32>::new(slots);
                #[unroll]
                for j in 0..slots {
                    let i = min(j * 32usize + lane, comptime!(8 * bpw - 1));
                    let r = i / bpw;
                    let k = i % bpw;
                    let block = ((row0 + r) * d_in
                        + warp * comptime!(256 * nw)
                        + k * comptime!(lpb * 8 * nw))
                        / blocksize;
                    sv[j] = block_scale(
                        absmax,
                        scale_words,
                        &smap,
                        offset,
                        block,
                        nested,
                        nested_blocksize,
                    );
                }
                let mut acc = Array::<f32>::new(8usize);
                #[unroll]
                for r in 0..8usize {
                    let src = u32::cast_from((r * bpw) % 32usize + lane / lpb);
                    let scale = plane_shuffle(sv[(r * bpw) / 32usize], src);
                    // Even and odd elements in two sums (two FMA chains). A byte's entry is
                    // `byte · 16 + copy`: `(word >> (8 · k - 4)) & 0xFF0`, plus the copy.
                    let mut even = 0.0f32;
                    let mut odd = 0.0f32;
                    #[unroll]
                    for q in 0..nw {
                        let word = u32::cast_from(w[r][q]);
                        let mut e = Array::<u32>::new(4usize);
                        e[0] = (word << 4u32) & 4080u32;
                        e[1] = (word >> 4u32) & 4080u32;
                        e[2] = (word >> 12u32) & 4080u32;
                        e[3] = (word >> 20u32) & 4080u32;
                        #[unroll]
                        for k in 0..4usize {
                            let p = pairs[usize::cast_from(e[k]) + copy];
                            let i = q * 8usize + 2usize * k;
                            even += p[0] * xr[i];
                            odd += p[1] * xr[i + 1usize];
                        }
                    }
                    acc[r] = (even + odd) * scale;
                }
                // The next batch's weights are in flight while this one is reduced.
                b += step;
                #[unroll]
                for r in 0..8usize {
                    let row = min(b, batches - 1usize) * 8usize + r;
                    w[r] = words[row * per_row + col];
                }
                // After the fold, lane l holds the warp's sum of row l / 4.
                fold_half(&mut acc, 4usize, 16u32, UNIT_POS_X);
                fold_half(&mut acc, 2usize, 8u32, UNIT_POS_X);
                fold_half(&mut acc, 1usize, 4u32, UNIT_POS_X);
                let mut v = acc[0];
                v += plane_shuffle_xor(v, 2u32);
                v += plane_shuffle_xor(v, 1u32);
                if lane % 4usize == 0usize {
                    sums[(n * slices + warp) * 8usize + lane / 4usize] = v;
                }
                n += 1usize;
            }
            // The round's n · 8 rows: one thread each adds the warps' sums.
            sync_cube();
            let mut u = t;
            while u < n * 8usize {
                let nb = u / 8usize;
                let r = u % 8usize;
                let mut total = 0.0f32;
                #[unroll]
                for s in 0..slices {
                    total += sums[(nb * slices + s) * 8usize + r];
                }
                out[(first + nb * step) * 8usize + r] = F::cast_from(total);
                u += threads;
            }
            sync_cube();
            first = b;
        }
    }
}

/// How the sliced GEMV is laid out for one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlicedPlan {
    /// Packed words per lane and row (its `8 · nw` columns).
    pub nw: usize,
    /// Warps per cube: `d_in / (256 · nw)` column slices.
    pub slices: usize,
    /// Most cubes launched (the cubes loop over batches of 8 rows of W).
    pub max_cubes: usize,
}

impl SlicedPlan {
    /// The plan for one row of x against `meta`'s weight on a card of `sms` multiprocessors, or
    /// `None` when the sliced kernel does not apply: 16-bit compute, `d_out` a multiple of 8,
    /// `d_in` a multiple of 256 in at most 32 slices, a power-of-two block size that holds each
    /// lane's columns,
    /// and `QWEN3VL_GEMV` unset or `sliced`. `QWEN3VL_GEMV_NW` and `_CUBES` override the
    /// defaults (for measurements).
    pub fn for_call(rows: usize, meta: Nf4Meta, sms: usize) -> Option<Self> {
        let o = overrides();
        if rows != 1
            || !(o.choice.is_empty() || o.choice == "sliced")
            || meta.compute.size() != 2
            || !meta.d_out.is_multiple_of(ROWS)
        {
            return None;
        }
        let fits = |nw: usize| {
            meta.d_in.is_multiple_of(256 * nw)
                && meta.d_in / (256 * nw) <= 32
                && meta.blocksize.is_power_of_two()
                && meta.blocksize >= 8 * nw
        };
        let nw = match o.nw {
            Some(nw) => Some(nw).filter(|&nw| [1, 2, 4].contains(&nw) && fits(nw)),
            // One word per lane up to 12 slices (faster on 2560 inputs), else two.
            None => [1, 2, 4]
                .into_iter()
                .find(|&nw| fits(nw) && (nw > 1 || meta.d_in <= 12 * 256)),
        }?;
        let slices = meta.d_in / (256 * nw);
        // Cubes per multiprocessor: about 48 warps, at most 6 pair tables (36 KiB each).
        let per_sm = (48 / slices).clamp(1, 6);
        Some(Self {
            nw,
            slices,
            max_cubes: o.cubes.unwrap_or(sms.max(1) * per_sm).max(1),
        })
    }
}

/// Launches the sliced kernel writing `out` [1, out] from the contiguous x [1, in]
/// (`cube::gemv` prepares both and the weight's kernel arguments).
pub(super) fn launch_sliced<R: CubeRuntime>(
    client: &ComputeClient<R>,
    x: CubeTensor<R>,
    [words, absmax, scale_words, scale_map, code]: [TensorArg<R>; 5],
    out: &CubeTensor<R>,
    meta: Nf4Meta,
    plan: SlicedPlan,
) {
    let cubes = (meta.d_out / ROWS).min(plan.max_cubes) as u32;
    // SAFETY: every index is in range by construction: batches clamped to the last, each
    // lane's vector `col < 32 · slices = d_in / (8 · nw)` of its row, x vectors below
    // d_in / 8, table entries below 4096.
    unsafe {
        kernels::nf4_gemv_sliced::launch_unchecked::<R>(
            client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_2d(WARP, plan.slices as u32),
            8,
            plan.nw,
            x.into_tensor_arg(),
            words,
            absmax,
            scale_words,
            scale_map,
            code,
            out.clone().into_tensor_arg(),
            meta.offset,
            meta.d_in,
            plan.nw,
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
    fn sliced_plan_cuts_the_columns_into_at_most_32_warp_slices() {
        // The 4B shapes: one word (8 columns) per lane at 2560 inputs, else two.
        for (d_in, nw, slices) in [(2560, 1, 10), (4096, 2, 8), (9728, 2, 19)] {
            let plan = SlicedPlan::for_call(1, meta(d_in, 1024, DType::F16), 132).unwrap();
            assert_eq!((plan.nw, plan.slices), (nw, slices), "{d_in}");
            assert_eq!(plan.slices * 256 * plan.nw, d_in);
            assert!(plan.max_cubes >= 132);
        }
        // 768 columns are 3 slices of one word per lane.
        let plan = SlicedPlan::for_call(1, meta(768, 40, DType::BF16), 132).unwrap();
        assert_eq!((plan.nw, plan.slices), (1, 3));
        // Several rows of x, f32 compute, d_out not a multiple of 8, d_in not a multiple of
        // 256, more than 32 slices: another kernel.
        assert!(SlicedPlan::for_call(2, meta(2560, 1024, DType::F16), 132).is_none());
        assert!(SlicedPlan::for_call(1, meta(2560, 1024, DType::F32), 132).is_none());
        assert!(SlicedPlan::for_call(1, meta(2560, 1020, DType::F16), 132).is_none());
        assert!(SlicedPlan::for_call(1, meta(2600, 1024, DType::F16), 132).is_none());
        assert!(SlicedPlan::for_call(1, meta(256 * 66, 1024, DType::F16), 132).is_none());
    }
}
