//! The NF4 GEMV for one row of x (decoding one sequence), written for memory bandwidth: a CUDA
//! C++ kernel (`gemv_row.cu`) on tensor cores, launched through CubeCL's runtime
//! ([`super::raw_cuda`]).
//!
//! At one row the GEMV reads each packed byte once and does little with it, so its time is how
//! long the reads take. A cube loads x and the small tables, starts the loads of W, then stages
//! x and the dequantization table while they are in flight. W either goes to registers, all of it
//! before the first product (ptxas then waits for the last load before any product), or
//! streams through a ring of `stages` slots per warp in shared memory (cp.async of whole
//! 128-byte lines, one wait per 4 blocks), so the products of early blocks overlap the
//! transfer of later ones. The 32 KiB pair table sits on a 32 KiB boundary of dynamic shared
//! memory, so a table address costs a shift and one OR (see the `.cu` file). The default
//! (`BY_DEFAULT`, since session 25): one tile of 16 rows per cube (the card then spreads the
//! cubes evenly over its multiprocessors), W in registers for runs of up to 8 blocks a warp,
//! one slot for longer runs.

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::ComputeClient;

use super::gemv_mma::{fits_mma_tiles, launch_gemv_source};
use super::overrides::{overrides, Overrides};
use super::raw_cuda::{configured_kernel, Defines};
use super::Nf4Meta;

/// The kernel's source after its configuration's `#define`s.
const SOURCE: &str = concat!(include_str!("gemv_common.cuh"), include_str!("gemv_row.cu"));
/// Most warps per cube.
const MAX_WARPS: usize = 16;
/// Most tiles of 16 W rows per cube.
const MAX_TILES: usize = 8;
/// Shared memory per multiprocessor on sm_90, and what the hardware reserves per cube (the
/// first 1 KiB of the shared window: the dynamic region starts at window offset 0x400).
const SMEM_PER_SM: usize = 228 * 1024;
const SMEM_RESERVED: usize = 0x400;
/// Most dynamic shared memory one cube may take on sm_90 (227 KiB).
const MAX_DYNAMIC: usize = 227 * 1024;
/// Bytes of one ring slot of a warp: 4 blocks of 16 W rows (a 128-byte line of each row).
const SLOT_BYTES: usize = 2048;
/// 32-bit registers per multiprocessor.
const REGISTERS: usize = 65536;
/// Whether one row takes this kernel without `QWEN3VL_GEMV=row`: yes since session 25, when
/// one tile per cube (and one slot of whole lines for long runs) made it faster than the
/// sliced kernel on all five 4B shapes (H100, ncu, tests/NOTES.md "session 25").
const BY_DEFAULT: bool = true;
/// Longest run of blocks a warp keeps in registers. Longer runs (9728 inputs: 12 blocks) made
/// ptxas spill and were faster streamed through one ring slot of whole lines (H100, lab,
/// "session 25": 11.98 against 14.06 µs at 9728->2560).
const REGISTER_RUN: usize = 8;

/// Shared-memory bytes below the pair table for `d_in` inputs, `warps` warps and `tiles` tiles
/// per cube: x (2 bytes a value), the scale map (1 KiB), the code table (64 B) and the partial
/// sums (16 f32 per warp and tile); the `.cu` file's `LOW_BYTES`.
fn low_bytes(d_in: usize, warps: usize, tiles: usize) -> usize {
    2 * d_in + 1024 + 64 + 16 * 4 * warps * tiles
}

/// Where the 32 KiB pair table starts, in bytes from the start of the dynamic region: at the
/// first window offset aligned to its size (0x8000). Below it go x, the scale map, the code
/// table, the partial sums (and the ring, if it fits).
const TABLE_AT: usize = 0x8000 - SMEM_RESERVED;
/// Where the pair table ends (window offset 0x10000); a ring that does not fit below it
/// starts here.
const TABLE_END: usize = 0x10000 - SMEM_RESERVED;

/// Where the ring of `stages` slots per warp starts (bytes from the start of the dynamic
/// region; the `.cu` file's `STAGE_AT`) and the dynamic shared memory the cube then needs: below
/// the pair table where the small inputs leave room, else above it.
fn ring_layout(d_in: usize, warps: usize, tiles: usize, stages: usize) -> (usize, usize) {
    let low = low_bytes(d_in, warps, tiles);
    let ring = stages * warps * SLOT_BYTES;
    if stages == 0 {
        (0, TABLE_END)
    } else if low + ring <= TABLE_AT {
        (low, TABLE_END)
    } else {
        (TABLE_END, TABLE_END + ring)
    }
}

/// How the one-row GEMV is laid out for one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowPlan {
    /// Warps per cube; warp w takes absmax blocks `w * bpw ..` of every row of the cube's tiles.
    pub warps: usize,
    /// Absmax blocks per warp (a multiple of 4: one word of 8-bit scale codes per row).
    pub bpw: usize,
    /// Tiles of 16 W rows per cube (all their loads are issued at once).
    pub tiles: usize,
    /// Cubes per multiprocessor the registers are budgeted for (`__launch_bounds__`).
    pub min_cubes: usize,
    /// Slots per warp of the ring W streams through (cp.async of 4 blocks' whole 128-byte
    /// lines of the 16 rows into shared memory, one wait per slot); 0 loads W into registers,
    /// all of it before the first product.
    pub stages: usize,
}

impl RowPlan {
    /// The plan for `rows` rows of x against `meta`'s weight on a card that has `mma` (the
    /// m16n8k16 tensor-core product of the compute dtype), or `None` when the kernel does not
    /// apply: one row, 16-bit compute, double-quantized blocks of 64, `d_in` a multiple of 256
    /// (at most ~15,000), `d_out` of 16, and `QWEN3VL_GEMV` unset ([`BY_DEFAULT`]) or `row`.
    /// `QWEN3VL_GEMV_BPW`, `_TILES`, `_MINB` and `_STAGES` override the blocks per warp, the
    /// tiles per cube, the cubes per multiprocessor and the ring's slots (for measurements).
    pub fn for_call(rows: usize, meta: Nf4Meta, mma: bool) -> Option<Self> {
        let o = overrides();
        if !(o.choice == "row" || (o.choice.is_empty() && BY_DEFAULT)) {
            return None;
        }
        Self::planned(rows, meta, mma, o)
    }

    /// [`Self::for_call`]'s plan with the overrides `o`, whatever `QWEN3VL_GEMV` says.
    fn planned(rows: usize, meta: Nf4Meta, mma: bool, o: &Overrides) -> Option<Self> {
        if rows != 1 || !fits_mma_tiles(meta, mma, 256) {
            return None;
        }
        let blocks = meta.d_in / 64;
        // Runs of a multiple of 4 blocks, at most MAX_WARPS of them per row.
        let least = blocks.div_ceil(MAX_WARPS).next_multiple_of(4);
        let bpw = o
            .bpw
            .map_or(least, |b| b.next_multiple_of(4))
            .clamp(least, blocks);
        let warps = blocks.div_ceil(bpw);
        let by_smem = |dynamic: usize| (SMEM_PER_SM / (dynamic + SMEM_RESERVED)).max(1);
        let cubes_per_sm = by_smem(TABLE_END).min(2048 / (32 * warps)).max(1);
        // One tile per cube: the card hands the next cube to whichever multiprocessor frees
        // a slot, so the work evens out over them.
        let tiles = o
            .tiles
            .unwrap_or(1)
            .clamp(1, (meta.d_out / 16).min(MAX_TILES));
        if low_bytes(meta.d_in, warps, tiles) > TABLE_AT {
            return None;
        }
        // Runs longer than REGISTER_RUN blocks stream W through one slot. No more slots than
        // units of 4 blocks a warp takes, nor than a cube's shared memory holds.
        let streamed = usize::from(bpw > REGISTER_RUN);
        let mut stages = o.stages.unwrap_or(streamed).min(tiles * bpw / 4);
        let layout = |stages| ring_layout(meta.d_in, warps, tiles, stages);
        while stages > 0 && layout(stages).1 > MAX_DYNAMIC {
            stages -= 1;
        }
        let (_, dynamic) = layout(stages);
        // About 28 registers plus 4 per block in flight (ptxas reports 54–72 on the 4B
        // shapes); as many resident cubes as leave that many. With a ring, W takes no
        // registers and shared memory sets the count.
        let need = 28 + 4 * bpw * tiles;
        let fitting = if stages > 0 {
            by_smem(dynamic).min(2048 / (32 * warps)).max(1)
        } else {
            (1..=cubes_per_sm)
                .rev()
                .find(|&m| REGISTERS / (m * 32 * warps) >= need)
                .unwrap_or(1)
        };
        Some(Self {
            warps,
            bpw,
            tiles,
            min_cubes: o.min_cubes.unwrap_or(fitting).max(1),
            stages,
        })
    }

    /// Where the ring starts and the bytes of dynamic shared memory the cube is launched with.
    fn layout(&self, meta: Nf4Meta) -> (usize, usize) {
        ring_layout(meta.d_in, self.warps, self.tiles, self.stages)
    }

    /// The `#define`s that configure the kernel for `meta`'s weight.
    fn defines(&self, meta: Nf4Meta) -> Defines {
        let (stage_at, dynamic) = self.layout(meta);
        vec![
            ("K", meta.d_in),
            ("N", meta.d_out),
            ("NW", self.warps),
            ("BPW", self.bpw),
            ("TPC", self.tiles),
            ("MINB", self.min_cubes),
            ("NBS", meta.nested_blocksize),
            ("DYN", dynamic),
            ("STAGES", self.stages),
            ("STAGE_AT", stage_at),
            (
                "BF16",
                usize::from(meta.compute == burn::tensor::DType::BF16),
            ),
        ]
    }
}

/// Launches the kernel writing `out` [1, out] from x [1, in] (in the compute dtype, 16-byte
/// aligned) and the weight's tensors: words, nested absmax, scale words, scale map, code.
pub(super) fn launch_row<R: CubeRuntime>(
    client: &ComputeClient<R>,
    x: &CubeTensor<R>,
    weight: [&CubeTensor<R>; 5],
    out: &CubeTensor<R>,
    meta: Nf4Meta,
    plan: RowPlan,
) {
    assert_eq!(x.meta.shape()[0], 1, "the one-row GEMV takes one row of x");
    let kernel = configured_kernel(
        SOURCE,
        "nf4_gemv_row",
        plan.defines(meta),
        32 * plan.warps as u32,
        plan.layout(meta).1,
    );
    let cubes = (meta.d_out / 16).div_ceil(plan.tiles) as u32;
    // SAFETY: cube c reads the rows of its tiles of W (clamped below d_out) and their scales,
    // x's d_in values, and writes out[its rows below d_out]; its shared memory stays inside the
    // dynamic shared memory it is launched with (it traps otherwise).
    unsafe { launch_gemv_source(client, kernel, cubes, x, weight, out, meta) };
}

#[cfg(test)]
mod tests {
    use super::super::raw_cuda::with_defines;
    use super::*;
    use burn::tensor::DType;

    fn meta(d_in: usize, d_out: usize) -> Nf4Meta {
        Nf4Meta::for_plan_test(d_in, d_out, DType::F16)
    }

    /// The plan without overrides, whether or not the kernel is on by default.
    fn plan(rows: usize, meta: Nf4Meta, mma: bool) -> Option<RowPlan> {
        RowPlan::planned(rows, meta, mma, &Overrides::default())
    }

    #[test]
    fn row_plan_gives_each_cube_one_tile_and_streams_long_runs() {
        // (in, out): warps, blocks per warp, tiles per cube, cubes per multiprocessor, slots.
        for ((d_in, d_out), want) in [
            ((2560, 4096), (10, 4, 1, 3, 0)),
            ((2560, 1024), (10, 4, 1, 3, 0)),
            ((4096, 2560), (16, 4, 1, 2, 0)),
            ((2560, 9728), (10, 4, 1, 3, 0)),
            ((9728, 2560), (13, 12, 1, 2, 1)),
        ] {
            let plan = plan(1, meta(d_in, d_out), true).unwrap();
            let got = (
                plan.warps,
                plan.bpw,
                plan.tiles,
                plan.min_cubes,
                plan.stages,
            );
            assert_eq!(got, want, "{d_in}->{d_out}");
            assert!(plan.warps * plan.bpw >= d_in / 64);
            assert!((plan.warps - 1) * plan.bpw < d_in / 64, "no idle warp");
        }
        // 12-block runs stream through one slot of 13 warps x 2 KiB above the table.
        let m = meta(9728, 2560);
        let (at, dynamic) = plan(1, m, true).unwrap().layout(m);
        assert_eq!((at, dynamic), (TABLE_END, TABLE_END + 13 * 2048));
        // An explicit STAGES=0 keeps W in registers, whatever the run.
        let o = Overrides {
            stages: Some(0),
            ..Overrides::default()
        };
        assert_eq!(RowPlan::planned(1, m, true, &o).unwrap().stages, 0);
    }

    #[test]
    fn ring_goes_below_the_table_where_it_fits_else_above_it() {
        assert_eq!(
            TABLE_END,
            0x10000 - 0x400,
            "the table ends at window 0x10000"
        );
        // 512 inputs, 1 warp, 3 tiles: 2,304 bytes of small inputs + 2 x 2 KiB of ring.
        assert_eq!(ring_layout(512, 1, 3, 2), (2304, TABLE_END));
        // 2560 inputs, 10 warps: 2 x 10 x 2 KiB do not fit below the table; the ring follows it.
        let (at, dynamic) = ring_layout(2560, 10, 2, 2);
        assert_eq!((at, dynamic), (TABLE_END, TABLE_END + 2 * 10 * 2048));
        assert_eq!(ring_layout(2560, 10, 2, 0), (0, TABLE_END));
        // With the ring, shared memory sets the cubes per multiprocessor.
        let o = Overrides {
            stages: Some(2),
            ..Overrides::default()
        };
        let m = meta(9728, 2560);
        let p = RowPlan::planned(1, m, true, &o).unwrap();
        assert_eq!(p.stages, 2);
        let (_, dynamic) = p.layout(m);
        assert_eq!(dynamic, TABLE_END + 2 * 13 * 2048);
        assert_eq!(p.min_cubes, SMEM_PER_SM / (dynamic + SMEM_RESERVED));
        // No more slots than units of 4 blocks a warp takes (2560->9728, 2 tiles: 2 units).
        let o = Overrides {
            stages: Some(64),
            tiles: Some(2),
            ..Overrides::default()
        };
        let p = RowPlan::planned(1, meta(2560, 9728), true, &o).unwrap();
        assert_eq!((p.tiles, p.bpw, p.stages), (2, 4, 2), "{p:?}");
        // Nor more than a cube's shared memory holds.
        let o = Overrides {
            stages: Some(64),
            tiles: Some(8),
            ..Overrides::default()
        };
        let p = RowPlan::planned(1, m, true, &o).unwrap();
        let (_, dynamic) = p.layout(m);
        assert!(p.stages > 0 && dynamic <= MAX_DYNAMIC, "{p:?}: {dynamic}");
        assert!(ring_layout(9728, p.warps, p.tiles, p.stages + 1).1 > MAX_DYNAMIC);
    }

    #[test]
    fn row_plan_applies_only_where_the_kernel_does() {
        let m = meta(2560, 1024);
        assert!(plan(1, m, true).is_some());
        assert!(plan(2, m, true).is_none(), "one row only");
        assert!(plan(1, m, false).is_none(), "tensor cores");
        let f32 = Nf4Meta::for_plan_test(2560, 1024, DType::F32);
        assert!(plan(1, f32, true).is_none());
        assert!(plan(1, meta(2560 + 64, 1024), true).is_none());
        assert!(plan(1, meta(2560, 1000), true).is_none());
        assert!(plan(1, meta(16384, 1024), true).is_none(), "x too big");
        let plain = Nf4Meta { nested: false, ..m };
        assert!(plan(1, plain, true).is_none());
        let b128 = Nf4Meta {
            blocksize: 128,
            ..m
        };
        assert!(plan(1, b128, true).is_none());
    }

    #[test]
    fn row_source_defines_the_configuration_before_the_kernel() {
        let m = meta(9728, 2560);
        let src = with_defines(&plan(1, m, true).unwrap().defines(m), SOURCE);
        for line in [
            "#define K 9728u",
            "#define N 2560u",
            "#define NW 13u",
            "#define BPW 12u",
            "#define DYN 91136u",
            "#define BF16 0u",
            "#define STAGES 1u",
        ] {
            assert!(src.contains(line), "{line}");
        }
        assert!(src.find("#define K ").unwrap() < src.find("nf4_gemv_row").unwrap());
    }
}
