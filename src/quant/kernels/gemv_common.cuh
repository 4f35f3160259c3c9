// What the CUDA C++ GEMVs (gemv_mma.cu, gemv_row.cu) share; put in front of each of them, after
// the configuration's #defines (BF16: 1 for bf16 values, 0 for f16).

typedef unsigned int u32;
typedef unsigned short u16;
// Own vector types, so the source needs no header.
struct __align__(8) U32x2 { u32 x, y; };
struct __align__(16) U32x4 { u32 x, y, z, w; };
struct __align__(16) F32x4 { float v[4]; };

// The kernels' scalar parameters, passed by value as one struct.
struct __align__(8) GemvScalars {
    float offset;  // added to every double-quantized scale
    u32 pad;
};

#if BF16
#define MMA_TYPE "bf16"
#else
#define MMA_TYPE "f16"
#endif
#define KB (K / 64)

// f32 to the compute dtype's 16 bits, rounded to nearest even.
__device__ __forceinline__ u16 to_half(float v) {
    u16 h;
#if BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
#endif
    return h;
}

// d += A * B for one 16x8x16 tile (f32 accumulators).
__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
