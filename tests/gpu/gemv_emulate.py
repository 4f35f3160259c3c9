#!/usr/bin/env python3
"""Runs the CUDA C++ GEMV kernels on the CPU (no GPU needed) against a double reference.

The kernels are src/quant/kernels/gemv_mma.cu (1..8 rows of x) and gemv_row.cu (one row), each
after gemv_common.cuh.
Each configuration's #defines, the harness's first half, the kernel (its inline-PTX helpers
swapped for the harness's emulations) and the harness's second half are compiled with g++
(C++20: std::barrier) and run; see gemv_emulate.cpp for how threads, barriers, shared memory
and the warp-wide mma are emulated. It checks the kernels' indexing, fragment layout and
shared-memory layout (tiles, warps, chunks, partial runs, tiles per cube, padded row pitches),
not their speed or their PTX. Exit status 1 if any configuration fails.

  tests/gpu/gemv_emulate.py                                   the built-in configurations
  tests/gpu/gemv_emulate.py mma K N ROWS NW BPW CH TPC BF16 [XP OP]
  tests/gpu/gemv_emulate.py row K N NW BPW TPC BF16 STAGES
"""
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, "..", "..", "src", "quant", "kernels")
MMA_NAMES = ["K", "N", "ROWS", "NW", "BPW", "CH", "TPC", "BF16", "XP", "OP"]
ROW_NAMES = ["K", "N", "NW", "BPW", "TPC", "BF16", "STAGES"]


def row_layout(k: int, nw: int, tpc: int, stages: int):
    """(STAGE_AT, DYN) as gemv_row.rs plans them: the 32 KiB pair table at window offset 0x8000
    (0x7C00 from the start of the dynamic region), the ring of 2 KiB slots below it where it
    fits, else above it."""
    table_at, table_end = 0x8000 - 0x400, 0x10000 - 0x400
    low = 2 * k + 1024 + 64 + 64 * nw * tpc
    ring = stages * nw * 2048
    if stages == 0:
        return 0, table_end
    if low + ring <= table_at:
        return low, table_end
    return table_end, table_end + ring

# gemv_mma.cu (K, N, ROWS, NW, BPW, CH, TPC, BF16, XP, OP): the plan's shapes, a short last
# warp, partial chunks, several tiles per cube, bf16, and padded pitches (48 outputs: CubeCL
# pads rows).
MMA_CONFIGS = [
    (640, 48, 5, 3, 4, 2, 1, 0, 640, 64),
    (640, 48, 5, 4, 3, 2, 3, 0, 648, 64),
    (2560, 64, 8, 10, 4, 2, 2, 1, 2560, 64),
    (2560, 32, 1, 14, 3, 2, 1, 0, 2560, 32),
    (256, 32, 3, 1, 4, 4, 2, 0, 256, 32),
    (1024, 16, 2, 16, 1, 1, 1, 1, 1032, 24),
]
# gemv_row.cu (K, N, NW, BPW, TPC, BF16, STAGES): the plan's 4B shapes (narrowed in N), a
# short last warp (152 blocks in 13 runs of 12), runs of 8, a last cube with fewer tiles, bf16.
# STAGES 0 loads W into registers; S > 0 streams it through a ring of S slots per warp, each 4
# blocks (whole 128-byte lines of the 16 rows, swizzled), below the table or above it when the
# small inputs leave no room. The first three are the defaults (session 25): one tile a cube,
# W in registers for 4-block runs, one slot for 12-block runs.
ROW_CONFIGS = [
    (2560, 48, 10, 4, 1, 0, 0),
    (9728, 32, 13, 12, 1, 0, 1),
    (9728, 48, 13, 12, 1, 1, 1),
    (2560, 64, 10, 4, 2, 0, 0),
    (9728, 32, 13, 12, 1, 0, 0),
    (4096, 48, 16, 4, 2, 1, 0),
    (768, 48, 2, 8, 1, 0, 0),
    (512, 16, 1, 8, 3, 1, 0),
    (2560, 64, 10, 4, 2, 0, 2),
    (9728, 32, 13, 12, 2, 1, 3),
    (2560, 96, 10, 4, 5, 0, 4),
    (512, 48, 1, 8, 3, 0, 1),
]


def emulated_source(name: str) -> str:
    src = open(os.path.join(KERNELS, "gemv_common.cuh")).read()
    src += open(os.path.join(KERNELS, name)).read()
    swaps = [
        (r"u16 to_half\(float v\)", "{ return emulated_to_half(v); }"),
        (
            r"void mma\(float\* d, (u32 \w+, ){5}u32 \w+\)",
            "{ emulated_mma(d, a0, a1, a2, a3, b0, b1); }",
        ),
        (r"u32 lds32\(u32 addr\)", "{ return emulated_load<u32>(addr); }"),
        (r"U32x4 lds128\(u32 addr\)", "{ return emulated_load<U32x4>(addr); }"),
        (r"void sts128\(u32 addr, U32x4 v\)", "{ emulated_store(addr, v); }"),
        (r"u32 window_address\(const void\* p\)", "{ return emulated_window_address(p); }"),
        (r"void cp_async16\(u32 addr, const void\* src\)", "{ emulated_cp_async(addr, src, 16); }"),
        (r"U32x2 lds64\(u32 addr\)", "{ return emulated_load<U32x2>(addr); }"),
        (r"void sync_warp\(\)", "{ emulated_sync_warp(); }"),
        (r"void cp_async_commit\(\)", "{ emulated_commit(); }"),
        (r"void cp_async_wait\(\)", "{ emulated_wait(PENDING); }"),
    ]
    for signature, body in swaps:
        pattern = r"(__device__ __forceinline__ " + signature + r") \{.*?\n\}\n"
        src, n = re.subn(pattern, lambda m: m.group(1) + " " + body + "\n", src, flags=re.S)
        if n > 1:
            sys.exit(f"{name}: {signature} defined {n} times")
    if "asm" in src:
        sys.exit(f"{name}: inline PTX left that the harness does not emulate; update the swaps")
    src = src.replace(
        "extern __shared__ __align__(16) unsigned char smem[];",
        "unsigned char* smem = emulated_window + 0x400;",
    )
    return src


def defines(kind: str, cfg) -> str:
    if kind == "mma":
        values = dict(zip(MMA_NAMES, cfg))
        values.update(ENTRY=0, MINB=1, DYN=0, STAGES=0, STAGE_AT=0)
    else:
        values = dict(zip(ROW_NAMES, cfg))
        stage_at, dyn = row_layout(*(cfg[i] for i in (0, 2, 4, 6)))
        values.update(ROWS=1, XP=cfg[0], OP=cfg[1], CH=0, ENTRY=1, MINB=1, DYN=dyn)
        values.update(STAGE_AT=stage_at)
    values["NBS"] = 256
    return "".join(f"#define {a} {v}u\n" for a, v in values.items())


def run(kind: str, cfg, kernel: str, harness: str, tmp: str) -> bool:
    first, second = harness.split("// ---- part 2: after the kernel ----")
    cpp = os.path.join(tmp, "emulate.cpp")
    exe = os.path.join(tmp, "emulate")
    with open(cpp, "w") as f:
        f.write(defines(kind, cfg) + first + kernel + second)
    cc = subprocess.run(
        ["g++", "-std=c++20", "-O2", "-pthread", "-w", "-o", exe, cpp],
        capture_output=True,
        text=True,
    )
    if cc.returncode:
        print(cc.stderr[-4000:])
        return False
    res = subprocess.run([exe], capture_output=True, text=True)
    print(f"{kind}: " + (res.stdout.strip() or res.stderr.strip()))
    return res.returncode == 0


def main() -> None:
    jobs = [("mma", c) for c in MMA_CONFIGS] + [("row", c) for c in ROW_CONFIGS]
    if len(sys.argv) > 1:
        kind, v = sys.argv[1], [int(a) for a in sys.argv[2:]]
        if kind == "mma" and len(v) == 8:
            v += [v[0], v[1]]
        jobs = [(kind, tuple(v))]
    sources = {
        "mma": emulated_source("gemv_mma.cu"),
        "row": emulated_source("gemv_row.cu"),
    }
    harness = open(os.path.join(HERE, "gemv_emulate.cpp")).read()
    with tempfile.TemporaryDirectory() as tmp:
        ok = all([run(kind, c, sources[kind], harness, tmp) for kind, c in jobs])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
