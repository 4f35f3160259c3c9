//! The fused NF4 GEMM on tensor cores, for tens to hundreds of rows of x: `out = x · Wᵀ` with
//! the dequantization inside the tile loads, so W never exists in 16 bits in global memory.
//!
//! A cube of four warps (2 x 2) owns a `32·fm x 32·fn` tile of the output and walks `in` in
//! steps of 64 values. Each step, every thread:
//! 1. stores the x vectors and packed words it fetched during the previous step into shared
//!    memory, dequantizing the words on the way (code table and scale map staged in shared
//!    memory, the scale computed from the raw scale code and absmax fetched with the word);
//! 2. fetches the next step's x vectors and words (global loads in flight during step 3);
//! 3. multiplies its warp's 16x16 fragments with `cmma` (WMMA 16x16x16, f32 accumulators).
//!
//! Rows of x past `M` and rows of W past `out` are clamped to the last one (their results are
//! never stored), so no thread branches. The accumulators go through shared memory once at the
//! end, so partial edge tiles store only what is in range. A long sum may be split over several
//! cubes per tile (`CUBE_COUNT_Z`), each writing f32 partial sums that are added afterwards.
//! The same kernel computes the backward's `dX = dY · W` (`transposed`): the W tile is then
//! 64 rows of W by the cube's output columns.
//!
//! H100 (session 18, f16, 128 rows, the five 4B shapes): 1.1–1.8x burn's matmul on the
//! pre-dequantized weight, where dequantize + matmul was 0.76–0.91x.
//!
//! Shared tiles are `[rows][64 + 8]` 16-bit values: the 8 of padding shift each row by 16 bytes
//! so a fragment's 16 rows spread over the banks, and keep every fragment 32-byte aligned.

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::ir::features::MmaConfig;
use cubecl::ir::{ElemType, FloatKind, StorageType};
use cubecl::prelude::{ComputeClient, TensorArg};
use cubecl::{CubeCount, CubeDim};

use super::cube::WARP;
use super::overrides::overrides;
use super::Nf4Meta;

/// Values of `in` per step (one shared tile's width).
const STEP: usize = 64;

// Cube code has no `is_multiple_of`.
#[allow(clippy::manual_is_multiple_of)]
mod kernels {
    use cubecl::prelude::*;

    use crate::quant::kernels::cube::kernels::{nibble_shift, stage_tables};

    /// One tile row in shared memory: 64 values and 8 of padding, as vectors of 8.
    const PITCH: usize = 9;

    /// The B fragment (16 summed indices x 16 output columns) of fragment column `col` at
    /// depth `kk` (16 values each) of the dequantized W tile: `[n][k]` rows of 64 + 8 values
    /// (B column-major), or transposed `[k][n]` rows of `bn + 8` values (B row-major).
    #[cube]
    fn b_fragment<F: Float, NX: Size>(
        ws: &SharedMemory<Vector<F, NX>>,
        col: usize,
        #[comptime] kk: usize,
        #[comptime] bn: usize,
        #[comptime] transposed: bool,
    ) -> cmma::Matrix<F> {
        let pitch = comptime!(if transposed { bn / 8 + 1 } else { PITCH });
        let layout = comptime!(if transposed {
            cmma::MatrixLayout::RowMajor
        } else {
            cmma::MatrixLayout::ColMajor
        });
        let mut off = col * 16usize * PITCH + kk * 2usize;
        if transposed {
            off = kk * 16usize * pitch + col * 2usize;
        }
        fragment::<F, NX>(ws, off, cmma::MatrixIdent::B, layout, pitch)
    }

    /// A 16x16 A or B fragment from the shared tile `tile` at vector `off`, rows (or columns,
    /// column-major) `pitch` vectors apart.
    #[cube]
    fn fragment<F: Float, NX: Size>(
        tile: &SharedMemory<Vector<F, NX>>,
        off: usize,
        #[comptime] ident: cmma::MatrixIdent,
        #[comptime] layout: cmma::MatrixLayout,
        #[comptime] pitch: usize,
    ) -> cmma::Matrix<F> {
        // SAFETY: loaded right away.
        let m =
            unsafe { cmma::Matrix::<F>::uninitialized(ident, 16usize, 16usize, 16usize, layout) };
        cmma::load(
            &m,
            &tile.slice(off, tile.len()),
            comptime!((pitch * 8) as u32),
        );
        m
    }

    /// `out[m, n] = Σ_k x[m, k] · W[n, k]` (or `W[k, n]` when `transposed`: `dX = dY · W`);
    /// see the module comment. Cube (x, y, z) owns output columns `32·fn·x ..` and rows
    /// `32·fm·y ..` of the z-th of `CUBE_COUNT_Z` splits of the summed length (a multiple of
    /// 64; `out`'s width a multiple of 8 when transposed). With one split `out` is [M, n] in
    /// the compute dtype, else the splits' f32 partial sums [splits · M, n].
    #[cube(launch_unchecked)]
    pub fn nf4_gemm_tiled<F: Float, O: Float, NX: Size>(
        x: &Tensor<Vector<F, NX>>,
        words: &Tensor<i32>,
        absmax: &Tensor<f32>,
        scale_words: &Tensor<i32>,
        scale_map: &Tensor<f32>,
        code: &Tensor<f32>,
        out: &mut Tensor<O>,
        offset: f32,
        #[comptime] fm: usize,
        #[comptime] fnn: usize,
        #[comptime] transposed: bool,
        #[comptime] blocksize: usize,
        #[comptime] nested: bool,
        #[comptime] nested_blocksize: usize,
        #[define(F, O)] _dtypes: [StorageType; 2],
    ) {
        let bm = comptime!(32 * fm);
        let bn = comptime!(32 * fnn);
        // Each thread moves `2·fm` x vectors and `2·fnn` packed words per step.
        let xv = comptime!(2 * fm);
        let wv = comptime!(2 * fnn);
        let t = UNIT_POS as usize;
        let warp = t / 32usize;
        let wy = warp / 2usize;
        let wx = warp % 2usize;
        let rows = x.shape(0);
        // Output columns and the summed length (`out` and `in` of W, swapped when transposed).
        let n_len = out.shape(1);
        let k_len = x.shape(1);
        let x_pitch = x.stride(0) / 8usize;
        // This cube's steps of 64 summed indices: its split's share.
        let split = CUBE_POS_Z as usize;
        let splits = CUBE_COUNT_Z as usize;
        let first = split * (k_len / 64usize) / splits;
        let steps = (split + 1usize) * (k_len / 64usize) / splits - first;
        // Packed words per row of W, and how far a step moves a word index.
        let mut w_pitch = k_len / 8usize;
        let mut w_step = 8usize;
        // A transposed step's tile is 64 rows of W by `bn / 8` words.
        let wpr = comptime!(bn / 8);
        if transposed {
            w_pitch = n_len / 8usize;
            w_step = 64usize * w_pitch;
        }
        let m0 = CUBE_POS_Y as usize * bm;
        let n0 = CUBE_POS_X as usize * bn;

        let mut lut = SharedMemory::<f32>::new(16usize);
        let mut smap = SharedMemory::<f32>::new(256usize);
        stage_tables(code, scale_map, &mut lut, &mut smap, nested);
        let mut xs = SharedMemory::<Vector<F, NX>>::new_aligned(comptime!(bm * PITCH), 32usize);
        // The dequantized W tile: `bn` rows of 64 values, or transposed 64 rows of `bn`.
        let w_len = comptime!(if transposed {
            64 * (bn / 8 + 1)
        } else {
            bn * PITCH
        });
        let mut ws = SharedMemory::<Vector<F, NX>>::new_aligned(w_len, 32usize);

        // This thread's x vectors and words: slot i is vector `t + 128·i` of the tile, row
        // `(t + 128·i) / 8`, the 8 vectors of a row being one step's 64 values.
        let mut x_src = Array::<usize>::new(xv);
        #[unroll]
        for i in 0..xv {
            let v = t + i * 128usize;
            x_src[i] = min(m0 + v / 8usize, rows - 1usize) * x_pitch + v % 8usize + first * 8usize;
        }
        // Words: row `u / 8` of the tile (an output column) and its `u % 8`-th word of the
        // step; transposed, row `u / wpr` (a summed index) and the word of columns
        // `n0 + 8 · (u % wpr)`.
        let mut w_src = Array::<usize>::new(wv);
        #[unroll]
        for i in 0..wv {
            let u = t + i * 128usize;
            if transposed {
                w_src[i] = (u / wpr) * w_pitch + min(n0 / 8usize + u % wpr, w_pitch - 1usize);
            } else {
                w_src[i] = min(n0 + u / 8usize, n_len - 1usize) * w_pitch + u % 8usize;
            }
            w_src[i] += first * w_step;
        }
        let mut xr = Array::<Vector<F, NX>>::new(xv);
        let mut wr = Array::<u32>::new(wv);
        let mut sw = Array::<u32>::new(wv);
        let mut am = Array::<f32>::new(wv);
        // Step 0's data.
        #[unroll]
        for i in 0..xv {
            xr[i] = x[x_src[i]];
        }
        #[unroll]
        for i in 0..wv {
            let w = w_src[i];
            let block = (w * 8usize) / blocksize;
            wr[i] = u32::cast_from(words[w]);
            if nested {
                sw[i] = u32::cast_from(scale_words[block / 4usize]);
                am[i] = absmax[block / nested_blocksize];
            } else {
                am[i] = absmax[block];
            }
        }

        let mut acc = Sequence::<cmma::Matrix<f32>>::new();
        #[unroll]
        for _ in 0..comptime!(fm * fnn) {
            acc.push(cmma::Matrix::<f32>::from_value(
                cmma::MatrixIdent::Accumulator,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::Undefined,
                0.0f32,
            ));
        }

        for s in 0..steps {
            // 1. This step's data into shared memory (the previous step's fragments are read).
            sync_cube();
            #[unroll]
            for i in 0..xv {
                let v = t + i * 128usize;
                xs[(v / 8usize) * PITCH + v % 8usize] = xr[i];
            }
            #[unroll]
            for i in 0..wv {
                let u = t + i * 128usize;
                let block = ((w_src[i] + s * w_step) * 8usize) / blocksize;
                let mut scale = am[i];
                if nested {
                    let c = (sw[i] >> (((block % 4usize) * 8usize) as u32)) & 255u32;
                    scale = smap[c as usize] * am[i] + offset;
                }
                let mut vals = Vector::<F, NX>::empty();
                #[unroll]
                for e in 0..8usize {
                    let c = (wr[i] >> nibble_shift(e as u32)) & 15u32;
                    vals[e] = F::cast_from(lut[c as usize] * scale);
                }
                if transposed {
                    ws[(u / wpr) * comptime!(wpr + 1) + u % wpr] = vals;
                } else {
                    ws[(u / 8usize) * PITCH + u % 8usize] = vals;
                }
            }
            sync_cube();
            // 2. The next step's data, in flight during the products.
            if s + 1 < steps {
                #[unroll]
                for i in 0..xv {
                    xr[i] = x[x_src[i] + (s + 1) * 8usize];
                }
                #[unroll]
                for i in 0..wv {
                    let w = w_src[i] + (s + 1) * w_step;
                    let block = (w * 8usize) / blocksize;
                    wr[i] = u32::cast_from(words[w]);
                    if nested {
                        sw[i] = u32::cast_from(scale_words[block / 4usize]);
                        am[i] = absmax[block / nested_blocksize];
                    } else {
                        am[i] = absmax[block];
                    }
                }
            }
            // 3. Four 16-deep products per fragment pair.
            #[unroll]
            for kk in 0..4usize {
                let mut a = Sequence::<cmma::Matrix<F>>::new();
                #[unroll]
                for i in 0..fm {
                    let off = ((wy * fm + i) * 16usize) * PITCH + kk * 2usize;
                    a.push(fragment::<F, NX>(
                        &xs,
                        off,
                        cmma::MatrixIdent::A,
                        cmma::MatrixLayout::RowMajor,
                        PITCH,
                    ));
                }
                #[unroll]
                for j in 0..fnn {
                    let b = b_fragment::<F, NX>(&ws, wx * fnn + j, kk, bn, transposed);
                    #[unroll]
                    for i in 0..fm {
                        let c = acc.index(i * fnn + j);
                        cmma::execute::<F, F, f32, f32>(a.index(i), &b, c, c);
                    }
                }
            }
        }

        // The accumulators through shared memory ([bm][bn + 4] f32), then the in-range part.
        let cp = comptime!(bn + 4);
        let mut cs = SharedMemory::<f32>::new_aligned(comptime!(bm * cp), 32usize);
        #[unroll]
        for i in 0..fm {
            #[unroll]
            for j in 0..fnn {
                let off = (wy * fm + i) * 16usize * cp + (wx * fnn + j) * 16usize;
                cmma::store(
                    &mut cs.slice_mut(off, comptime!(bm * cp)),
                    acc.index(i * fnn + j),
                    comptime!(cp as u32),
                    cmma::MatrixLayout::RowMajor,
                );
            }
        }
        sync_cube();
        let out_pitch = out.stride(0);
        let mut e = t;
        while e < comptime!(bm * bn) {
            let r = e / bn;
            let c = e % bn;
            if m0 + r < rows && n0 + c < n_len {
                out[(split * rows + m0 + r) * out_pitch + n0 + c] = O::cast_from(cs[r * cp + c]);
            }
            e += 128usize;
        }
    }
}

/// How the tiled GEMM is laid out for one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TiledPlan {
    /// 16-row fragments per warp (the cube's tile is `32·fm` rows of x).
    pub fm: usize,
    /// 16-column fragments per warp (the cube's tile is `32·fn` outputs).
    pub fnn: usize,
    /// Splits of the summed length, each a cube per tile (partial sums added afterwards).
    pub splits: usize,
}

impl TiledPlan {
    /// The plan for `rows` rows of x against `meta`'s weight (`x · Wᵀ`, or `x · W` when
    /// `transposed`) on a card of `sms` multiprocessors with tensor cores for the compute dtype
    /// (`mma`), or `None` when the tiled kernel does not apply: 16-bit compute, a summed length
    /// that is a multiple of 64 (and, transposed, `in` a multiple of 8), a block size that is a
    /// multiple of 8, more rows than the GEMV takes and few enough rows
    /// ([`tiled_by_default`]). `QWEN3VL_GEMM=dequant` turns it off, `tiled` lifts the row limit, `QWEN3VL_GEMM_TILE=FMxFN` and `QWEN3VL_GEMM_SPLITS=S` force the
    /// tile and the number of splits (for measurements).
    pub fn for_call(
        rows: usize,
        meta: Nf4Meta,
        sms: usize,
        mma: bool,
        transposed: bool,
    ) -> Option<Self> {
        let o = overrides();
        let choice = o.gemm.as_str();
        let (k_len, n_len) = if transposed {
            (meta.d_out, meta.d_in)
        } else {
            (meta.d_in, meta.d_out)
        };
        if !mma
            || choice == "dequant"
            || meta.compute.size() != 2
            || !k_len.is_multiple_of(STEP)
            || (transposed && !n_len.is_multiple_of(8))
            || !meta.blocksize.is_multiple_of(8)
            || rows <= super::GEMV_MAX_ROWS
            || (!tiled_by_default(rows, n_len) && choice != "tiled")
        {
            return None;
        }
        let steps = k_len / STEP;
        let cubes = |fm: usize, fnn: usize| rows.div_ceil(32 * fm) * n_len.div_ceil(32 * fnn);
        // The largest tile that still gives the card 1.5 cubes per multiprocessor.
        let (fm, fnn) = Self::parse(&o.gemm_tile)
            .or_else(|| {
                [(2, 2), (1, 2), (2, 1)]
                    .into_iter()
                    .find(|&(fm, fnn)| 2 * cubes(fm, fnn) >= 3 * sms)
            })
            .unwrap_or((1, 1));
        // A long sum (64 steps or more) is split until there are about 4 cubes per
        // multiprocessor, keeping 32 steps per split: on an H100 (session 18) two splits took
        // 9728 -> 2560 and 4096 -> 2560 at 128 rows from 109 / 60 to 104 / 55 µs, while
        // splitting the 40 steps of 2560 inputs was slower (the partial sums cost two launches).
        let splits = o
            .gemm_splits
            .unwrap_or_else(|| (4 * sms).div_ceil(cubes(fm, fnn)).min(steps / 32))
            .clamp(1, steps);
        Some(Self { fm, fnn, splits })
    }

    /// `"2x1"` → fm 2, fn 1 (each 1 or 2).
    fn parse(v: &str) -> Option<(usize, usize)> {
        let (a, b) = v.split_once('x')?;
        let (fm, fnn) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        ([1, 2].contains(&fm) && [1, 2].contains(&fnn)).then_some((fm, fnn))
    }
}

/// Whether `rows` rows of x with `n_len` outputs take the tiled GEMM by default rather than
/// dequantize + the library matmul: up to 256 rows, and up to 512 rows with at most 2²¹
/// outputs. H100, session 18, against burn's matmul on the dequantized weight: the tiled GEMM
/// was 1.1–1.8x at 128 rows on the five 4B shapes; at 512 rows 0.94–1.16x where the output is
/// at most 2²¹ values, 0.68x for 512 x 9728 (dequantize + matmul: 0.84); at 2048 rows 0.6–0.7x
/// (dequantize + matmul: 0.94–0.98).
pub fn tiled_by_default(rows: usize, n_len: usize) -> bool {
    rows <= 256 || (rows <= 512 && rows * n_len <= 1 << 21)
}

/// The tensor-core product `m x n x k` of `compute` values with f32 accumulators, as the
/// card's feature sets list it.
pub(super) fn f32_accumulated(compute: StorageType, m: u32, n: u32, k: u32) -> MmaConfig {
    MmaConfig {
        a_type: compute,
        b_type: compute,
        cd_type: ElemType::Float(FloatKind::F32).into(),
        m,
        n,
        k,
    }
}

/// Whether the card has 16x16x16 tensor-core products of `compute` with f32 accumulators.
pub(super) fn has_mma<R: CubeRuntime>(client: &ComputeClient<R>, compute: StorageType) -> bool {
    let cmma = &client.properties().features.matmul.cmma;
    cmma.contains(&f32_accumulated(compute, 16, 16, 16))
}

/// Launches the tiled kernel writing `out` from x [M, in] (or, `transposed`, x [M, out]): the
/// product [M, out] (or [M, in]) in the compute dtype, or with several splits their f32
/// partial sums [splits · M, ..]. x has contiguous rows in the compute dtype (`cube::tiled`
/// prepares it, `out` and the weight's kernel arguments).
pub(super) fn launch_tiled<R: CubeRuntime>(
    client: &ComputeClient<R>,
    x: CubeTensor<R>,
    [words, absmax, scale_words, scale_map, code]: [TensorArg<R>; 5],
    out: &CubeTensor<R>,
    meta: Nf4Meta,
    plan: TiledPlan,
    transposed: bool,
) {
    let rows = x.meta.shape()[0];
    let n_len = out.meta.shape()[1];
    let count = CubeCount::Static(
        n_len.div_ceil(32 * plan.fnn) as u32,
        rows.div_ceil(32 * plan.fm) as u32,
        plan.splits as u32,
    );
    let out_dtype = out.dtype;
    // SAFETY: every global index is in range by construction: x rows, W rows and (transposed)
    // W column words are clamped to the last, summed indices stay below the summed length (a
    // multiple of 64), stores are bounds-checked; shared indices stay inside their tiles.
    unsafe {
        kernels::nf4_gemm_tiled::launch_unchecked::<R>(
            client,
            count,
            CubeDim::new_1d(4 * WARP),
            8,
            x.into_tensor_arg(),
            words,
            absmax,
            scale_words,
            scale_map,
            code,
            out.clone().into_tensor_arg(),
            meta.offset,
            plan.fm,
            plan.fnn,
            transposed,
            meta.blocksize,
            meta.nested,
            meta.nested_blocksize,
            [meta.compute.into(), out_dtype.into()],
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
    fn tiled_plan_takes_the_largest_tile_that_fills_the_card_then_splits_the_sum() {
        let plan = |rows, d_in, d_out, transposed| {
            TiledPlan::for_call(rows, meta(d_in, d_out, DType::F16), 132, true, transposed)
        };
        let tile = |fm, fnn, splits| Some(TiledPlan { fm, fnn, splits });
        // 128 rows x 9728 outputs: 64 x 64 tiles give 2 · 152 cubes.
        assert_eq!(plan(128, 2560, 9728, false), tile(2, 2, 1));
        // 128 x 4096: 64 x 64 gives 128 cubes, 32 x 64 gives 256.
        assert_eq!(plan(128, 2560, 4096, false), tile(1, 2, 1));
        // 128 x 1024: 32 x 32 tiles (128 cubes); 40 steps are not split.
        assert_eq!(plan(128, 2560, 1024, false), tile(1, 1, 1));
        // 9728 -> 2560: 320 cubes of 32 x 32, 2 splits of 76 steps.
        assert_eq!(plan(128, 9728, 2560, false), tile(1, 1, 2));
        // Transposed, the output is `in` wide: 128 x 2560 from dY [128, 9728] (32 x 64 tiles
        // would give 160 cubes), the 152 steps in 2 splits.
        assert_eq!(plan(128, 2560, 9728, true), tile(1, 1, 2));
        // A short sum is not split: 320 -> 72 has 5 steps.
        assert_eq!(plan(37, 320, 72, false), tile(1, 1, 1));
        // 512 rows: tiled up to 2²¹ outputs.
        assert_eq!(plan(512, 2560, 4096, false), tile(2, 2, 1));
        assert_eq!(plan(512, 2560, 9728, false), None);
        // The GEMV's rows, more than the tiled rows, f32 compute, a summed length that is not
        // a multiple of 64 (`in`, or `out` transposed), no tensor cores: not tiled.
        assert_eq!(plan(8, 2560, 1024, false), None);
        assert_eq!(plan(600, 2560, 1024, false), None);
        assert_eq!(plan(128, 2600, 1024, false), None);
        assert_eq!(plan(128, 2560, 1000, true), None);
        let f32_meta = meta(2560, 1024, DType::F32);
        assert!(TiledPlan::for_call(128, f32_meta, 132, true, false).is_none());
        let f16_meta = meta(2560, 1024, DType::F16);
        assert!(TiledPlan::for_call(128, f16_meta, 132, false, false).is_none());
        assert_eq!(TiledPlan::parse("2x1"), Some((2, 1)));
        assert_eq!(TiledPlan::parse("4x1"), None);
    }
}
