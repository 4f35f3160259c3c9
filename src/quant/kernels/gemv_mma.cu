// NF4 GEMV on tensor cores for 1..8 rows of x: out[n, o] = sum_k x[n, k] * W[o, k].
// Configured by the #defines `gemv_mma.rs` puts in front of gemv_common.cuh and this file:
//   K, N        W's input and output widths (K a multiple of 64, N of 16)
//   ROWS        rows of x (1..8)
//   XP, OP      row pitches of x and of the output (CubeCL may pad a tensor's rows)
//   NW          warps per cube; BPW absmax blocks per warp, loaded CH at a time (NCH chunks)
//   TPC         tiles of 16 W rows per cube (taken one after the other)
//   NBS         8-bit scale codes per nested f32 scale (double quantization)
//   BF16        1 for bf16 values, 0 for f16
//
// A cube owns TPC tiles of 16 rows of W (one m16n8k16 tile each: W rows are the tile's M, x
// rows its N) and its warps split the input blocks of 64 between them. In one block, lane (g, t) = (lane / 4,
// lane % 4) loads bytes 8t..8t+7 of the block for W rows g and g + 8 (16 values each) and
// x[g][16t .. 16t + 16]. The sum over k does not care how k is ordered, so the four mmas of a
// block give A's and B's k-slots to these values in the same way: mma j, slots (2t, 2t+1)
// hold values 16t + 4j + {0, 1}, slots (2t+8, 2t+9) hold 16t + 4j + {2, 3}. The A fragment is
// then one packed byte per register, dequantized by one read of a table of value pairs, and
// every k of an mma lies in one absmax block, so the block's scale multiplies the mma result.
// The pair table holds 32 copies (copy l for lane l, in bank l), so the reads never conflict.

#define NCH ((BPW + CH - 1) / CH)

// The pair of byte `k` of `w`, read from the lane's copy: byte * 128 + lane * 4 (bytes).
#define PAIR(w, shift_expr, lane4) \
    (*(const u32*)((const char*)pairs + ((((shift_expr)) & 0x7F80u) | (lane4))))
#define PAIR0(w, l4) PAIR(w, (w) << 7, l4)
#define PAIR1(w, l4) PAIR(w, (w) >> 1, l4)
#define PAIR2(w, l4) PAIR(w, (w) >> 9, l4)
#define PAIR3(w, l4) PAIR(w, (w) >> 17, l4)

// One chunk of CH blocks of a warp's run, as loaded: for W rows g and g + 8 (`a`, `b`) the
// lane's 8 packed bytes, the word holding the block's 8-bit scale code and the nested f32
// scale, and the lane's 16 values of x.
struct Chunk {
    U32x2 wa[CH], wb[CH];
    u32 ca[CH], cb[CH];
    float na[CH], nb[CH];
    U32x4 xa[CH], xb[CH];
};

// Issues the loads of blocks `blk0 .. blk0 + CH` (those below `last`) of the tile whose row g
// is `row0`.
__device__ __forceinline__ void load_chunk(
    Chunk& c, u32 row0, u32 blk0, u32 last, const U32x2* __restrict__ words,
    const float* __restrict__ absmax, const u32* __restrict__ scale_words,
    const u16* __restrict__ xg, bool has_x)
{
    const u32 row1 = row0 + 8u;
#pragma unroll
    for (u32 j = 0; j < CH; ++j) {
        const u32 blk = blk0 + j;
        if (blk < last) {
            c.wa[j] = words[row0 * (K / 16) + 4u * blk];
            c.wb[j] = words[row1 * (K / 16) + 4u * blk];
            const u32 i0 = row0 * KB + blk;
            const u32 i1 = row1 * KB + blk;
            c.ca[j] = scale_words[i0 >> 2];
            c.cb[j] = scale_words[i1 >> 2];
            c.na[j] = absmax[i0 / NBS];
            c.nb[j] = absmax[i1 / NBS];
            if (has_x) {
                const U32x4* xv = (const U32x4*)(xg + 64u * blk);
                c.xa[j] = xv[0];
                c.xb[j] = xv[1];
            } else {
                c.xa[j] = U32x4{0u, 0u, 0u, 0u};
                c.xb[j] = c.xa[j];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(NW * 32) nf4_gemv_mma(
    const u16* __restrict__ x,            // [ROWS, K], rows XP apart
    const U32x2* __restrict__ words,      // [N, K / 16] (8 bytes = 16 values each)
    const float* __restrict__ absmax,     // nested f32 scales
    const u32* __restrict__ scale_words,  // 8-bit scale codes, 4 per word
    const float* __restrict__ scale_map,  // [256]
    const float* __restrict__ code,       // [16]
    u16* __restrict__ out,                // [ROWS, N], rows OP apart
    const GemvScalars s)
{
    __shared__ __align__(16) u32 pairs[256 * 32];
    __shared__ float smap[256];
    __shared__ u16 hcode[16];
    __shared__ F32x4 red[NW * 32];

    const u32 tid = threadIdx.x;
    const u32 lane = tid & 31u;
    const u32 warp = tid >> 5;
    const u32 g = lane >> 2;
    const u32 t = lane & 3u;
    const u32 lane4 = lane << 2;
    const u32 first = warp * BPW;
    const u32 last = first + BPW < KB ? first + BPW : KB;
    const bool has_x = g < ROWS;
    const u16* xg = x + (has_x ? g : 0u) * XP + 16u * t;
    const U32x2* wl = words + t;
    // This cube's tiles of 16 W rows: tile0 .. tile_end.
    const u32 tile0 = blockIdx.x * TPC;
    const u32 tile_end = tile0 + TPC < N / 16u ? tile0 + TPC : N / 16u;

    // The first chunk's loads are in flight while the tables are staged.
    Chunk cur;
    load_chunk(cur, tile0 * 16u + g, first, last, wl, absmax, scale_words, xg, has_x);

    for (u32 i = tid; i < 256u; i += NW * 32u) smap[i] = scale_map[i];
    if (tid < 16u) hcode[tid] = to_half(code[tid]);
    __syncthreads();
    // 2048 vectors of 4 words: vector q holds copies 4(q % 8) .. +3 of entry q / 8. The pair
    // of byte b is (value of its high nibble, value of its low nibble), low half first.
    for (u32 q = tid; q < 2048u; q += NW * 32u) {
        const u32 b = q >> 3;
        const u32 p = (u32)hcode[b >> 4] | ((u32)hcode[b & 15u] << 16);
        ((U32x4*)pairs)[q] = U32x4{p, p, p, p};
    }
    __syncthreads();

    for (u32 tile = tile0; tile < tile_end; ++tile) {
        const u32 row0 = tile * 16u + g;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        // NCH chunks per tile; each step issues the next step's loads (this tile's next chunk,
        // or the next tile's first) before it computes its own.
#pragma unroll
        for (u32 ch = 0; ch < NCH; ++ch) {
            Chunk nxt;
            if (ch + 1u < NCH) {
                load_chunk(nxt, row0, first + (ch + 1u) * CH, last, wl, absmax, scale_words,
                           xg, has_x);
            } else if (tile + 1u < tile_end) {
                load_chunk(nxt, row0 + 16u, first, last, wl, absmax, scale_words, xg, has_x);
            }
#pragma unroll
            for (u32 j = 0; j < CH; ++j) {
                const u32 blk = first + ch * CH + j;
                if (blk < last) {
                    const u32 i0 = row0 * KB + blk;
                    const u32 i1 = i0 + 8u * KB;
                    const float s0 =
                        smap[(cur.ca[j] >> ((i0 & 3u) * 8u)) & 255u] * cur.na[j] + s.offset;
                    const float s1 =
                        smap[(cur.cb[j] >> ((i1 & 3u) * 8u)) & 255u] * cur.nb[j] + s.offset;
                    float d[4] = {0.f, 0.f, 0.f, 0.f};
                    const u32 ax = cur.wa[j].x, ay = cur.wa[j].y;
                    const u32 bx = cur.wb[j].x, by = cur.wb[j].y;
                    mma(d, PAIR0(ax, lane4), PAIR0(bx, lane4), PAIR1(ax, lane4),
                        PAIR1(bx, lane4), cur.xa[j].x, cur.xa[j].y);
                    mma(d, PAIR2(ax, lane4), PAIR2(bx, lane4), PAIR3(ax, lane4),
                        PAIR3(bx, lane4), cur.xa[j].z, cur.xa[j].w);
                    mma(d, PAIR0(ay, lane4), PAIR0(by, lane4), PAIR1(ay, lane4),
                        PAIR1(by, lane4), cur.xb[j].x, cur.xb[j].y);
                    mma(d, PAIR2(ay, lane4), PAIR2(by, lane4), PAIR3(ay, lane4),
                        PAIR3(by, lane4), cur.xb[j].z, cur.xb[j].w);
                    acc[0] += s0 * d[0];
                    acc[1] += s0 * d[1];
                    acc[2] += s1 * d[2];
                    acc[3] += s1 * d[3];
                }
            }
            cur = nxt;
        }

        // Lane (g, t) holds rows g and g + 8 for x rows 2t and 2t + 1; the cube adds its
        // warps' sums, one thread per (row, x row).
        red[warp * 32u + lane] = F32x4{{acc[0], acc[1], acc[2], acc[3]}};
        __syncthreads();
        for (u32 o = tid; o < 128u; o += NW * 32u) {
            const u32 r = o >> 3;  // row of the tile
            const u32 n = o & 7u;  // row of x
            const u32 l = (r & 7u) * 4u + (n >> 1);
            const u32 e = (r >> 3) * 2u + (n & 1u);
            float sum = 0.f;
#pragma unroll
            for (u32 w = 0; w < NW; ++w) {
                sum += red[w * 32u + l].v[e];
            }
            if (n < ROWS) out[n * OP + tile * 16u + r] = to_half(sum);
        }
        __syncthreads();  // `red` is rewritten by the next tile
    }
}
