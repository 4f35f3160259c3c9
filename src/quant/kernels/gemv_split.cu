// NF4 GEMV on tensor cores for one row of x, with the weight split evenly over every warp of
// the card: out[o] = sum_k x[k] * W[o, k]. Configured by the #defines `gemv_split.rs` puts in
// front of gemv_common.cuh, gemv_onerow.cuh and this file:
//   K, N        W's input and output widths (K a multiple of 256, N of 16)
//   NW          warps per cube; WARPS the warps of the whole grid (cubes * NW)
//   QPW         most quads a warp takes (ceil(QUADS / WARPS))
//   MINB        cubes per multiprocessor the registers are budgeted for
//   NBS         8-bit scale codes per nested f32 scale (a multiple of 4)
//   DYN         bytes of dynamic shared memory the cube is launched with
//   BF16        1 for bf16 values, 0 for f16
//   WIDE        0: the 32 KiB pair table (a table address costs a shift and an OR); 1: the
//               64 KiB one (one byte permutation, PRMT), see gemv_onerow.cuh
//
// Work: a quad is 4 absmax blocks (256 values) of a tile of 16 W rows: 2 KiB of packed weight
// and one word of 8-bit scale codes per row. The QUADS quads are numbered tile by tile and
// warp w of the grid takes quads QUADS * w / WARPS .. QUADS * (w + 1) / WARPS, so every
// multiprocessor gets the same bytes to within one quad per warp, whatever the shape (a tile
// per cube leaves cards idle or doubly loaded when the tiles do not divide evenly over them).
// A warp's run may cross from one tile into the next; each run within a tile is a part of
// that tile's sums.
//
// A warp loads its quads into registers (all of them, before the first product), then
// dequantizes through the pair table and multiplies on tensor cores with the fragment layout
// of `gemv_mma.cu` (lane (g, t) dequantizes bytes 8t..8t+7 of a block for W rows g and g + 8,
// x is B's column 0; only lanes t = 0 hold results).
//
// The sums: `work` holds, per tile, a count of the quads done and QB slots of 16 f32 partial
// sums (slot s for the run that starts at the tile's quad s). A warp writes its run's sums to
// its slot, then adds the run's quads to the count; the warp that brings it to QB adds the
// slots in order (so the result does not depend on which warp came last), writes the 16
// outputs and puts the slots and the count back to zero for the next call. `work` must be
// zero before the first call, and calls that share it must not overlap.
//
// Shared memory: x, the scale map and the code table, then the pair table (gemv_onerow.cuh).

#define QB (KB / 4u)
#define QUADS (N / 16u * QB)
#define LOW_BYTES (HCODE_AT + 64u)

// Global memory through L2 only (the partial sums other multiprocessors write and read).
__device__ __forceinline__ void store_l2(float* p, float v) {
    asm volatile("st.global.cg.f32 [%0], %1;" ::"l"(p), "f"(v) : "memory");
}

__device__ __forceinline__ float load_l2(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
    return v;
}

// Adds `n` to the count at `p` (in L2) and returns the count before.
__device__ __forceinline__ u32 count_add(u32* p, u32 n) {
    return atomicAdd(p, n);
}

// Puts the count at `p` back to zero.
__device__ __forceinline__ void count_reset(u32* p) {
    atomicExch(p, 0u);
}

// This thread's writes before it are seen by the whole card before its writes after it.
__device__ __forceinline__ void fence_card() {
    __threadfence();
}

// Lane 0's `v`, for every lane of the warp.
__device__ __forceinline__ u32 from_lane0(u32 v) {
    return __shfl_sync(0xFFFFFFFFu, v, 0);
}

// `v` plus lane (l ^ 16)'s `v`: the same bits in both lanes (a + b == b + a).
__device__ __forceinline__ float add_halves(float v) {
    return v + __shfl_xor_sync(0xFFFFFFFFu, v, 16);
}

// The first quad of warp `w`'s run (w = WARPS gives QUADS).
__device__ __forceinline__ u32 run_start(u32 w) {
    return (u32)((unsigned long long)QUADS * w / WARPS);
}

// Hands a warp's sums of rows g, g + 8 (lanes t = 0) of `tile` over `n` quads from quad
// `slot` on to `work`; the warp that completes the tile writes its 16 outputs.
__device__ __forceinline__ void finish_run(float* __restrict__ work, u16* __restrict__ out,
                                           u32 tile, u32 slot, u32 n, float acc0, float acc2,
                                           u32 lane) {
    u32* count = (u32*)work;
    float* sums = work + N / 16u + tile * (QB * 16u);
    if ((lane & 3u) == 0u) {
        store_l2(sums + slot * 16u + (lane >> 2), acc0);
        store_l2(sums + slot * 16u + (lane >> 2) + 8u, acc2);
    }
    // Each lane's sums reach L2 before lane 0 counts them (fence, meet, fence: the CUDA
    // samples' pattern for the last block of a reduction, by warp); the warp that completes
    // the count reads the other runs' sums only after it has seen the count.
    fence_card();
    sync_warp();
    u32 last = 0;
    if (lane == 0u) {
        fence_card();
        last = count_add(count + tile, n) + n == QB;
        fence_card();
    }
    sync_warp();
    if (from_lane0(last)) {
        // Lane l takes row l % 16 of the even slots (l < 16) or the odd ones, all its loads in
        // flight at once; unused slots hold zero. Each half adds its slots in order, then the
        // two halves are added: a fixed order whichever warp came last.
        const u32 row = lane & 15u, odd = lane >> 4;
        float v[(QB + 1u) / 2u];
#pragma unroll
        for (u32 i = 0; i < (QB + 1u) / 2u; ++i) {
            const u32 slot_i = 2u * i + odd;
            v[i] = slot_i < QB ? load_l2(sums + slot_i * 16u + row) : 0.f;
        }
        float sum = 0.f;
#pragma unroll
        for (u32 i = 0; i < (QB + 1u) / 2u; ++i) {
            const u32 slot_i = 2u * i + odd;
            if (slot_i < QB) {
                sum += v[i];
                store_l2(sums + slot_i * 16u + row, 0.f);
            }
        }
        sum = add_halves(sum);
        if (lane < 16u) out[tile * 16u + lane] = to_half(sum);
        if (lane == 0u) count_reset(count + tile);
    }
}

extern "C" __global__ void __launch_bounds__(NW * 32, MINB) nf4_gemv_split(
    const u16* __restrict__ x,            // [K]
    const U32x2* __restrict__ words,      // [N, K / 16] (8 bytes = 16 values each)
    const float* __restrict__ absmax,     // nested f32 scales
    const u32* __restrict__ scale_words,  // 8-bit scale codes, 4 per word
    const float* __restrict__ scale_map,  // [256]
    const float* __restrict__ code,       // [16]
    u16* __restrict__ out,                // [N]
    float* __restrict__ work,             // [N / 16] counts, then [N / 16][QB][16] sums
    const GemvScalars s)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const u32 sbase = window_address(smem);
    const u32 tbase = (sbase + LOW_BYTES + TABLE_BYTES - 1u) & ~(TABLE_BYTES - 1u);
    if (tbase + TABLE_BYTES > sbase + DYN) __trap();  // the region was not where it was planned

    const u32 tid = threadIdx.x;
    const u32 lane = tid & 31u;
    const u32 g = lane >> 2;
    const u32 t = lane & 3u;
    const u32 w = blockIdx.x * NW + (tid >> 5);
    const u32 q0 = run_start(w);
    const u32 nq = run_start(w + 1u) - q0;  // at most QPW

    // 0. The small inputs first (x, the scale map, the code table).
    const SmallInputs small = load_small_inputs(x, scale_map, code, tid);

    // 1. The warp's quads: for W rows g and g + 8 of quad i's tile, the lane's 8 bytes of
    // each of its 4 blocks, the word of their scale codes and their nested scale (a quad
    // never straddles a nested block: NBS and the quad's first block are multiples of 4).
    U32x2 wa[QPW][4], wb[QPW][4];
    u32 ca[QPW], cb[QPW];
    float na[QPW], nb[QPW];
#pragma unroll
    for (u32 i = 0; i < QPW; ++i) {
        if (i < nq) {
            const u32 q = q0 + i;
            const u32 r0 = q / QB * 16u + g;
            const u32 b0 = 4u * (q % QB);
#pragma unroll
            for (u32 j = 0; j < 4u; ++j) {
                wa[i][j] = words[r0 * (K / 16u) + 4u * (b0 + j) + t];
                wb[i][j] = words[(r0 + 8u) * (K / 16u) + 4u * (b0 + j) + t];
            }
            ca[i] = scale_words[(r0 * KB + b0) >> 2];
            cb[i] = scale_words[((r0 + 8u) * KB + b0) >> 2];
            na[i] = absmax[(r0 * KB + b0) / NBS];
            nb[i] = absmax[((r0 + 8u) * KB + b0) / NBS];
        }
    }

    // 2. Stage x, the scale map and the code table; then the pair table from the code table.
    stage_tables(small, smem, sbase, tbase, tid);

    // 3. The products; then each run's sums go to `work` (a warp's quads span at most RUNS
    // tiles). Lane (g, t) reads x[64 blk + 16t .. + 16] (B's column g is x for every g).
#define RUNS ((QPW + QB - 2u) / QB + 1u)
    const u32 lane_base = tbase | (lane << 2);
    const u32 smap = sbase + SMAP_AT;
    const u32 tile0 = q0 / QB;
    float acc0[RUNS], acc2[RUNS];
#pragma unroll
    for (u32 r = 0; r < RUNS; ++r) acc0[r] = acc2[r] = 0.f;
#pragma unroll
    for (u32 i = 0; i < QPW; ++i) {
        if (i < nq) {
            const u32 q = q0 + i;
            const u32 b0 = 4u * (q % QB);
            float sum0 = 0.f, sum2 = 0.f;
#pragma unroll
            for (u32 j = 0; j < 4u; ++j) {
                const u32 xat = sbase + 128u * (b0 + j) + 32u * t;
                const U32x4 xa = lds128(xat);
                const U32x4 xb = lds128(xat + 16u);
                const u32 c0 = ca[i] >> (8u * j), c1 = cb[i] >> (8u * j);
                const float s0 = __uint_as_float(lds32(smap + ((c0 & 255u) << 2))) * na[i] + s.offset;
                const float s1 = __uint_as_float(lds32(smap + ((c1 & 255u) << 2))) * nb[i] + s.offset;
                const u32 ax = wa[i][j].x, ay = wa[i][j].y, bx = wb[i][j].x, by = wb[i][j].y;
                float d[4] = {0.f, 0.f, 0.f, 0.f};
                block_products(d, ax, ay, bx, by, xa, xb, lane_base);
                sum0 += s0 * d[0];
                sum2 += s1 * d[2];
            }
#pragma unroll
            for (u32 r = 0; r < RUNS; ++r) {
                if (q / QB == tile0 + r) {
                    acc0[r] += sum0;
                    acc2[r] += sum2;
                }
            }
        }
    }
    // Run r covers the warp's quads in tile tile0 + r: from its slot to the tile's end or the
    // warp's last quad.
#pragma unroll
    for (u32 r = 0; r < RUNS; ++r) {
        const u32 from = r == 0u ? q0 : (tile0 + r) * QB;
        const u32 end = (tile0 + r + 1u) * QB;
        const u32 to = q0 + nq < end ? q0 + nq : end;
        if (from < to) finish_run(work, out, tile0 + r, from % QB, to - from, acc0[r], acc2[r], lane);
    }
}
