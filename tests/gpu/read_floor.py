#!/usr/bin/env python3
"""The fastest read-only pass over a buffer of each 4B one-row GEMV's size, next to a copy: how
much of the card's copy bandwidth any kernel that reads an NF4 weight once can reach.

Needs CuPy and a CUDA GPU. Run it under ncu for device time (cold L2: ncu flushes the caches
before every profiled launch), then summarize with ncu_summary.py:

  for i in 0 1 2 3; do ncu --csv --clock-control none --metrics gpu__time_duration.sum,\
dram__bytes_read.sum,launch__registers_per_thread,smsp__inst_executed.sum \
python3 tests/gpu/read_floor.py --size $i > r$i.csv; done
  tests/gpu/ncu_summary.py r0.csv r1.csv r2.csv r3.csv

Kernels: `read_floor` (gemv_lab.py's grid-stride loop, 4 loads of 16 bytes in flight per
thread) at several grids and block sizes, `read_once` (every thread reads U x 16 bytes and
exits: no loop, as many threads as the buffer needs) for U = 1, 2, 4, 8, and `copy16` (16 bytes
per thread read and written). Each is launched LAUNCHES times per size; the 256 MiB buffer gives
the card's copy bandwidth (read + write counted) that the GEMV goal is stated against.
"""
import argparse

import cupy as cp
import numpy as np

from gemv_lab import READ_SOURCE  # `read_floor`: the lab's grid-stride read-only pass

# Bytes of packed weight + 8-bit scale codes of the one-row 4B shapes (in x out / 2 + blocks).
SIZES = {"1.35 MB (2560->1024)": 1_351_680, "5.41 MB (2560->4096, 4096->2560)": 5_406_720,
         "12.84 MB (2560->9728, 9728->2560)": 12_840_960, "256 MiB (copy reference)": 1 << 28}
LAUNCHES = 5

SOURCE = READ_SOURCE + r"""
template <int U>
__device__ void read_once(const uint4* __restrict__ p, unsigned n, unsigned* out) {
    // Thread t reads vectors base + j * blockDim.x (j < U) of its block's U * blockDim.x.
    const unsigned base = blockIdx.x * blockDim.x * U + threadIdx.x;
    uint4 v[U];
#pragma unroll
    for (int j = 0; j < U; ++j)
        v[j] = base + j * blockDim.x < n ? __ldg(p + base + j * blockDim.x)
                                          : make_uint4(0, 0, 0, 0);
    unsigned acc = 0;
#pragma unroll
    for (int j = 0; j < U; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    if (acc == 0x9E3779B9u) out[0] = 1;
}
extern "C" __global__ void read_once1(const uint4* p, unsigned n, unsigned* o) {
    read_once<1>(p, n, o);
}
extern "C" __global__ void read_once2(const uint4* p, unsigned n, unsigned* o) {
    read_once<2>(p, n, o);
}
extern "C" __global__ void read_once4(const uint4* p, unsigned n, unsigned* o) {
    read_once<4>(p, n, o);
}
extern "C" __global__ void read_once8(const uint4* p, unsigned n, unsigned* o) {
    read_once<8>(p, n, o);
}

extern "C" __global__ void copy16(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                  unsigned n) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[i];
}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--launches", type=int, default=LAUNCHES)
    ap.add_argument("--size", type=int, help="only the size of this index (one ncu report each)")
    a = ap.parse_args()
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    module = cp.RawModule(code=SOURCE, options=("-std=c++17",))
    flag = cp.zeros(1, dtype=np.uint32)
    for index, (label, nbytes) in enumerate(SIZES.items()):
        if a.size is not None and index != a.size:
            continue
        n16 = nbytes // 16
        src = cp.asarray(np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8))
        dst = cp.empty_like(src)
        launches = []
        if nbytes < 1 << 28:
            stride = module.get_function("read_floor")
            for per_sm, block in ((4, 256), (8, 256), (16, 256), (2, 1024), (4, 512)):
                launches.append(lambda g=sms * per_sm, b=block: stride(
                    (g,), (b,), (src, np.uint32(n16), flag)))
            for u in (1, 2, 4, 8):
                once = module.get_function(f"read_once{u}")
                for block in (256, 512):
                    grid = -(-n16 // (block * u))
                    launches.append(lambda f=once, g=grid, b=block: f(
                        (g,), (b,), (src, np.uint32(n16), flag)))
        copy = module.get_function("copy16")
        launches.append(lambda: copy((-(-n16 // 256),), (256,), (src, dst, np.uint32(n16))))
        print(f"{label}: {nbytes} bytes, {len(launches)} kernels x {a.launches} launches",
              flush=True)
        for launch in launches:
            for _ in range(a.launches):
                launch()
        cp.cuda.Device().synchronize()
        del src, dst
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
