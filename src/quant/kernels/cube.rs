//! The CubeCL kernels (burn-cuda) and [`Nf4Backend`] for burn's `CubeBackend`.
//!
//! Layout read by both kernels (see `Nf4Linear`): the weight's values in row-major order,
//! 8 per little-endian i32 word; in each byte the even element is the high nibble. A word never
//! straddles an absmax block (block sizes are multiples of 8 and at least 32).

use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{calculate_cube_count_elemwise, CubeCount, CubeDim};

use super::gemm_tiled::{has_mma, launch_tiled, TiledPlan};
use super::gemv::{launch_flat, launch_grouped, FlatPlan, GroupedPlan};
use super::gemv_mma::{has_mma_m16n8k16, launch_mma, MmaPlan};
use super::gemv_row::{launch_row, RowPlan};
use super::gemv_sliced::{launch_sliced, SlicedPlan};
use super::{gemv_or_dequantized_matmul, Nf4Backend, Nf4Meta, Nf4Parts, GEMV_MAX_ROWS};

/// Warps per cube of the GEMV kernel (each warp computes one row of W against every x row).
const GEMV_WARPS: u32 = 8;
/// Weight vectors each GEMV lane loads before it uses any (loads in flight per lane).
const GEMV_UNROLL: usize = 4;
/// Threads per warp on NVIDIA GPUs.
pub(super) const WARP: u32 = 32;

pub(super) mod kernels {
    use cubecl::prelude::*;

    /// Stages the 16 code values and (double quant) the 256-entry scale map in shared
    /// memory: every lane reads them with dynamic indices.
    #[cube]
    pub(in crate::quant::kernels) fn stage_tables(
        code: &Tensor<f32>,
        scale_map: &Tensor<f32>,
        lut: &mut SharedMemory<f32>,
        smap: &mut SharedMemory<f32>,
        #[comptime] nested: bool,
    ) {
        let threads = (CUBE_DIM_X * CUBE_DIM_Y) as usize;
        let t = (UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X) as usize;
        if t < 16 {
            lut[t] = code[t];
        }
        if nested {
            let mut s = t;
            while s < 256 {
                smap[s] = scale_map[s];
                s += threads;
            }
        }
        sync_cube();
    }

    /// The f32 scale of absmax block `block`: stored directly, or expanded from its 8-bit
    /// code as bitsandbytes does (`map[code] · nested_absmax[block / nested] + offset`, the
    /// map staged in shared memory).
    #[cube]
    pub(in crate::quant::kernels) fn block_scale(
        absmax: &Tensor<f32>,
        scale_words: &Tensor<i32>,
        smap: &SharedMemory<f32>,
        offset: f32,
        block: usize,
        #[comptime] nested: bool,
        #[comptime] nested_blocksize: usize,
    ) -> f32 {
        if nested {
            let word = u32::cast_from(scale_words[block / 4]);
            let code = (word >> (((block % 4) * 8) as u32)) & 255u32;
            smap[code as usize] * absmax[block / nested_blocksize] + offset
        } else {
            absmax[block]
        }
    }

    /// Right shift that brings element `i` (0..8) of a packed word to the low nibble.
    #[cube]
    pub(in crate::quant::kernels) fn nibble_shift(i: u32) -> u32 {
        (i / 2) * 8 + (1 - i % 2) * 4
    }

    /// One thread per packed word: writes its 8 dequantized values (f32 product, then cast)
    /// as one vector of the flat [out·in] output.
    #[cube(launch)]
    pub fn nf4_dequantize<F: Float, NO: Size>(
        words: &Tensor<i32>,
        absmax: &Tensor<f32>,
        scale_words: &Tensor<i32>,
        scale_map: &Tensor<f32>,
        code: &Tensor<f32>,
        out: &mut Tensor<Vector<F, NO>>,
        offset: f32,
        #[comptime] vs: usize,
        #[comptime] per: usize,
        #[comptime] blocksize: usize,
        #[comptime] nested: bool,
        #[comptime] nested_blocksize: usize,
        #[define(F)] _dtype: StorageType,
    ) {
        let mut lut = SharedMemory::<f32>::new(16usize);
        let mut smap = SharedMemory::<f32>::new(256usize);
        stage_tables(code, scale_map, &mut lut, &mut smap, nested);
        let g = ABSOLUTE_POS;
        if g < words.shape(0) {
            let word = u32::cast_from(words[g]);
            let scale = block_scale(
                absmax,
                scale_words,
                &smap,
                offset,
                (g * 8) / blocksize,
                nested,
                nested_blocksize,
            );
            // 8 values = `per` output vectors of `vs` values (8 x 1 for 16-bit, 4 x 2 for f32).
            #[unroll]
            for p in 0..per {
                let mut v = Vector::<F, NO>::empty();
                #[unroll]
                for i in 0..vs {
                    let c = (word >> nibble_shift((p * vs + i) as u32)) & 15u32;
                    v[i] = F::cast_from(lut[c as usize] * scale);
                }
                out[g * per + p] = v;
            }
        }
    }

    /// Adds one vector of `8 · nw` packed values (all in one absmax block, scale `scale`),
    /// starting at value `8 · nw · j` of the row, times every row of x to `acc`.
    #[cube]
    fn gemv_accumulate<F: Float, NX: Size, NW: Size>(
        x: &Tensor<Vector<F, NX>>,
        w: Vector<i32, NW>,
        scale: f32,
        lut: &SharedMemory<f32>,
        acc: &mut Array<f32>,
        j: usize,
        x_pitch: usize,
        #[comptime] nw: usize,
        #[comptime] vs: usize,
        #[comptime] rows: usize,
    ) {
        // The vector's 8·nw weights, dequantized once in registers.
        let mut wf = Array::<f32>::new(8 * nw);
        #[unroll]
        for q in 0..nw {
            let word = u32::cast_from(w[q]);
            #[unroll]
            for i in 0..8u32 {
                let c = (word >> nibble_shift(i)) & 15u32;
                wf[q * 8 + i as usize] = lut[c as usize];
            }
        }
        // x is read `8·nw / vs` vectors of `vs` values per row.
        let per = 8 * nw / vs;
        #[unroll]
        for m in 0..rows {
            let mut part = 0.0f32;
            #[unroll]
            for p in 0..per {
                let xv = x[m * x_pitch + j * per + p];
                #[unroll]
                for i in 0..vs {
                    part += wf[p * vs + i] * f32::cast_from(xv[i]);
                }
            }
            acc[m] += part * scale;
        }
    }

    /// `out[m, n] = Σ_k x[m, k] · W[n, k]` for `rows` (1..8) rows of x: one warp per row n of
    /// W. Each lane reads `unroll` vectors of `nw` packed words (128 bits when `nw` = 4) before
    /// it uses any, so that several loads per lane are in flight; the code table and the
    /// double-quant scale map sit in shared memory (a scale costs no dependent global load).
    /// f32 accumulation, one warp sum per output value.
    #[cube(launch_unchecked)]
    pub fn nf4_gemv<F: Float, NX: Size, NW: Size>(
        x: &Tensor<Vector<F, NX>>,
        words: &Tensor<Vector<i32, NW>>,
        absmax: &Tensor<f32>,
        scale_words: &Tensor<i32>,
        scale_map: &Tensor<f32>,
        code: &Tensor<f32>,
        out: &mut Tensor<F>,
        offset: f32,
        #[comptime] vs: usize,
        #[comptime] nw: usize,
        #[comptime] unroll: usize,
        #[comptime] rows: usize,
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
        // Row pitches in vectors / values (the allocator may pad rows).
        let x_pitch = x.stride(0) / vs;
        let out_pitch = out.stride(0);
        let n = CUBE_POS * (CUBE_DIM_Y as usize) + UNIT_POS_Y as usize;
        if n < d_out {
            let per_row = d_in / (8 * nw);
            let first = n * per_row;
            let lanes = CUBE_DIM_X as usize;
            let mut acc = Array::<f32>::new(rows);
            #[unroll]
            for m in 0..rows {
                acc[m] = 0.0f32;
            }
            let mut j = UNIT_POS_X as usize;
            while j < per_row {
                // Issue every weight load first (an index past the row reads its last vector
                // again and is not used).
                let mut w = Array::<Vector<i32, NW>>::new(unroll);
                #[unroll]
                for u in 0..unroll {
                    let ju = min(j + u * lanes, per_row - 1);
                    w[u] = words[first + ju];
                }
                #[unroll]
                for u in 0..unroll {
                    let ju = j + u * lanes;
                    if ju < per_row {
                        let block = ((first + ju) * 8 * nw) / blocksize;
                        let scale = block_scale(
                            absmax,
                            scale_words,
                            &smap,
                            offset,
                            block,
                            nested,
                            nested_blocksize,
                        );
                        gemv_accumulate::<F, NX, NW>(
                            x, w[u], scale, &lut, &mut acc, ju, x_pitch, nw, vs, rows,
                        );
                    }
                }
                j += unroll * lanes;
            }
            #[unroll]
            for m in 0..rows {
                let total = plane_sum(acc[m]);
                if UNIT_POS_X == 0 {
                    out[m * out_pitch + n] = F::cast_from(total);
                }
            }
        }
    }
}

/// Values per vector load/store: 16 bytes (the kernels also handle 4 x 2 for f32 values).
fn vector_size(meta: Nf4Meta) -> usize {
    if meta.compute.size() >= 4 {
        4
    } else {
        8
    }
}

/// The kernels' tensors on one CubeCL runtime, contiguous.
pub(super) struct CubeParts<R: CubeRuntime> {
    pub words: CubeTensor<R>,
    pub absmax: CubeTensor<R>,
    pub scale_words: CubeTensor<R>,
    pub scale_map: CubeTensor<R>,
    pub code: CubeTensor<R>,
}

impl<R: CubeRuntime> CubeParts<R> {
    /// The five tables, contiguous: words, absmax, scale words, scale map, code.
    fn into_contiguous(self) -> [CubeTensor<R>; 5] {
        [
            self.words,
            self.absmax,
            self.scale_words,
            self.scale_map,
            self.code,
        ]
        .map(into_contiguous)
    }

    /// The five tables as contiguous kernel arguments, in [`Self::into_contiguous`]'s order.
    pub(super) fn into_args(self) -> [cubecl::prelude::TensorArg<R>; 5] {
        self.into_contiguous().map(|t| t.into_tensor_arg())
    }

    /// Checks the dtypes the kernels are compiled for.
    fn check(&self) {
        assert_eq!(self.words.dtype, DType::I32, "NF4 words must be i32");
        assert_eq!(
            self.scale_words.dtype,
            DType::I32,
            "NF4 scale codes must be i32"
        );
        assert_eq!(self.absmax.dtype, DType::F32, "NF4 scales must be f32");
        assert_eq!(
            self.scale_map.dtype,
            DType::F32,
            "NF4 scale map must be f32"
        );
        assert_eq!(self.code.dtype, DType::F32, "NF4 code map must be f32");
    }
}

/// W [out, in] in `meta.compute`, one thread per packed word.
pub(super) fn dequantize<R: CubeRuntime>(p: CubeParts<R>, meta: Nf4Meta) -> CubeTensor<R> {
    p.check();
    let n_words = p.words.meta.shape()[0];
    let client = p.words.client.clone();
    // Flat, so that no row padding can sit between the values; reshaped below.
    let out = empty_device_dtype(
        client.clone(),
        p.words.device.clone(),
        Shape::new([meta.d_out * meta.d_in]),
        meta.compute,
    );
    let cube_dim = CubeDim::new_1d(256);
    let count = calculate_cube_count_elemwise(&client, n_words, cube_dim);
    let [words, absmax, scale_words, scale_map, code] = p.into_args();
    kernels::nf4_dequantize::launch::<R>(
        &client,
        count,
        cube_dim,
        vector_size(meta),
        words,
        absmax,
        scale_words,
        scale_map,
        code,
        out.clone().into_tensor_arg(),
        meta.offset,
        vector_size(meta),
        8 / vector_size(meta),
        meta.blocksize,
        meta.nested,
        meta.nested_blocksize,
        meta.compute.into(),
    );
    burn_cubecl::ops::reshape(out, Shape::new([meta.d_out, meta.d_in]))
}

/// x checked against the weight's kernel dtypes and made contiguous with 8-aligned rows, as
/// the GEMV and the tiled GEMM read it (`kernel` names the one in the messages).
fn kernel_input<R: CubeRuntime>(
    x: CubeTensor<R>,
    p: &CubeParts<R>,
    meta: Nf4Meta,
    kernel: &str,
) -> CubeTensor<R> {
    p.check();
    assert_eq!(
        x.dtype, meta.compute,
        "{kernel} input must be in the compute dtype"
    );
    let x = into_contiguous(x);
    assert!(
        x.meta.strides()[0].is_multiple_of(8),
        "{kernel} input rows must be 8-aligned"
    );
    x
}

/// `x · Wᵀ` for x [M, in] (M small, `in` a multiple of 8) in the compute dtype -> [M, out].
pub(super) fn gemv<R: CubeRuntime>(
    x: CubeTensor<R>,
    p: CubeParts<R>,
    meta: Nf4Meta,
) -> CubeTensor<R> {
    assert!(
        meta.d_in.is_multiple_of(8),
        "GEMV needs a multiple of 8 inputs"
    );
    let rows = x.meta.shape()[0];
    assert!(rows <= super::GEMV_MAX_ROWS, "GEMV takes at most 8 rows");
    let x = kernel_input(x, &p, meta, "GEMV");
    let client = x.client.clone();
    let out = empty_device_dtype(
        client.clone(),
        x.device.clone(),
        Shape::new([rows, meta.d_out]),
        meta.compute,
    );
    let sms = client.properties().hardware.num_streaming_multiprocessors;
    let sms = sms.unwrap_or(1) as usize;
    let mma = has_mma_m16n8k16(&client, meta.compute.into());
    if let Some(plan) = RowPlan::for_call(rows, meta, mma) {
        let parts = p.into_contiguous();
        launch_row(&client, &x, parts.each_ref(), &out, meta, plan);
        return out;
    }
    if let Some(plan) = MmaPlan::for_call(rows, meta, mma, sms) {
        launch_mma(
            &client,
            &x,
            p.into_contiguous().each_ref(),
            &out,
            meta,
            plan,
        );
        return out;
    }
    let args = p.into_args();
    if let Some(plan) = SlicedPlan::for_call(rows, meta, sms) {
        launch_sliced(&client, x, args, &out, meta, plan);
        return out;
    }
    if let Some(plan) = FlatPlan::for_call(rows, meta) {
        launch_flat(&client, x, args, &out, meta, plan);
        return out;
    }
    if let Some(plan) = GroupedPlan::for_call(rows, meta) {
        launch_grouped(&client, x, args, &out, meta, plan);
        return out;
    }
    let [words, absmax, scale_words, scale_map, code] = args;
    let cubes = meta.d_out.div_ceil(GEMV_WARPS as usize) as u32;
    // 128-bit weight loads when a row holds a whole number of them.
    let nw = if (meta.d_in / 8).is_multiple_of(4) {
        4
    } else {
        1
    };
    // SAFETY: every index the kernel reads is in range by construction (rows `n < d_out`,
    // vector indices clamped to the row), so the launch skips the bounds checks.
    unsafe {
        kernels::nf4_gemv::launch_unchecked::<R>(
            &client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_2d(WARP, GEMV_WARPS),
            vector_size(meta),
            nw,
            x.into_tensor_arg(),
            words,
            absmax,
            scale_words,
            scale_map,
            code,
            out.clone().into_tensor_arg(),
            meta.offset,
            vector_size(meta),
            nw,
            GEMV_UNROLL,
            rows,
            meta.blocksize,
            meta.nested,
            meta.nested_blocksize,
            meta.compute.into(),
        );
    }

    out
}

/// The tiled GEMM's plan for `rows` rows of x on `client`'s card, if it applies (see
/// [`TiledPlan::for_call`]).
fn tiled_plan<R: CubeRuntime>(
    client: &cubecl::prelude::ComputeClient<R>,
    rows: usize,
    meta: Nf4Meta,
    transposed: bool,
) -> Option<TiledPlan> {
    let sms = client.properties().hardware.num_streaming_multiprocessors;
    let mma = has_mma(client, meta.compute.into());
    TiledPlan::for_call(rows, meta, sms.unwrap_or(1) as usize, mma, transposed)
}

/// `x · Wᵀ` (x [M, in]) or, `transposed`, `x · W` (x [M, out]) by the tiled tensor-core
/// GEMM laid out by `plan`, x in the compute dtype.
fn tiled<R: CubeRuntime>(
    x: CubeTensor<R>,
    p: CubeParts<R>,
    meta: Nf4Meta,
    plan: TiledPlan,
    transposed: bool,
) -> CubeTensor<R> {
    let x = kernel_input(x, &p, meta, "GEMM");
    let client = x.client.clone();
    let rows = x.meta.shape()[0];
    let width = if transposed { meta.d_in } else { meta.d_out };
    // Several splits write f32 partial sums [splits · M, width], added up below.
    let (out_rows, out_dtype) = match plan.splits {
        1 => (rows, meta.compute),
        s => (s * rows, DType::F32),
    };
    let out = empty_device_dtype(
        client.clone(),
        x.device.clone(),
        Shape::new([out_rows, width]),
        out_dtype,
    );
    launch_tiled(&client, x, p.into_args(), &out, meta, plan, transposed);
    out
}

/// The tiled GEMM's result as a tensor: its output, or the sum of its splits' partial sums
/// ([splits · M, n] f32) in the compute dtype.
fn tiled_result<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    out: CubeTensor<R>,
    plan: TiledPlan,
    meta: Nf4Meta,
) -> Tensor<CubeBackend<R, F, I, BT>, 2> {
    let t = Tensor::<CubeBackend<R, F, I, BT>, 2>::from_primitive(TensorPrimitive::Float(out));
    if plan.splits == 1 {
        return t;
    }
    let [rows, n] = t.dims();
    let rows = rows / plan.splits;
    t.reshape([plan.splits, rows, n])
        .sum_dim(0)
        .reshape([rows, n])
        .cast(meta.compute)
}

/// The kernels run for 16-bit compute (f16, bf16), the dtypes checked on the GPU; f32 compute
/// takes the reference path.
fn kernel_dtype(meta: Nf4Meta) -> bool {
    matches!(meta.compute, DType::F16 | DType::BF16)
}

/// The tiled GEMM's plan for x against w (16-bit compute, rows past the GEMV's), if any.
fn tiled_for<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    x: &Tensor<CubeBackend<R, F, I, BT>, 2>,
    w: &Nf4Parts<CubeBackend<R, F, I, BT>>,
    transposed: bool,
) -> Option<TiledPlan> {
    let rows = x.dims()[0];
    if !kernel_dtype(w.meta) || rows <= GEMV_MAX_ROWS {
        return None;
    }
    let client = &w.words.clone().into_primitive().client;
    tiled_plan(client, rows, w.meta, transposed)
}

fn float<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    t: Tensor<CubeBackend<R, F, I, BT>, D>,
) -> CubeTensor<R> {
    t.into_primitive().tensor()
}

fn cube_parts<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    w: &Nf4Parts<CubeBackend<R, F, I, BT>>,
) -> (CubeParts<R>, Nf4Meta) {
    let p = w.clone();
    (
        CubeParts {
            words: p.words.into_primitive(),
            absmax: float(p.absmax),
            scale_words: p.scale_words.into_primitive(),
            scale_map: float(p.scale_map),
            code: float(p.code),
        },
        p.meta,
    )
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Nf4Backend
    for CubeBackend<R, F, I, BT>
{
    fn nf4_dequantize(w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        if !kernel_dtype(w.meta) {
            return w.dequantize_reference();
        }
        let (parts, meta) = cube_parts(w);
        Tensor::from_primitive(TensorPrimitive::Float(dequantize(parts, meta)))
    }

    fn nf4_gemv(x: Tensor<Self, 2>, w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        if !kernel_dtype(w.meta) {
            return x.matmul(w.dequantize_reference().transpose());
        }
        let (parts, meta) = cube_parts(w);
        let x = float(x.cast(meta.compute));
        Tensor::from_primitive(TensorPrimitive::Float(gemv(x, parts, meta)))
    }

    fn nf4_matmul(x: Tensor<Self, 2>, w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        match tiled_for::<R, F, I, BT>(&x, w, false) {
            Some(plan) => {
                let (parts, meta) = cube_parts(w);
                let x = float(x.cast(meta.compute));
                tiled_result(tiled(x, parts, meta, plan, false), plan, meta)
            }
            None => gemv_or_dequantized_matmul(x, w),
        }
    }

    fn nf4_matmul_transposed(dy: Tensor<Self, 2>, w: &Nf4Parts<Self>) -> Tensor<Self, 2> {
        match tiled_for::<R, F, I, BT>(&dy, w, true) {
            Some(plan) => {
                let (parts, meta) = cube_parts(w);
                let dy = float(dy.cast(meta.compute));
                tiled_result(tiled(dy, parts, meta, plan, true), plan, meta)
            }
            None => dy.matmul(Self::nf4_dequantize(w)),
        }
    }
}
