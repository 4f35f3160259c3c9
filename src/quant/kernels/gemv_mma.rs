//! The NF4 GEMV on tensor cores for 2..8 rows of x (decoding several sequences; one row with
//! `QWEN3VL_GEMV=mma`), a CUDA C++ kernel (`gemv_mma.cu`) launched through CubeCL's runtime
//! ([`super::raw_cuda`]). H100, ncu (session 19): 8 rows cost what 1 row does, 2.3–3.0x faster
//! than the two-rows-per-warp kernel; at 1 row the sliced kernel stays faster on 3 of 5 shapes.
//!
//! Why not in CubeCL's kernel language: the sliced kernel spends ~7 instructions per weight,
//! four of them on each table address, because CubeCL indexes shared memory in elements.
//! Here a packed byte becomes a shared-memory byte offset in two instructions, one read
//! returns the byte's two values as the 16-bit pair an `mma.sync` A fragment holds, and one
//! m16n8k16 tensor-core product consumes 4 such bytes per lane for all 8 rows of x at once.
//! See the `.cu` file for the fragment layout.

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::{ComputeClient, StorageType};
use cubecl::CubeCount;

use super::gemm_tiled::f32_accumulated;
use super::overrides::overrides;
use super::raw_cuda::{configured_kernel, is_cuda, launch_raw, Defines, RawCudaKernel};
use super::Nf4Meta;

/// The kernel's source after its configuration's `#define`s.
const SOURCE: &str = concat!(include_str!("gemv_common.cuh"), include_str!("gemv_mma.cu"));
/// Absmax blocks a warp takes by default.
const BPW: usize = 4;
/// Most warps per cube (their partial sums and the pair table fill 41 of the 48 KiB of static
/// shared memory).
const MAX_WARPS: usize = 16;

/// How the tensor-core GEMV is laid out for one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MmaPlan {
    /// Rows of x.
    pub rows: usize,
    /// Warps per cube (each takes `bpw` of the row's absmax blocks).
    pub warps: usize,
    /// Absmax blocks per warp.
    pub bpw: usize,
    /// Blocks whose loads are issued before any is used.
    pub chunk: usize,
    /// Tiles of 16 W rows per cube (the pair table is staged once per cube).
    pub tiles: usize,
}

impl MmaPlan {
    /// The plan for `rows` rows of x against `meta`'s weight on a card of `sms` multiprocessors
    /// that has `mma` (the m16n8k16 tensor-core product of the compute dtype), or `None` when
    /// the kernel does not apply: 2..8 rows (1 with `QWEN3VL_GEMV=mma`), 16-bit compute,
    /// double-quantized blocks of 64, `d_in` a multiple of 64, `d_out` of 16, and
    /// `QWEN3VL_GEMV` unset, `mma` or `row` (which gives one row to `gemv_row`).
    /// `QWEN3VL_GEMV_BPW`, `_CHUNK` and `_TILES` override the blocks per warp, the loads in
    /// flight and the tiles per cube (for measurements).
    pub fn for_call(rows: usize, meta: Nf4Meta, mma: bool, sms: usize) -> Option<Self> {
        let o = overrides();
        // One row goes to `gemv_row` (or the sliced kernel where that does not apply) unless
        // `QWEN3VL_GEMV=mma`: the sliced kernel was already faster than this one there on three
        // of the 4B's five shapes (H100, tests/NOTES.md "session 19").
        let one_row = rows == 1 && o.choice != "mma";
        if one_row
            || !(1..=8).contains(&rows)
            || !(o.choice.is_empty() || o.choice == "mma" || o.choice == "row")
            || !fits_mma_tiles(meta, mma, 64)
        {
            return None;
        }
        let blocks = meta.d_in / 64;
        let bpw = o
            .bpw
            .unwrap_or(BPW.max(blocks.div_ceil(MAX_WARPS)))
            .clamp(blocks.div_ceil(MAX_WARPS), blocks);
        // About two cubes per multiprocessor: a cube stages its 32 KiB pair table once for all
        // its tiles.
        let tiles = meta.d_out / 16;
        Some(Self {
            rows,
            warps: blocks.div_ceil(bpw),
            bpw,
            chunk: o.chunk.unwrap_or(2).clamp(1, bpw),
            tiles: o.tiles.unwrap_or(tiles / (2 * sms.max(1))).clamp(1, tiles),
        })
    }

    /// The `#define`s that configure the kernel for `meta`'s weight, x rows `x_pitch` values
    /// apart and output rows `out_pitch` apart.
    fn defines(&self, meta: Nf4Meta, x_pitch: usize, out_pitch: usize) -> Defines {
        vec![
            ("K", meta.d_in),
            ("N", meta.d_out),
            ("ROWS", self.rows),
            ("XP", x_pitch),
            ("OP", out_pitch),
            ("NW", self.warps),
            ("BPW", self.bpw),
            ("CH", self.chunk),
            ("TPC", self.tiles),
            ("NBS", meta.nested_blocksize),
            (
                "BF16",
                usize::from(meta.compute == burn::tensor::DType::BF16),
            ),
        ]
    }
}

/// Whether a tensor-core GEMV's tiles fit `meta`'s weight on a card with (`mma`) the m16n8k16
/// product: 16-bit compute, double-quantized blocks of 64, `d_in` a multiple of `d_in_step`
/// and `d_out` of 16 (one tile's rows).
pub(super) fn fits_mma_tiles(meta: Nf4Meta, mma: bool, d_in_step: usize) -> bool {
    mma && meta.compute.size() == 2
        && meta.nested
        && meta.blocksize == 64
        && meta.d_in.is_multiple_of(d_in_step)
        && meta.d_out.is_multiple_of(16)
}

/// Whether `client`'s card runs the m16n8k16 tensor-core product of `compute` values with
/// f32 accumulators, on the CUDA runtime (what the kernel is written for).
pub(super) fn has_mma_m16n8k16<R: CubeRuntime>(
    client: &ComputeClient<R>,
    compute: StorageType,
) -> bool {
    let mma = &client.properties().features.matmul.mma;
    is_cuda(client) && mma.contains(&f32_accumulated(compute, 16, 8, 16))
}

/// Launches the kernel writing `out` [rows, out] from x [rows, in] (rows contiguous, in the
/// compute dtype) and the weight's tensors: words, nested absmax, scale words, scale map, code.
pub(super) fn launch_mma<R: CubeRuntime>(
    client: &ComputeClient<R>,
    x: &CubeTensor<R>,
    weight: [&CubeTensor<R>; 5],
    out: &CubeTensor<R>,
    meta: Nf4Meta,
    plan: MmaPlan,
) {
    // Rows may be padded (CubeCL pitches some allocations): both pitches are part of the source.
    let (x_pitch, out_pitch) = (x.meta.strides()[0], out.meta.strides()[0]);
    assert!(
        x_pitch.is_multiple_of(8) && x_pitch >= meta.d_in && out_pitch >= meta.d_out,
        "GEMV rows must be 8-aligned and unclipped"
    );
    let threads = 32 * plan.warps as u32;
    let kernel = configured_kernel(
        SOURCE,
        "nf4_gemv_mma",
        plan.defines(meta, x_pitch, out_pitch),
        threads,
        0,
    );
    let cubes = (meta.d_out / 16).div_ceil(plan.tiles) as u32;
    // SAFETY: cube c reads the rows of its tiles below d_out of W and their scales, x rows below
    // `rows` (each `d_in` long), and writes out[n, its rows] for n < rows.
    unsafe { launch_gemv_source(client, kernel, cubes, x, weight, out, meta) };
}

/// Queues a CUDA C++ GEMV (`gemv_mma.cu`, `gemv_row.cu`: the same parameters) on `cubes` cubes:
/// x, the weight's five tensors, the output, then the scalars (the double-quantization offset).
///
/// # Safety
/// `kernel` must read and write only inside these buffers for every cube of the grid.
pub(super) unsafe fn launch_gemv_source<R: CubeRuntime>(
    client: &ComputeClient<R>,
    kernel: RawCudaKernel,
    cubes: u32,
    x: &CubeTensor<R>,
    [words, absmax, scale_words, scale_map, code]: [&CubeTensor<R>; 5],
    out: &CubeTensor<R>,
    meta: Nf4Meta,
) {
    // SAFETY: the caller vouches for the kernel's indexing; the parameters are these seven
    // buffers and the offset, in the sources' order.
    unsafe {
        launch_raw(
            client,
            kernel,
            CubeCount::Static(cubes, 1, 1),
            &[x, words, absmax, scale_words, scale_map, code, out],
            vec![u64::from(meta.offset.to_bits())],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::raw_cuda::with_defines;
    use super::*;
    use burn::tensor::DType;

    fn meta(d_in: usize, d_out: usize, compute: DType) -> Nf4Meta {
        Nf4Meta::for_plan_test(d_in, d_out, compute)
    }

    #[test]
    fn mma_plan_gives_each_warp_a_run_of_blocks() {
        // The 4B shapes: 40, 64 and 152 blocks of 64 per row.
        for (d_in, warps, bpw) in [(2560, 10, 4), (4096, 16, 4), (9728, 16, 10)] {
            let plan = MmaPlan::for_call(2, meta(d_in, 1024, DType::F16), true, 132).unwrap();
            assert_eq!(
                (plan.warps, plan.bpw, plan.chunk),
                (warps, bpw, 2),
                "{d_in}"
            );
            assert_eq!(plan.tiles, 1, "64 tiles on 132 multiprocessors");
            assert!(plan.warps * plan.bpw >= d_in / 64);
            assert!((plan.warps - 1) * plan.bpw < d_in / 64, "no idle warp");
        }
        let plan = MmaPlan::for_call(8, meta(128, 48, DType::BF16), true, 132).unwrap();
        assert_eq!((plan.rows, plan.warps, plan.bpw, plan.chunk), (8, 1, 2, 2));
        // 608 tiles of 2560 -> 9728: two per cube on 132 multiprocessors.
        let plan = MmaPlan::for_call(8, meta(2560, 9728, DType::F16), true, 132).unwrap();
        assert_eq!(plan.tiles, 2);
        // One row (it goes to the one-row kernels unless `QWEN3VL_GEMV=mma`), no tensor cores,
        // 9 rows, f32, d_in or d_out off the tile, plain scales, block 128.
        let m = meta(2560, 1024, DType::F16);
        assert!(MmaPlan::for_call(1, m, true, 132).is_none());
        assert!(MmaPlan::for_call(2, m, false, 132).is_none());
        assert!(MmaPlan::for_call(9, m, true, 132).is_none());
        assert!(MmaPlan::for_call(2, meta(2560, 1024, DType::F32), true, 132).is_none());
        assert!(MmaPlan::for_call(2, meta(2600, 1024, DType::F16), true, 132).is_none());
        assert!(MmaPlan::for_call(2, meta(2560, 1000, DType::F16), true, 132).is_none());
        assert!(MmaPlan::for_call(2, Nf4Meta { nested: false, ..m }, true, 132).is_none());
        assert!(MmaPlan::for_call(
            2,
            Nf4Meta {
                blocksize: 128,
                ..m
            },
            true,
            132
        )
        .is_none());
    }

    #[test]
    fn mma_source_defines_the_configuration_before_the_kernel() {
        let m = meta(2560, 9728, DType::BF16);
        let src = with_defines(
            &MmaPlan::for_call(3, m, true, 132)
                .unwrap()
                .defines(m, 2560, 9736),
            SOURCE,
        );
        for line in [
            "#define K 2560u",
            "#define N 9728u",
            "#define ROWS 3u",
            "#define XP 2560u",
            "#define OP 9736u",
            "#define NW 10u",
            "#define NBS 256u",
            "#define BF16 1u",
        ] {
            assert!(src.contains(line), "{line}");
        }
        assert!(src.find("#define K ").unwrap() < src.find("nf4_gemv_mma").unwrap());
    }
}
