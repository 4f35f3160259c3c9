// NF4 GEMV on tensor cores for one row of x: out[o] = sum_k x[k] * W[o, k], written for memory
// bandwidth. Configured by the #defines `gemv_row.rs` puts in front of gemv_common.cuh and this
// file:
//   K, N        W's input and output widths (K a multiple of 256, N of 16)
//   NW          warps per cube; BPW absmax blocks per warp (a multiple of 4)
//   TPC         tiles of 16 W rows per cube
//   MINB        cubes per multiprocessor the registers are budgeted for
//   NBS         8-bit scale codes per nested f32 scale (double quantization)
//   DYN         bytes of dynamic shared memory the cube is launched with
//   BF16        1 for bf16 values, 0 for f16
//   STAGES      0: W is loaded into registers, all at once; S > 0: W streams through a ring of
//               S slots per warp in shared memory (cp.async). A slot holds 4 blocks of a tile
//               (128 bytes, one cache line, of each of its 16 rows), copied 16 bytes a lane, 4
//               whole lines per copy instruction, and stored swizzled so that the products
//               read it without bank conflicts
//   STAGE_AT    where the ring starts, in bytes from the start of the dynamic region
//
// A cube loads x and the small tables first, then starts the loads of W (all of them into
// registers, or the ring's first STAGES units per warp), then stages x and the dequantization
// table while they are in flight. With W in registers ptxas waits for a warp's last load
// before its first product; the ring waits for one unit at a time and refills its slot after
// the unit's products. The fragment layout is the one of `gemv_mma.cu` (lane (g, t)
// dequantizes bytes 8t..8t+7 of a block for W rows g and g + 8), with x as B's column 0: only
// lanes t = 0 hold results (D[g][0] and D[g + 8][0]); B's other columns are copies of x and
// never read.
//
// Shared memory (dynamic; the region starts at window offset 0x400, after the 1 KiB the
// hardware reserves): x (2 bytes a value), the scale map (256 f32), the code table (16 values
// of 16 bits, 64 bytes kept) and the partial sums (and the ring where it fits), then the 32 KiB
// pair table (entry stride 128 bytes) at the next 32 KiB boundary (window 0x8000 at the
// earliest; the ring after it otherwise). A table address is then one OR of the byte's offset
// (bits 7..14) and the lane's copy (bits 2..6) into the aligned base.

#define SMAP_AT (K * 2u)
#define HCODE_AT (SMAP_AT + 1024u)
#define TABLE_BYTES 0x8000u

// Shared-memory loads and stores by window address.
__device__ __forceinline__ u32 lds32(u32 addr) {
    u32 v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}

__device__ __forceinline__ U32x4 lds128(u32 addr) {
    U32x4 v;
    asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr));
    return v;
}

__device__ __forceinline__ void sts128(u32 addr, U32x4 v) {
    asm volatile("st.shared.v4.b32 [%0], {%1,%2,%3,%4};"
                 :: "r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}

// The shared-window address of `p` (a pointer into shared memory).
__device__ __forceinline__ u32 window_address(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// The warp's lanes meet; their shared-memory accesses before it are seen by all after it.
__device__ __forceinline__ void sync_warp() {
    __syncwarp();
}

// The pair of a packed byte: `lane_base` (the table's aligned base | lane * 4) OR the byte's
// offset (byte * 128), the byte taken from `w` by the shift that puts it in bits 7..14.
#define PAIR0(w) lds32((((w) << 7) & 0x7F80u) | lane_base)
#define PAIR1(w) lds32((((w) >> 1) & 0x7F80u) | lane_base)
#define PAIR2(w) lds32((((w) >> 9) & 0x7F80u) | lane_base)
#define PAIR3(w) lds32((((w) >> 17) & 0x7F80u) | lane_base)

// Threads of a cube, and the vectors of x (8 values) and scale-map entries each one stages.
#define NT (NW * 32u)
#define XV ((K / 8u + NT - 1u) / NT)
#define SV ((256u + NT - 1u) / NT)

// A thread's share of the small inputs (x, the scale map, the code table), in registers
// between their loads and their stores to shared memory.
struct SmallInputs {
    U32x4 xv[XV];
    float sv[SV];
    float cv;
};

// Loads thread `tid`'s share of the small inputs. A cube loads them before W: the pair table
// and every product wait on them, and loads issued after the weight's would queue behind it.
__device__ __forceinline__ SmallInputs load_small_inputs(const u16* __restrict__ x,
                                                         const float* __restrict__ scale_map,
                                                         const float* __restrict__ code,
                                                         u32 tid) {
    SmallInputs in;
#pragma unroll
    for (u32 i = 0; i < XV; ++i) {
        if (tid + i * NT < K / 8u) in.xv[i] = ((const U32x4*)x)[tid + i * NT];
    }
#pragma unroll
    for (u32 i = 0; i < SV; ++i) {
        if (tid + i * NT < 256u) in.sv[i] = scale_map[tid + i * NT];
    }
    in.cv = code[tid & 15u];
    return in;
}

// Stages x, the scale map and the code table (as 16-bit values) at `smem` (window address
// `sbase`), then builds the pair table at `tbase` from the code table; the cube meets after
// each step. 2048 vectors of 4 words: vector q holds copies 4(q % 8) .. +3 of entry q / 8. The
// pair of byte b is (value of its high nibble, value of its low nibble), low half first.
__device__ __forceinline__ void stage_tables(const SmallInputs& in, unsigned char* smem,
                                             u32 sbase, u32 tbase, u32 tid) {
#pragma unroll
    for (u32 i = 0; i < XV; ++i) {
        if (tid + i * NT < K / 8u) sts128(sbase + 16u * (tid + i * NT), in.xv[i]);
    }
#pragma unroll
    for (u32 i = 0; i < SV; ++i) {
        if (tid + i * NT < 256u) ((float*)(smem + SMAP_AT))[tid + i * NT] = in.sv[i];
    }
    if (tid < 16u) ((u16*)(smem + HCODE_AT))[tid] = to_half(in.cv);
    __syncthreads();
    const u16* hcode = (const u16*)(smem + HCODE_AT);
    for (u32 q = tid; q < 2048u; q += NT) {
        const u32 b = q >> 3;
        const u32 p = (u32)hcode[b >> 4] | ((u32)hcode[b & 15u] << 16);
        sts128(tbase + 16u * q, U32x4{p, p, p, p});
    }
    __syncthreads();
}

// d += one block of W rows g and g + 8 (the lane's 8 packed bytes of each: ax, ay and bx, by)
// times x (the lane's 16 values: xa, xb), on tensor cores.
__device__ __forceinline__ void block_products(float* d, u32 ax, u32 ay, u32 bx, u32 by,
                                               U32x4 xa, U32x4 xb, u32 lane_base) {
    mma(d, PAIR0(ax), PAIR0(bx), PAIR1(ax), PAIR1(bx), xa.x, xa.y);
    mma(d, PAIR2(ax), PAIR2(bx), PAIR3(ax), PAIR3(bx), xa.z, xa.w);
    mma(d, PAIR0(ay), PAIR0(by), PAIR1(ay), PAIR1(by), xb.x, xb.y);
    mma(d, PAIR2(ay), PAIR2(by), PAIR3(ay), PAIR3(by), xb.z, xb.w);
}

// Bytes below the pair table: x, the scale map, the code table, the partial sums (the plan
// checks the same sum, `low_bytes` in gemv_row.rs).
#define RED_AT (HCODE_AT + 64)
#define LOW_BYTES (RED_AT + TPC * NW * 16 * 4)
// Where the pair table starts, from the start of the dynamic region, when the small inputs
// (and a ring below it) leave room (window 0x8000).
#define TABLE_AT (TABLE_BYTES - 0x400u)
// The ring of staged W units (STAGES > 0), below or above the pair table.
#define SLOT_BYTES 2048u
#define RING_BYTES (STAGES * NW * SLOT_BYTES)
#if STAGES && STAGE_AT < TABLE_AT
#define TABLE_FLOOR (STAGE_AT + RING_BYTES)
#else
#define TABLE_FLOOR LOW_BYTES
#endif

// 16 bytes from global to shared memory without registers (cp.async, bypassing L1); the end
// of a group of them; a wait until at most PENDING groups of this thread are in flight.
__device__ __forceinline__ void cp_async16(u32 addr, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(addr), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

template <u32 PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}

__device__ __forceinline__ U32x2 lds64(u32 addr) {
    U32x2 v;
    asm volatile("ld.shared.v2.b32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
    return v;
}

// A tile's loads for one warp: for W rows g and g + 8 (`a`, `b`), the lane's 8 packed bytes of
// each of the run's blocks, the words of the run's 8-bit scale codes (4 per word) and the
// nested scales of the run's first and last block.
struct TileLoads {
#if STAGES == 0
    U32x2 wa[BPW], wb[BPW];
#endif
    u32 ca[BPW / 4], cb[BPW / 4];
    float na_lo, na_hi, nb_lo, nb_hi;
};

#if STAGES
// Units of 4 blocks: unit u of a warp is blocks first + 4 (u % (BPW / 4)) .. + 3 of its cube's
// tile u / (BPW / 4): 16 rows of 128 bytes. Lane l copies the 16-byte pieces l, l + 32, l + 64,
// l + 96 (piece c: row c / 8, part c % 8), part p of row r to position p ^ (r % 8) of the row's
// 128 bytes in the slot, then commits the unit's group (also when there is no unit u).
#define UPT (BPW / 4u)
__device__ __forceinline__ void stage_unit(u32 ring, const unsigned char* __restrict__ bytes,
                                           u32 tile0, u32 first, u32 lane, u32 u) {
    if (u < TPC * UPT) {
        const u32 i = u / UPT, q = u % UPT;
        const u32 tile = tile0 + i < N / 16u ? tile0 + i : N / 16u - 1u;
        // A short last run copies the row's last line again (its blocks are never used).
        const u32 blk = first + 4u * q + 4u <= KB ? first + 4u * q : KB - 4u;
        const u32 slot = ring + (u % STAGES) * SLOT_BYTES;
#pragma unroll
        for (u32 c = lane; c < 128u; c += 32u) {
            const u32 r = c >> 3, p = c & 7u;
            cp_async16(slot + 128u * r + 16u * (p ^ (r & 7u)),
                       bytes + (tile * 16u + r) * (K / 2) + 32u * blk + 16u * p);
        }
    }
    cp_async_commit();
}
#endif

extern "C" __global__ void __launch_bounds__(NW * 32, MINB) nf4_gemv_row(
    const u16* __restrict__ x,            // [K]
    const U32x2* __restrict__ words,      // [N, K / 16] (8 bytes = 16 values each)
    const float* __restrict__ absmax,     // nested f32 scales
    const u32* __restrict__ scale_words,  // 8-bit scale codes, 4 per word
    const float* __restrict__ scale_map,  // [256]
    const float* __restrict__ code,       // [16]
    u16* __restrict__ out,                // [N]
    const GemvScalars s)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const u32 sbase = window_address(smem);
    const u32 tbase = (sbase + TABLE_FLOOR + TABLE_BYTES - 1u) & ~(TABLE_BYTES - 1u);
    if (tbase + TABLE_BYTES > sbase + DYN) __trap();  // the region was not where it was planned
#if STAGES
    // The ring lies above the small inputs, and below the table or above it, within DYN.
    if (STAGE_AT < LOW_BYTES ||
        sbase + STAGE_AT + RING_BYTES > (STAGE_AT < TABLE_AT ? tbase : sbase + DYN) ||
        (STAGE_AT >= TABLE_AT && sbase + STAGE_AT < tbase + TABLE_BYTES))
        __trap();
#endif

    const u32 tid = threadIdx.x;
    const u32 lane = tid & 31u;
    const u32 warp = tid >> 5;
    const u32 g = lane >> 2;
    const u32 t = lane & 3u;
    const u32 first = warp * BPW;  // the warp's run of blocks: first .. first + BPW (below KB)
    const u32 tile0 = blockIdx.x * TPC;

    // 0. The small inputs first (x, the scale map, the code table).
    const SmallInputs small = load_small_inputs(x, scale_map, code, tid);

    // 1. Every W load of the cube.
    TileLoads ld[TPC];
#pragma unroll
    for (u32 i = 0; i < TPC; ++i) {
        const u32 tile = tile0 + i < N / 16u ? tile0 + i : N / 16u - 1u;
        const u32 r0 = tile * 16u + g;
        const u32 r1 = r0 + 8u;
#if STAGES == 0
#pragma unroll
        for (u32 j = 0; j < BPW; ++j) {
            const u32 blk = first + j < KB ? first + j : KB - 1u;
            ld[i].wa[j] = words[r0 * (K / 16) + 4u * blk + t];
            ld[i].wb[j] = words[r1 * (K / 16) + 4u * blk + t];
        }
#endif
#pragma unroll
        for (u32 j = 0; j < BPW / 4; ++j) {
            const u32 blk = first + 4u * j < KB ? first + 4u * j : KB - 4u;
            ld[i].ca[j] = scale_words[(r0 * KB + blk) >> 2];
            ld[i].cb[j] = scale_words[(r1 * KB + blk) >> 2];
        }
        const u32 lastb = first + BPW - 1u < KB ? first + BPW - 1u : KB - 1u;
        ld[i].na_lo = absmax[(r0 * KB + first) / NBS];
        ld[i].na_hi = absmax[(r0 * KB + lastb) / NBS];
        ld[i].nb_lo = absmax[(r1 * KB + first) / NBS];
        ld[i].nb_hi = absmax[(r1 * KB + lastb) / NBS];
    }
#if STAGES
    // The ring's first units (a slot is the warp's: its lanes read what other lanes copied).
    const u32 ring = sbase + STAGE_AT + warp * (STAGES * SLOT_BYTES);
    const unsigned char* wbytes = (const unsigned char*)words;
#pragma unroll
    for (u32 u = 0; u < STAGES; ++u) stage_unit(ring, wbytes, tile0, first, lane, u);
#endif

    // 2. Stage x, the scale map and the code table; then the pair table from the code table.
    stage_tables(small, smem, sbase, tbase, tid);

    // 3. The products. Lane (g, t) reads x[64 blk + 16t .. + 16] (B's column g is x for every g).
    const u32 lane_base = tbase | (lane << 2);
    const u32 xlane = sbase + 128u * first + 32u * t;
    const u32 smap = sbase + SMAP_AT;
#pragma unroll
    for (u32 i = 0; i < TPC; ++i) {
        float acc0 = 0.f, acc2 = 0.f;
        const u32 tile = tile0 + i;
        const u32 r0 = tile * 16u + g;
        const u32 lo_a = (r0 * KB + first) / NBS;
        const u32 lo_b = ((r0 + 8u) * KB + first) / NBS;
#pragma unroll
        for (u32 j = 0; j < BPW; ++j) {
            if (first + j < KB) {
                const U32x4 xa = lds128(xlane + 128u * j);
                const U32x4 xb = lds128(xlane + 128u * j + 16u);
                // The block's scale codes: byte j % 4 of the run's word j / 4.
                const u32 ca = ld[i].ca[j / 4] >> (8u * (j % 4u));
                const u32 cb = ld[i].cb[j / 4] >> (8u * (j % 4u));
                const float na =
                    (r0 * KB + first + j) / NBS == lo_a ? ld[i].na_lo : ld[i].na_hi;
                const float nb =
                    ((r0 + 8u) * KB + first + j) / NBS == lo_b ? ld[i].nb_lo : ld[i].nb_hi;
                const float s0 = __uint_as_float(lds32(smap + ((ca & 255u) << 2))) * na + s.offset;
                const float s1 = __uint_as_float(lds32(smap + ((cb & 255u) << 2))) * nb + s.offset;
                float d[4] = {0.f, 0.f, 0.f, 0.f};
#if STAGES
                // Unit i * UPT + j / 4 has landed once at most STAGES - 1 later groups of each
                // lane are pending and the warp has met. Lane (g, t) reads bytes 8t .. 8t + 7
                // of the block (part 2 (j % 4) + t / 2) of rows g and g + 8.
                const u32 u = i * UPT + j / 4u;
                if (j % 4u == 0u) {
                    cp_async_wait<STAGES - 1>();
                    sync_warp();
                }
                const u32 at = ring + (u % STAGES) * SLOT_BYTES + 128u * g +
                               16u * ((2u * (j % 4u) + (t >> 1)) ^ g) + 8u * (t & 1u);
                const U32x2 wa = lds64(at), wb = lds64(at + 1024u);
                const u32 ax = wa.x, ay = wa.y, bx = wb.x, by = wb.y;
#else
                const u32 ax = ld[i].wa[j].x, ay = ld[i].wa[j].y;
                const u32 bx = ld[i].wb[j].x, by = ld[i].wb[j].y;
#endif
                block_products(d, ax, ay, bx, by, xa, xb, lane_base);
                acc0 += s0 * d[0];
                acc2 += s1 * d[2];
            }
#if STAGES
            // Once every lane has read the unit, its slot takes the unit STAGES ahead.
            if (j % 4u == 3u) {
                sync_warp();
                stage_unit(ring, wbytes, tile0, first, lane, i * UPT + j / 4u + STAGES);
            }
#endif
        }
        // Lanes t = 0 hold rows g and g + 8 of the tile for this warp's run.
        if (t == 0u) {
            float* red = (float*)(smem + RED_AT) + (i * NW + warp) * 16u;
            red[g] = acc0;
            red[g + 8u] = acc2;
        }
    }
    __syncthreads();

    // 4. The cube's sums: one thread per output row.
    for (u32 o = tid; o < 16u * TPC; o += NT) {
        const u32 i = o >> 4;
        const u32 r = o & 15u;
        if (tile0 + i < N / 16u) {
            const float* red = (const float*)(smem + RED_AT) + i * NW * 16u + r;
            float sum = 0.f;
#pragma unroll
            for (u32 w = 0; w < NW; ++w) sum += red[w * 16u];
            out[(tile0 + i) * 16u + r] = to_half(sum);
        }
    }
}
