//! The NF4 GEMV for one row of x (decoding one sequence), written for memory bandwidth: a CUDA
//! C++ kernel (`gemv_row.cu`) on tensor cores, launched through CubeCL's runtime
//! ([`super::raw_cuda`]).
//!
//! At one row the GEMV reads each packed byte once and does little with it, so its time is how
//! long the reads take. A cube loads x and the small tables, starts the loads of W, then stages
//! x and the dequantization table while they are in flight. W either goes to registers, all of it
//! before the first product (ptxas then waits for the last load before any product), or
//! streams through a ring of `stages` slots per warp in shared memory (cp.async, one wait per
//! block), so the products of early blocks overlap the transfer of later ones. The pair table
//! sits at a boundary of dynamic shared memory aligned to its size, so a table address costs a
//! shift and one OR (32 KiB table) or one byte permutation (64 KiB, `wide`; see the `.cu`
//! file). Slots of whole 128-byte lines (`lines`) and x read by one lane group (`xzero`) are
//! further options. The default (`BY_DEFAULT`, since session 25): one tile of 16 rows per cube
//! (the card then spreads the cubes evenly over its multiprocessors), W in registers for runs
//! of up to 8 blocks a warp, one slot of whole lines for longer runs.

use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::ComputeClient;

use super::gemv_mma::{fits_mma_tiles, launch_gemv_source};
use super::overrides::{overrides, Overrides};
use super::raw_cuda::{configured_kernel, Defines};
use super::Nf4Meta;

/// The kernel's source after its configuration's `#define`s.
const SOURCE: &str = concat!(
    include_str!("gemv_common.cuh"),
    include_str!("gemv_onerow.cuh"),
    include_str!("gemv_row.cu")
);
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
/// Bytes of one ring slot of a warp: one block of 16 W rows (16 bytes a lane), or with
/// `lines` 4 blocks of them (a 128-byte line of each row).
fn slot_bytes(lines: bool) -> usize {
    if lines {
        2048
    } else {
        512
    }
}
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

/// Where the pair table starts and ends, in bytes from the start of the dynamic region: at the
/// first window offset aligned to its size, 32 KiB (0x8000) or 64 KiB when `wide` (0x10000).
/// Below it go x, the scale map, the code table, the partial sums (and the ring, if it fits).
fn table_span(wide: bool) -> (usize, usize) {
    let bytes = if wide { 0x10000 } else { 0x8000 };
    (bytes - SMEM_RESERVED, 2 * bytes - SMEM_RESERVED)
}

/// Where the ring of `stages` slots per warp starts (bytes from the start of the dynamic
/// region; the `.cu` file's `STAGE_AT`) and the dynamic shared memory the cube then needs: below
/// the pair table where the small inputs leave room, else above it.
fn ring_layout(
    d_in: usize,
    warps: usize,
    tiles: usize,
    stages: usize,
    (wide, lines): (bool, bool),
) -> (usize, usize) {
    let (table_at, table_end) = table_span(wide);
    let low = low_bytes(d_in, warps, tiles);
    let ring = stages * warps * slot_bytes(lines);
    if stages == 0 {
        (0, table_end)
    } else if low + ring <= table_at {
        (low, table_end)
    } else {
        (table_end, table_end + ring)
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
    /// Slots per warp of the ring W streams through (cp.async into shared memory, one wait
    /// per block); 0 loads W into registers, all of it before the first product.
    pub stages: usize,
    /// The 64 KiB pair table (one PRMT per table address) instead of the 32 KiB one (a shift
    /// and an OR); it leaves room for one cube per multiprocessor.
    pub wide: bool,
    /// Ring slots of 4 blocks, copied as whole 128-byte lines of the 16 rows and stored
    /// swizzled, instead of one block copied 8 + 8 bytes a lane (only with `stages`).
    pub lines: bool,
    /// Only the lanes that supply column 0 of the product's B operand read x (the others give
    /// zeros): 4 lanes read x instead of 32.
    pub xzero: bool,
}

impl RowPlan {
    /// The plan for `rows` rows of x against `meta`'s weight on a card of `sms` multiprocessors
    /// that has `mma` (the m16n8k16 tensor-core product of the compute dtype), or `None` when
    /// the kernel does not apply: one row, 16-bit compute, double-quantized blocks of 64,
    /// `d_in` a multiple of 256 (at most ~15,000), `d_out` of 16, and `QWEN3VL_GEMV=row` (or
    /// unset, once [`BY_DEFAULT`]). `QWEN3VL_GEMV_BPW`, `_TILES` and `_MINB` override the
    /// blocks per warp, the tiles per cube and the cubes per multiprocessor (for measurements).
    pub fn for_call(rows: usize, meta: Nf4Meta, mma: bool, sms: usize) -> Option<Self> {
        let o = overrides();
        if !(o.choice == "row" || (o.choice.is_empty() && BY_DEFAULT)) {
            return None;
        }
        Self::planned(rows, meta, mma, sms, o)
    }

    /// [`Self::for_call`]'s plan with the overrides `o`, whatever `QWEN3VL_GEMV` says.
    fn planned(rows: usize, meta: Nf4Meta, mma: bool, sms: usize, o: &Overrides) -> Option<Self> {
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
        let wide = o.wide.is_some_and(|w| w != 0);
        // Runs longer than REGISTER_RUN blocks stream W through one slot of whole lines.
        let streamed = bpw > REGISTER_RUN;
        let lines = match o.lines {
            Some(l) => l != 0 && o.stages.is_some_and(|s| s > 0),
            None => streamed && o.stages.is_none(),
        };
        let (table_at, table_end) = table_span(wide);
        let by_smem = |dynamic: usize| (SMEM_PER_SM / (dynamic + SMEM_RESERVED)).max(1);
        let cubes_per_sm = by_smem(table_end).min(2048 / (32 * warps)).max(1);
        let all_tiles = meta.d_out / 16;
        // One tile per cube: the card hands the next cube to whichever multiprocessor frees
        // a slot, so the work evens out over them. With the wide table (one cube per
        // multiprocessor), enough tiles per cube that the grid fits on the card at once.
        let spread = if wide {
            all_tiles.div_ceil(cubes_per_sm * sms.max(1))
        } else {
            1
        };
        let tiles = o.tiles.unwrap_or(spread).clamp(1, all_tiles.min(MAX_TILES));
        if low_bytes(meta.d_in, warps, tiles) > table_at {
            return None;
        }
        // No more slots than units a warp takes, nor than a cube's shared memory holds.
        let units = tiles * if lines { bpw / 4 } else { bpw };
        let mut stages = o.stages.unwrap_or(usize::from(lines)).min(units);
        let layout = |stages| ring_layout(meta.d_in, warps, tiles, stages, (wide, lines));
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
            wide,
            lines,
            xzero: o.xzero.is_some_and(|x| x != 0),
        })
    }

    /// Where the ring starts and the bytes of dynamic shared memory the cube is launched with.
    fn layout(&self, meta: Nf4Meta) -> (usize, usize) {
        let kind = (self.wide, self.lines);
        ring_layout(meta.d_in, self.warps, self.tiles, self.stages, kind)
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
            ("WIDE", usize::from(self.wide)),
            ("LINES", usize::from(self.lines)),
            ("XZERO", usize::from(self.xzero)),
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
        RowPlan::planned(rows, meta, mma, 132, &Overrides::default())
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
            assert_eq!(plan.lines, plan.stages > 0, "{d_in}->{d_out}: whole lines");
            assert!(plan.warps * plan.bpw >= d_in / 64);
            assert!((plan.warps - 1) * plan.bpw < d_in / 64, "no idle warp");
        }
        // 12-block runs stream through one slot of 13 warps x 2 KiB above the 32 KiB table.
        let m = meta(9728, 2560);
        let (at, dynamic) = plan(1, m, true).unwrap().layout(m);
        assert_eq!((at, dynamic), (0xFC00, 0xFC00 + 13 * 2048));
        // An explicit STAGES=0 keeps W in registers, whatever the run.
        let o = Overrides {
            stages: Some(0),
            ..Overrides::default()
        };
        let p = RowPlan::planned(1, m, true, 132, &o).unwrap();
        assert!(p.stages == 0 && !p.lines, "{p:?}");
    }

    #[test]
    fn ring_goes_below_the_table_where_it_fits_else_above_it() {
        let (_, narrow_end) = table_span(false);
        assert_eq!(
            narrow_end,
            0x10000 - 0x400,
            "the 32 KiB table ends at window 0x10000"
        );
        // 2560 inputs, 10 warps, 2 tiles: 7,488 bytes of small inputs + 4 x 10 x 512 of ring.
        assert_eq!(
            ring_layout(2560, 10, 2, 4, (false, false)),
            (7488, narrow_end)
        );
        // 9728 inputs leave no room below the table: the ring follows it.
        let (at, dynamic) = ring_layout(9728, 13, 1, 2, (false, false));
        assert_eq!((at, dynamic), (narrow_end, narrow_end + 2 * 13 * 512));
        assert_eq!(ring_layout(2560, 10, 2, 0, (false, false)), (0, narrow_end));
        // The 64 KiB table leaves 63 KiB below it.
        let (wide_at, wide_end) = table_span(true);
        assert_eq!((wide_at, wide_end), (0xFC00, 0x1FC00));
        assert_eq!(
            ring_layout(9728, 13, 2, 4, (true, false)),
            (low_bytes(9728, 13, 2), wide_end)
        );
        // With the ring, shared memory sets the cubes per multiprocessor.
        let o = Overrides {
            stages: Some(4),
            ..Overrides::default()
        };
        let p = RowPlan::planned(1, meta(9728, 2560), true, 132, &o).unwrap();
        assert_eq!(p.stages, 4);
        let (_, dynamic) = p.layout(meta(9728, 2560));
        assert_eq!(dynamic, narrow_end + 4 * 13 * 512);
        assert_eq!(p.min_cubes, SMEM_PER_SM / (dynamic + SMEM_RESERVED));
        // No more slots than blocks a warp takes.
        let o = Overrides {
            stages: Some(64),
            ..Overrides::default()
        };
        let p = RowPlan::planned(1, meta(2560, 4096), true, 132, &o).unwrap();
        assert_eq!(p.stages, p.tiles * p.bpw);
        // Nor more than a cube's shared memory holds (a ring above the wide table).
        let o = Overrides {
            stages: Some(64),
            wide: Some(1),
            tiles: Some(8),
            ..Overrides::default()
        };
        let p = RowPlan::planned(1, meta(9728, 2560), true, 132, &o).unwrap();
        let (_, dynamic) = p.layout(meta(9728, 2560));
        assert!(p.stages > 0 && dynamic <= MAX_DYNAMIC, "{p:?}: {dynamic}");
        assert!(ring_layout(9728, p.warps, p.tiles, p.stages + 1, (true, false)).1 > MAX_DYNAMIC);
    }

    #[test]
    fn line_slots_hold_four_blocks_of_sixteen_rows() {
        let o = Overrides {
            stages: Some(8),
            lines: Some(1),
            tiles: Some(2),
            ..Overrides::default()
        };
        // 2560->9728: 2 tiles of 4-block runs are 2 units a warp, so 2 slots of 2 KiB.
        let m = meta(2560, 9728);
        let p = RowPlan::planned(1, m, true, 132, &o).unwrap();
        assert!(p.lines && (p.tiles, p.bpw, p.stages) == (2, 4, 2), "{p:?}");
        let (at, dynamic) = p.layout(m);
        assert_eq!(dynamic - at, 2 * 10 * 2048, "a ring above the table");
        // Lines only stream through a ring.
        let o = Overrides {
            lines: Some(1),
            ..Overrides::default()
        };
        assert!(!RowPlan::planned(1, m, true, 132, &o).unwrap().lines);
    }

    #[test]
    fn wide_table_plans_one_cube_per_multiprocessor() {
        let o = Overrides {
            stages: Some(8),
            wide: Some(1),
            ..Overrides::default()
        };
        for (d_in, d_out) in [(2560, 4096), (4096, 2560), (2560, 9728), (9728, 2560)] {
            let p = RowPlan::planned(1, meta(d_in, d_out), true, 132, &o).unwrap();
            assert!(p.wide && p.min_cubes == 1, "{d_in}->{d_out}: {p:?}");
            assert!(
                (d_out / 16).div_ceil(p.tiles) <= 132,
                "{d_in}->{d_out}: one wave"
            );
            let (_, dynamic) = p.layout(meta(d_in, d_out));
            assert!(dynamic + SMEM_RESERVED <= SMEM_PER_SM, "{d_in}->{d_out}");
        }
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
            "#define WIDE 0u",
            "#define LINES 1u",
            "#define XZERO 0u",
        ] {
            assert!(src.contains(line), "{line}");
        }
        assert!(src.find("#define K ").unwrap() < src.find("nf4_gemv_row").unwrap());
    }
}
