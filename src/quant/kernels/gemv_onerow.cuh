// The one-row GEMV's (gemv_row.cu) shared-memory layout, helpers and per-block products; put
// after gemv_common.cuh and before it. The configuration's #defines come first: K, NW, WIDE
// (0 when left out).
//
// The start of its dynamic shared memory (which starts at window offset 0x400): x (2 bytes a
// value), the scale map (256 f32) and the code table (16 values of 16 bits, 64 bytes kept);
// above them the pair table, at the window offset aligned to its size: 32 KiB (entry stride 128
// bytes, at 0x8000 at the earliest), or 64 KiB when WIDE (entry stride 256, half of each stride
// unused, at 0x10000).

#ifndef WIDE
#define WIDE 0
#endif
#define SMAP_AT (K * 2u)
#define HCODE_AT (SMAP_AT + 1024u)
#define TABLE_BYTES (WIDE ? 0x10000u : 0x8000u)

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

#if WIDE
// The pair of a packed byte: its address is `lane_base` (the table's aligned base | lane * 4)
// with byte 1 replaced by the packed byte (entry stride 256).
#define PAIR0(w) lds32(__byte_perm((w), lane_base, 0x7604u))
#define PAIR1(w) lds32(__byte_perm((w), lane_base, 0x7614u))
#define PAIR2(w) lds32(__byte_perm((w), lane_base, 0x7624u))
#define PAIR3(w) lds32(__byte_perm((w), lane_base, 0x7634u))
#else
// The pair of a packed byte: `lane_base` (the table's aligned base | lane * 4) OR the byte's
// offset (byte * 128), the byte taken from `w` by the shift that puts it in bits 7..14.
#define PAIR0(w) lds32((((w) << 7) & 0x7F80u) | lane_base)
#define PAIR1(w) lds32((((w) >> 1) & 0x7F80u) | lane_base)
#define PAIR2(w) lds32((((w) >> 9) & 0x7F80u) | lane_base)
#define PAIR3(w) lds32((((w) >> 17) & 0x7F80u) | lane_base)
#endif

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
        sts128(tbase + (WIDE ? 256u * b + 16u * (q & 7u) : 16u * q), U32x4{p, p, p, p});
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
