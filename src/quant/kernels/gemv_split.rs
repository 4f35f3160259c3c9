//! The NF4 GEMV for one row of x (decoding one sequence) with the weight split evenly over
//! every warp of the card: a CUDA C++ kernel (`gemv_split.cu`) on tensor cores, launched
//! through CubeCL's runtime ([`super::raw_cuda`]).
//!
//! At one row the GEMV reads each packed byte once, so its time is how long the slowest
//! multiprocessor takes over its share. Kernels that give each cube whole tiles of 16 W rows
//! load some multiprocessors with twice the tiles of others whenever the tiles do not divide
//! evenly over the card (160 tiles on 132 multiprocessors, say). Here the weight is cut into
//! quads (4 absmax blocks of a tile, 2 KiB) and each warp of the grid takes an equal run of
//! them, crossing tile boundaries where it falls; runs hand their partial sums to a small
//! zeroed work buffer, and the last run of each tile (by an atomic count) adds the parts in a
//! fixed order and writes the tile's outputs, so results are the same bits on every call.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::thread::ThreadId;

use burn::prelude::Shape;
use burn::tensor::backend::{DeviceId, DeviceOps};
use burn::tensor::DType;
use burn_cubecl::ops::numeric::zeros_client;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::ComputeClient;
use cubecl::CubeCount;

use super::gemv_mma::fits_mma_tiles;
use super::overrides::{overrides, Overrides};
use super::raw_cuda::{configured_kernel, launch_raw, Defines};
use super::Nf4Meta;

/// The kernel's source after its configuration's `#define`s.
const SOURCE: &str = concat!(
    include_str!("gemv_common.cuh"),
    include_str!("gemv_onerow.cuh"),
    include_str!("gemv_split.cu")
);
/// Dynamic shared memory of a cube (the region starts at window offset 0x400): x, the scale
/// map and the code table below the pair table, which starts at the window offset aligned to
/// its size: 32 KiB at 0x8000, or 64 KiB at 0x10000 when `wide` (one cube per multiprocessor).
fn dynamic(wide: bool) -> usize {
    if wide {
        0x20000 - 0x400
    } else {
        0x10000 - 0x400
    }
}
/// Bytes the small inputs may take below the 32 KiB pair table: x (2 bytes a value), the
/// scale map (1 KiB) and the code table (64 bytes).
const LOW_LIMIT: usize = 0x8000 - 0x400;
/// Most quads a warp holds in registers (16 registers each); larger weights take more cubes.
const MAX_QUADS_PER_WARP: usize = 4;
/// Most warps per cube (fewer where the quads would not reach every multiprocessor) and cubes
/// per multiprocessor, without overrides.
const WARPS: usize = 10;
const CUBES_PER_SM: usize = 3;
/// Whether one row takes this kernel without `QWEN3VL_GEMV=split`. Not yet: unmeasured.
const BY_DEFAULT: bool = false;

/// How the split one-row GEMV is laid out for one call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SplitPlan {
    /// Warps per cube.
    pub warps: usize,
    /// Cubes per multiprocessor the registers are budgeted for (`__launch_bounds__`).
    pub min_cubes: usize,
    /// Cubes of the grid.
    pub cubes: usize,
    /// The 64 KiB pair table (one PRMT per table address) instead of the 32 KiB one (a shift
    /// and an OR); it leaves room for one cube per multiprocessor.
    pub wide: bool,
}

/// Quads (4 absmax blocks of a tile of 16 W rows) of `meta`'s weight.
fn quads(meta: Nf4Meta) -> usize {
    meta.d_out / 16 * (meta.d_in / 256)
}

/// f32 words of the work buffer for `meta`'s weight: a count per tile, then 16 partial sums
/// per tile and quad of its row.
pub fn work_words(meta: Nf4Meta) -> usize {
    meta.d_out / 16 * (1 + meta.d_in / 256 * 16)
}

impl SplitPlan {
    /// The plan for `rows` rows of x against `meta`'s weight on a card of `sms` multiprocessors
    /// that has `mma` (the m16n8k16 tensor-core product of the compute dtype), or `None` when
    /// the kernel does not apply: one row, 16-bit compute, double-quantized blocks of 64
    /// (nested blocks a multiple of 4), `d_in` a multiple of 256 (at most ~15,000), `d_out` of
    /// 16, and `QWEN3VL_GEMV=split` (or unset, once [`BY_DEFAULT`]). `QWEN3VL_GEMV_CUBE_WARPS`,
    /// `_MINB` and `_CUBES` override the warps per cube, the cubes per multiprocessor and the
    /// grid, `_WIDE=1` takes the 64 KiB table (for measurements).
    pub fn for_call(rows: usize, meta: Nf4Meta, mma: bool, sms: usize) -> Option<Self> {
        let o = overrides();
        if !(o.choice == "split" || (o.choice.is_empty() && BY_DEFAULT)) {
            return None;
        }
        Self::planned(rows, meta, mma, sms, o)
    }

    /// [`Self::for_call`]'s plan with the overrides `o`, whatever `QWEN3VL_GEMV` says.
    fn planned(rows: usize, meta: Nf4Meta, mma: bool, sms: usize, o: &Overrides) -> Option<Self> {
        let fits = fits_mma_tiles(meta, mma, 256)
            && meta.nested_blocksize.is_multiple_of(4)
            && 2 * meta.d_in + 1024 + 64 <= LOW_LIMIT;
        if rows != 1 || !fits {
            return None;
        }
        let wide = o.wide.is_some_and(|w| w != 0);
        let quads = quads(meta);
        // Fewer warps a cube where the quads would not reach every multiprocessor otherwise
        // (2560->1024: 640 quads, 5 warps a cube on 128 multiprocessors, not 10 on 64).
        let spread = quads.div_ceil(sms.max(1)).clamp(1, WARPS);
        let warps = o.cube_warps.unwrap_or(spread).clamp(1, 32);
        let most = if wide { 1 } else { 3 };
        let min_cubes = o.min_cubes.unwrap_or(CUBES_PER_SM).clamp(1, most);
        // As many cubes as the card holds at once, more where a warp would hold too many
        // quads, fewer where a warp would get none.
        let resident = (sms.max(1) * min_cubes).max(quads.div_ceil(warps * MAX_QUADS_PER_WARP));
        let cubes = o
            .cubes
            .unwrap_or(resident.min(quads.div_ceil(warps)))
            .max(1);
        Some(Self {
            warps,
            min_cubes,
            cubes,
            wide,
        })
    }

    /// Most quads one warp takes.
    fn quads_per_warp(&self, meta: Nf4Meta) -> usize {
        quads(meta).div_ceil(self.cubes * self.warps)
    }

    /// The `#define`s that configure the kernel for `meta`'s weight.
    fn defines(&self, meta: Nf4Meta) -> Defines {
        vec![
            ("K", meta.d_in),
            ("N", meta.d_out),
            ("NW", self.warps),
            ("WARPS", self.cubes * self.warps),
            ("QPW", self.quads_per_warp(meta)),
            ("MINB", self.min_cubes),
            ("NBS", meta.nested_blocksize),
            ("DYN", dynamic(self.wide)),
            ("BF16", usize::from(meta.compute == DType::BF16)),
            ("WIDE", usize::from(self.wide)),
        ]
    }
}

/// The work buffer (zeros, at least `words` f32) of this thread on `client`'s device: the
/// kernel leaves it zero after each call, and one thread's calls do not overlap (they share
/// its stream). A larger one replaces a smaller one.
fn work_buffer<R: CubeRuntime>(
    client: &ComputeClient<R>,
    device: &R::Device,
    words: usize,
) -> CubeTensor<R> {
    type Key = (TypeId, DeviceId, ThreadId);
    static BUFFERS: OnceLock<Mutex<HashMap<Key, Box<dyn Any + Send>>>> = OnceLock::new();
    let key = (TypeId::of::<R>(), device.id(), std::thread::current().id());
    let mut buffers = BUFFERS.get_or_init(Default::default).lock().unwrap();
    if let Some(b) = buffers
        .get(&key)
        .and_then(|b| b.downcast_ref::<CubeTensor<R>>())
    {
        if b.meta.shape()[0] >= words {
            return b.clone();
        }
    }
    let fresh = zeros_client(
        client.clone(),
        device.clone(),
        Shape::new([words]),
        DType::F32,
    );
    buffers.insert(key, Box::new(fresh.clone()));
    fresh
}

/// Launches the kernel writing `out` [1, out] from x [1, in] (in the compute dtype, 16-byte
/// aligned) and the weight's tensors: words, nested absmax, scale words, scale map, code.
pub(super) fn launch_split<R: CubeRuntime>(
    client: &ComputeClient<R>,
    x: &CubeTensor<R>,
    [words, absmax, scale_words, scale_map, code]: [&CubeTensor<R>; 5],
    out: &CubeTensor<R>,
    meta: Nf4Meta,
    plan: SplitPlan,
) {
    assert_eq!(x.meta.shape()[0], 1, "the split GEMV takes one row of x");
    let work = work_buffer(client, &x.device, work_words(meta));
    let kernel = configured_kernel(
        SOURCE,
        "nf4_gemv_split",
        plan.defines(meta),
        32 * plan.warps as u32,
        dynamic(plan.wide),
    );
    // SAFETY: warp w reads the quads QUADS * w / WARPS .. of W (inside the weight) with their
    // scales and x's d_in values, writes its partial sums to its tiles' slots in `work` (sized
    // by `work_words`) and, for the tiles it completes, out[16 rows]; its shared memory stays
    // inside the dynamic shared memory it is launched with (it traps otherwise).
    unsafe {
        launch_raw(
            client,
            kernel,
            CubeCount::Static(plan.cubes as u32, 1, 1),
            &[x, words, absmax, scale_words, scale_map, code, out, &work],
            vec![u64::from(meta.offset.to_bits())],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::raw_cuda::with_defines;
    use super::*;

    fn meta(d_in: usize, d_out: usize) -> Nf4Meta {
        Nf4Meta::for_plan_test(d_in, d_out, DType::F16)
    }

    fn plan(rows: usize, meta: Nf4Meta, mma: bool) -> Option<SplitPlan> {
        SplitPlan::planned(rows, meta, mma, 132, &Overrides::default())
    }

    #[test]
    fn split_plan_gives_every_warp_an_equal_run() {
        for (d_in, d_out) in [
            (2560, 4096),
            (2560, 1024),
            (4096, 2560),
            (2560, 9728),
            (9728, 2560),
        ] {
            let m = meta(d_in, d_out);
            let p = plan(1, m, true).unwrap();
            let warps = p.cubes * p.warps;
            // At most one cube per multiprocessor slot, every warp at most one quad from the
            // mean, and the work buffer one count and QB slots of 16 per tile.
            assert!(p.cubes <= 132 * p.min_cubes, "{d_in}->{d_out}: one wave");
            let q = quads(m);
            assert!(p.quads_per_warp(m) <= q / warps + 1, "{d_in}->{d_out}");
            assert!(p.quads_per_warp(m) <= MAX_QUADS_PER_WARP);
            assert_eq!(work_words(m), d_out / 16 + d_out * (d_in / 256));
        }
        // 2560->1024 has 640 quads: 128 cubes of 5 warps, one quad each (10 warps a cube
        // would leave half the multiprocessors idle).
        let p = plan(1, meta(2560, 1024), true).unwrap();
        let one_quad = p.quads_per_warp(meta(2560, 1024));
        assert_eq!((p.cubes, p.warps, one_quad), (128, 5, 1));
        // 2560->9728: 6,080 quads over 396 cubes of 10 warps.
        let p = plan(1, meta(2560, 9728), true).unwrap();
        assert_eq!((p.cubes, p.quads_per_warp(meta(2560, 9728))), (396, 2));
        // A card of 4 multiprocessors takes more cubes than it holds rather than 40 quads a warp.
        let p = SplitPlan::planned(1, meta(2560, 9728), true, 4, &Overrides::default()).unwrap();
        assert_eq!(p.quads_per_warp(meta(2560, 9728)), MAX_QUADS_PER_WARP);
        // The wide table: one cube of 32 warps per multiprocessor, 127 KiB of shared memory.
        let o = Overrides {
            wide: Some(1),
            cube_warps: Some(32),
            min_cubes: Some(3),
            ..Overrides::default()
        };
        let p = SplitPlan::planned(1, meta(2560, 9728), true, 132, &o).unwrap();
        assert_eq!((p.wide, p.min_cubes, p.cubes, p.warps), (true, 1, 132, 32));
        assert_eq!(dynamic(true) + 0x400, 0x20000);
    }

    #[test]
    fn split_plan_applies_only_where_the_kernel_does() {
        let m = meta(2560, 1024);
        assert!(plan(1, m, true).is_some());
        assert!(plan(2, m, true).is_none(), "one row only");
        assert!(plan(1, m, false).is_none(), "tensor cores");
        assert!(plan(1, Nf4Meta::for_plan_test(2560, 1024, DType::F32), true).is_none());
        assert!(plan(1, meta(2560 + 64, 1024), true).is_none());
        assert!(plan(1, meta(2560, 1000), true).is_none());
        assert!(plan(1, meta(15360, 1024), true).is_none(), "x too big");
        assert!(plan(1, meta(15104, 1024), true).is_some());
        assert!(plan(1, Nf4Meta { nested: false, ..m }, true).is_none());
        let odd_nested = Nf4Meta {
            nested_blocksize: 254,
            ..m
        };
        assert!(plan(1, odd_nested, true).is_none());
    }

    #[test]
    fn split_source_defines_the_configuration_before_the_kernel() {
        let m = meta(9728, 2560);
        let src = with_defines(&plan(1, m, true).unwrap().defines(m), SOURCE);
        for line in [
            "#define K 9728u",
            "#define N 2560u",
            "#define NW 10u",
            "#define WARPS 3960u",
            "#define QPW 2u",
            "#define MINB 3u",
            "#define DYN 64512u",
            "#define WIDE 0u",
        ] {
            assert!(src.contains(line), "{line}");
        }
        assert!(src.find("#define K ").unwrap() < src.find("nf4_gemv_split").unwrap());
    }
}
