#!/usr/bin/env python3
"""Runs src/quant/kernels/gemv_mma.cu on the CPU (no GPU needed) against a double reference.

Each configuration's #defines, the harness's first half, the kernel (its two inline-PTX helpers,
`to_half` and `mma`, swapped for the harness's emulations) and the harness's second half are
compiled with g++ (C++20: std::barrier) and run; see gemv_mma_emulate.cpp for how threads,
barriers and the warp-wide mma are emulated. It checks the kernel's indexing and fragment
layout (tiles, warps, chunks, partial chunks, tiles per cube, padded row pitches), not its
speed or its PTX. Exit status 1 if any configuration fails.

  tests/gpu/gemv_mma_emulate.py                      the built-in configurations
  tests/gpu/gemv_mma_emulate.py K N ROWS NW BPW CH TPC BF16 [XP OP]
"""
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL = os.path.join(HERE, "..", "..", "src", "quant", "kernels", "gemv_mma.cu")

# (K, N, ROWS, NW, BPW, CH, TPC, BF16, XP, OP): the plan's shapes, a short last warp, partial
# chunks, several tiles per cube, bf16, and padded pitches (48 outputs: CubeCL pads rows).
CONFIGS = [
    (640, 48, 5, 3, 4, 2, 1, 0, 640, 64),
    (640, 48, 5, 4, 3, 2, 3, 0, 648, 64),
    (2560, 64, 8, 10, 4, 2, 2, 1, 2560, 64),
    (2560, 32, 1, 14, 3, 2, 1, 0, 2560, 32),
    (256, 32, 3, 1, 4, 4, 2, 0, 256, 32),
    (1024, 16, 2, 16, 1, 1, 1, 1, 1032, 24),
]


def emulated_source() -> str:
    src = open(KERNEL).read()
    src, n1 = re.subn(
        r"__device__ __forceinline__ u16 to_half\(float v\) \{.*?\n\}\n",
        "__device__ __forceinline__ u16 to_half(float v) { return emulated_to_half(v); }\n",
        src,
        flags=re.S,
    )
    src, n2 = re.subn(
        r"__device__ __forceinline__ void mma\(float\* d, (u32 \w+, ){5}u32 \w+\) \{.*?\n\}\n",
        "__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, "
        "u32 b1) { emulated_mma(d, a0, a1, a2, a3, b0, b1); }\n",
        src,
        flags=re.S,
    )
    if (n1, n2) != (1, 1):
        sys.exit("gemv_mma.cu: to_half or mma not found; update the patterns here")
    return src


def run(cfg, kernel: str, harness: str, tmp: str) -> bool:
    k, n, rows, nw, bpw, ch, tpc, bf16, xp, op = cfg
    names = ["K", "N", "ROWS", "NW", "BPW", "CH", "TPC", "BF16", "XP", "OP"]
    defines = "".join(f"#define {a} {v}u\n" for a, v in zip(names, cfg)) + "#define NBS 256u\n"
    first, second = harness.split("// ---- part 2: after the kernel ----")
    cpp = os.path.join(tmp, "emulate.cpp")
    exe = os.path.join(tmp, "emulate")
    with open(cpp, "w") as f:
        f.write(defines + first + kernel + second)
    cc = subprocess.run(
        ["g++", "-std=c++20", "-O2", "-pthread", "-w", "-o", exe, cpp],
        capture_output=True,
        text=True,
    )
    if cc.returncode:
        print(cc.stderr[-4000:])
        return False
    res = subprocess.run([exe], capture_output=True, text=True)
    print(res.stdout.strip() or res.stderr.strip())
    return res.returncode == 0


def main() -> None:
    configs = CONFIGS
    if len(sys.argv) > 1:
        v = [int(a) for a in sys.argv[1:]]
        if len(v) == 8:
            v += [v[0], v[1]]
        configs = [tuple(v)]
    kernel = emulated_source()
    harness = open(os.path.join(HERE, "gemv_mma_emulate.cpp")).read()
    with tempfile.TemporaryDirectory() as tmp:
        ok = all([run(c, kernel, harness, tmp) for c in configs])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
