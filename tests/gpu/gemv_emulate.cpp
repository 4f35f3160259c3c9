// CPU emulation harness for the CUDA C++ GEMV kernels, src/quant/kernels/gemv_mma.cu (ENTRY 0)
// and gemv_row.cu (ENTRY 1), driven by gemv_emulate.py, which puts the configuration's
// #defines and the kernel source, with its inline-PTX helpers replaced by the emulations
// below, between the two halves of this file.
//
// Every CUDA thread of a cube is a std::thread; __syncthreads is a cube-wide barrier, and the
// warp-wide mma.sync is emulated by exchanging the 32 lanes' fragment registers behind a warp
// barrier and multiplying with the m16n8k16 fragment layout (PTX ISA, "mma.m16n8k16"). Shared
// memory reached by window address is a byte array whose dynamic part starts at 0x400, as on
// the GPU; an access outside the cube's DYN bytes fails the run. Cubes run one after the other. The data are random NF4 codes, 8-bit scale codes with nested f32
// scales and x; the reference is computed in double from the same values.
//
// ---- part 1: before the kernel ----
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __restrict__
#include <cstdlib>
inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
[[noreturn]] inline void __trap() {
    fprintf(stderr, "kernel trapped (shared memory not where it was planned)\n");
    exit(1);
}
// The shared-memory window: the reserved 1 KiB, then the dynamic region.
alignas(16) unsigned char emulated_window[0x400 + 228 * 1024];
inline unsigned emulated_window_address(const void* p) {
    return (unsigned)((const unsigned char*)p - emulated_window);
}
inline void emulated_check(unsigned addr, unsigned bytes) {
    if (addr < 0x400 || addr + bytes > 0x400 + DYN || addr % bytes) {
        fprintf(stderr, "shared access of %u bytes at 0x%x outside 0x400..0x%x or misaligned\n",
                bytes, addr, 0x400 + (unsigned)DYN);
        exit(1);
    }
}
template <class T> T emulated_load(unsigned addr) {
    emulated_check(addr, sizeof(T));
    T v;
    memcpy(&v, emulated_window + addr, sizeof(T));
    return v;
}
template <class T> void emulated_store(unsigned addr, T v) {
    emulated_check(addr, sizeof(T));
    memcpy(emulated_window + addr, &v, sizeof(T));
}
// cp.async: a thread's copies wait in groups until a wait_group lets them land, so a slot read
// before its group's wait still holds the stale bytes of the last cube.
struct PendingCopy { unsigned addr; const void* src; unsigned bytes; };
thread_local std::vector<PendingCopy> open_group;
thread_local std::vector<std::vector<PendingCopy>> pending_groups;
inline void emulated_cp_async(unsigned addr, const void* src, unsigned bytes) {
    emulated_check(addr, bytes);
    open_group.push_back({addr, src, bytes});
}
inline void emulated_commit() {
    pending_groups.push_back(std::move(open_group));
    open_group.clear();
}
inline void emulated_wait(unsigned most_pending) {
    while (pending_groups.size() > most_pending) {
        for (const PendingCopy& c : pending_groups.front())
            memcpy(emulated_window + c.addr, c.src, c.bytes);
        pending_groups.erase(pending_groups.begin());
    }
}
struct Dim3 { unsigned x, y, z; };
thread_local Dim3 threadIdx;
Dim3 blockIdx;
std::unique_ptr<std::barrier<>> cube_barrier;
std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
unsigned fragments[32][32][6];  // [warp][lane][a0..a3, b0, b1]
inline void __syncthreads() { cube_barrier->arrive_and_wait(); }
inline void emulated_sync_warp() { warp_barriers[threadIdx.x >> 5]->arrive_and_wait(); }

static float half_bits_to_float(unsigned short h) {
#if BF16
    unsigned u = (unsigned)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
#else
    const unsigned s = h >> 15, e = (h >> 10) & 31u, m = h & 1023u;
    float v = e == 0 ? std::ldexp((float)m, -24)
              : e == 31 ? (m ? NAN : INFINITY)
                        : std::ldexp((float)(m | 1024u), (int)e - 25);
    return s ? -v : v;
#endif
}

// Round to nearest even, as cvt.rn does.
static unsigned short float_to_half_bits(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
#if BF16
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
#else
    const unsigned sign = (u >> 16) & 0x8000u;
    const float a = std::fabs(f);
    if (a >= 65520.0f) return (unsigned short)(sign | 0x7C00u);
    if (a < std::ldexp(1.0f, -14)) {  // subnormal: multiples of 2^-24
        const float q = std::nearbyint(a * 16777216.0f);
        return (unsigned short)(sign | (unsigned)q);
    }
    int e;
    const float mant = std::frexp(a, &e);               // a = mant * 2^e, mant in [0.5, 1)
    float q = std::nearbyint(mant * 2048.0f);           // 11 significant bits
    if (q == 2048.0f) { q = 1024.0f; ++e; }
    if (e + 14 >= 31) return (unsigned short)(sign | 0x7C00u);
    return (unsigned short)(sign | ((unsigned)(e + 14) << 10) | ((unsigned)q - 1024u));
#endif
}

__device__ __forceinline__ unsigned short emulated_to_half(float v) {
    return float_to_half_bits(v);
}

__device__ __forceinline__ void emulated_mma(float* d, unsigned a0, unsigned a1, unsigned a2,
                                             unsigned a3, unsigned b0, unsigned b1) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    unsigned* mine = fragments[warp][lane];
    mine[0] = a0; mine[1] = a1; mine[2] = a2; mine[3] = a3; mine[4] = b0; mine[5] = b1;
    warp_barriers[warp]->arrive_and_wait();
    // A[m][k]: lane (m % 8) * 4 + (k % 8) / 2, register (m >= 8) + 2 (k >= 8), half k % 2.
    auto a = [&](unsigned m, unsigned k) {
        const unsigned v = fragments[warp][(m % 8) * 4 + (k % 8) / 2][(m >= 8) + 2 * (k >= 8)];
        return half_bits_to_float((unsigned short)(k % 2 ? v >> 16 : v & 0xFFFFu));
    };
    // B[k][n]: lane n * 4 + (k % 8) / 2, register 4 + (k >= 8), half k % 2.
    auto b = [&](unsigned k, unsigned n) {
        const unsigned v = fragments[warp][n * 4 + (k % 8) / 2][4 + (k >= 8)];
        return half_bits_to_float((unsigned short)(k % 2 ? v >> 16 : v & 0xFFFFu));
    };
    const unsigned g = lane >> 2, t = lane & 3u;
    float r[4] = {0.f, 0.f, 0.f, 0.f};
    for (unsigned k = 0; k < 16; ++k) {
        r[0] += a(g, k) * b(k, 2 * t);
        r[1] += a(g, k) * b(k, 2 * t + 1);
        r[2] += a(g + 8, k) * b(k, 2 * t);
        r[3] += a(g + 8, k) * b(k, 2 * t + 1);
    }
    warp_barriers[warp]->arrive_and_wait();
    for (int i = 0; i < 4; ++i) d[i] += r[i];
}
// ---- part 2: after the kernel ----
int main() {
    const unsigned k = K, n = N, rows = ROWS, blocks = N * K / 64;
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    std::vector<float> code(16);
    for (int i = 0; i < 16; ++i) code[i] = -1.0f + 2.0f * i / 15.0f;
    code[7] = 0.0f;
    std::vector<unsigned char> q(n * k);
    for (auto& v : q) v = rng() & 15u;
    std::vector<unsigned> words(n * k / 8, 0);
    for (unsigned i = 0; i < n * k / 2; ++i)
        words[i / 4] |= (unsigned)((q[2 * i] << 4) | q[2 * i + 1]) << (8 * (i % 4));
    std::vector<float> scale_map(256);
    for (int i = 0; i < 256; ++i) scale_map[i] = (i - 128) / 128.0f;
    std::vector<unsigned char> scale_code(blocks);
    std::vector<unsigned> scale_words((blocks + 3) / 4, 0);
    for (unsigned b = 0; b < blocks; ++b) {
        scale_code[b] = rng() & 255u;
        scale_words[b / 4] |= (unsigned)scale_code[b] << (8 * (b % 4));
    }
    std::vector<float> nested((blocks + NBS - 1) / NBS);
    for (auto& v : nested) v = 0.5f + (rng() % 100) / 100.0f;
    const float offset = 0.25f;
    // x and the output with their row pitches; the padding holds NaN, which must stay unread
    // (x) and unwritten (out).
    std::vector<unsigned short> xh(rows * XP, 0x7E00);
    std::vector<double> xf(rows * k);
    for (unsigned r = 0; r < rows; ++r)
        for (unsigned i = 0; i < k; ++i) {
            xh[r * XP + i] = float_to_half_bits(uniform(rng));
            xf[r * k + i] = half_bits_to_float(xh[r * XP + i]);
        }
    std::vector<unsigned short> out(rows * OP, 0x7E00);
    const GemvScalars s{offset, 0};
    const unsigned cubes = (n / 16 + TPC - 1) / TPC;
    for (unsigned c = 0; c < cubes; ++c) {
        blockIdx.x = c;
        memset(emulated_window, 0xA5, sizeof emulated_window);  // stale values from the last cube
        cube_barrier = std::make_unique<std::barrier<>>(NW * 32);
        warp_barriers.clear();
        for (unsigned w = 0; w < NW; ++w)
            warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < NW * 32; ++t)
            threads.emplace_back([&, t] {
                threadIdx.x = t;
#if ENTRY == 1
                nf4_gemv_row(xh.data(), (const U32x2*)words.data(), nested.data(),
                             scale_words.data(), scale_map.data(), code.data(), out.data(), s);
#else
                nf4_gemv_mma(xh.data(), (const U32x2*)words.data(), nested.data(),
                             scale_words.data(), scale_map.data(), code.data(), out.data(), s);
#endif
            });
        for (auto& th : threads) th.join();
    }
    std::vector<double> value(16);  // the kernel's table holds 16-bit code values
    for (int i = 0; i < 16; ++i) value[i] = half_bits_to_float(float_to_half_bits(code[i]));
    double num = 0, den = 0;
    for (unsigned r = 0; r < rows; ++r)
        for (unsigned o = 0; o < n; ++o) {
            double ref = 0;
            for (unsigned i = 0; i < k; ++i) {
                const unsigned b = (o * k + i) / 64;
                const double scale = (double)(scale_map[scale_code[b]] * nested[b / NBS] + offset);
                ref += xf[r * k + i] * value[q[o * k + i]] * scale;
            }
            const double got = half_bits_to_float(out[r * OP + o]);
            num += (got - ref) * (got - ref);
            den += ref * ref;
        }
    bool padding_kept = true;
    for (unsigned r = 0; r < rows; ++r)
        for (unsigned o = n; o < OP; ++o) padding_kept &= out[r * OP + o] == 0x7E00;
    const double err = std::sqrt(num / den);
    const bool ok = err <= (BF16 ? 8e-3 : 1e-3) && padding_kept;
    printf("K=%u N=%u ROWS=%u NW=%u BPW=%u CH=%u TPC=%u XP=%u OP=%u BF16=%u STAGES=%u: "
           "rel err %.2e%s %s\n",
           k, n, rows, (unsigned)NW, (unsigned)BPW, (unsigned)CH, (unsigned)TPC, (unsigned)XP,
           (unsigned)OP, (unsigned)BF16, (unsigned)STAGES, err, padding_kept ? "" : " (wrote into row padding)",
           ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
