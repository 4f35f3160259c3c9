//! The environment variables that force a kernel or override a plan's layout, for
//! measurements (`QWEN3VL_GEMV*`, `QWEN3VL_GEMM*`): read once, in one place.

/// The measurement overrides (`QWEN3VL_GEMV`, `QWEN3VL_GEMV_WROWS`, `_UNROLL`, `_CUBE_WARPS`,
/// `_CUBES`, `_NW`, `_BPW`, `_CHUNK`, `_TILES`, `_MINB`, `_STAGES`; the tiled GEMM's
/// `QWEN3VL_GEMM`, `_TILE`, `_SPLITS`), read once: the plans are made on every call.
#[derive(Default)]
pub struct Overrides {
    pub choice: String,
    pub wrows: Option<usize>,
    pub unroll: Option<usize>,
    pub cube_warps: Option<usize>,
    pub cubes: Option<usize>,
    pub nw: Option<usize>,
    /// `QWEN3VL_GEMV_BPW`: absmax blocks per warp of the tensor-core GEMV.
    pub bpw: Option<usize>,
    /// `QWEN3VL_GEMV_CHUNK`: blocks the tensor-core GEMV loads before using any.
    pub chunk: Option<usize>,
    /// `QWEN3VL_GEMV_TILES`: tiles of 16 W rows per cube of the tensor-core GEMVs.
    pub tiles: Option<usize>,
    /// `QWEN3VL_GEMV_MINB`: cubes per multiprocessor the one-row GEMV budgets registers for.
    pub min_cubes: Option<usize>,
    /// `QWEN3VL_GEMV_STAGES`: slots per warp of the one-row GEMV's cp.async ring of whole lines
    /// (0: W in registers).
    pub stages: Option<usize>,
    /// `QWEN3VL_GEMM`: `dequant`, `tiled` or empty.
    pub gemm: String,
    /// `QWEN3VL_GEMM_TILE`, e.g. `2x1`.
    pub gemm_tile: String,
    /// `QWEN3VL_GEMM_SPLITS`.
    pub gemm_splits: Option<usize>,
}

/// The overrides, read on the first call.
pub fn overrides() -> &'static Overrides {
    static O: std::sync::OnceLock<Overrides> = std::sync::OnceLock::new();
    O.get_or_init(|| {
        let num = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
        Overrides {
            choice: std::env::var("QWEN3VL_GEMV").unwrap_or_default(),
            wrows: num("QWEN3VL_GEMV_WROWS"),
            unroll: num("QWEN3VL_GEMV_UNROLL"),
            cube_warps: num("QWEN3VL_GEMV_CUBE_WARPS"),
            cubes: num("QWEN3VL_GEMV_CUBES"),
            nw: num("QWEN3VL_GEMV_NW"),
            bpw: num("QWEN3VL_GEMV_BPW"),
            chunk: num("QWEN3VL_GEMV_CHUNK"),
            tiles: num("QWEN3VL_GEMV_TILES"),
            min_cubes: num("QWEN3VL_GEMV_MINB"),
            stages: num("QWEN3VL_GEMV_STAGES"),
            gemm: std::env::var("QWEN3VL_GEMM").unwrap_or_default(),
            gemm_tile: std::env::var("QWEN3VL_GEMM_TILE").unwrap_or_default(),
            gemm_splits: num("QWEN3VL_GEMM_SPLITS"),
        }
    })
}
