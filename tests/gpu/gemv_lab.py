#!/usr/bin/env python3
"""Times configurations of the one-row NF4 GEMV (src/quant/kernels/gemv_row.cu) on the GPU
through CuPy, next to a read-only pass and a device-to-device copy of the same bytes.

Needs CuPy and a CUDA GPU (the device machine has both); no Rust build. Each shape gets a fresh
random NF4 weight (8-bit scale codes, nested f32 scales); every configuration is first checked
against a float64 reference (relative error <= 1e-3 in f16) with a poisoned output, then timed:
a CUDA graph replays one launch per copy of the weight, the copies together over 3x the L2, so
every launch reads its weight from DRAM, as decoding does layer after layer. Times are the
median over replays of (graph time / launches): kernel time plus the launch gap of a graph.

  tests/gpu/gemv_lab.py                         the 4B shapes, the built-in configurations
  tests/gpu/gemv_lab.py --shapes 2560x9728 --configs plan,s2,s4 --reps 30
  tests/gpu/gemv_lab.py --ncu                   6 launches each (run under ncu for device time)

Configurations: "plan" is gemv_row.rs's plan (one tile per cube; W in registers, or through one
slot of whole lines for runs over 8 blocks); "sS" the same with a ring of S slots per warp
(cp.async of whole lines; "s0": W in registers whatever the run); each may be followed by
":NAME=VALUE" overrides (NW, BPW, TPC, MINB), e.g. "s2:TPC=2". Lower-case overrides are the
lab's ablations: ":nomath=1" (see NO_MATH), ":notable=1" (the pair table is not built). The
read-only pass ("read") reads the weight's bytes 16 at a time; "copy" is cudaMemcpyAsync of
those bytes. tests/gpu/read_floor.py looks for the fastest read-only pass under ncu.
"""
import argparse
import math
import os
import statistics
import sys

import cupy as cp
import numpy as np

from gemv_emulate import row_layout  # the shared-memory layout Rust plans

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, "..", "..", "src", "quant", "kernels")
SHAPES_4B = [(2560, 4096), (2560, 1024), (4096, 2560), (2560, 9728), (9728, 2560)]
NBS = 256  # 8-bit scale codes per nested f32 scale
SMEM_PER_SM = 228 * 1024  # sm_90; each cube also takes 1 KiB the hardware reserves

READ_SOURCE = r"""
extern "C" __global__ void read_floor(const uint4* __restrict__ p, unsigned n, unsigned* out) {
    // Four independent 16-byte loads in flight per thread per step.
    uint4 acc = make_uint4(0, 0, 0, 0);
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += 4 * stride) {
        uint4 v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
            v[j] = i + j * stride < n ? __ldg(p + i + j * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int j = 0; j < 4; ++j) { acc.x ^= v[j].x; acc.y ^= v[j].y; acc.z ^= v[j].z; acc.w ^= v[j].w; }
    }
    if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9E3779B9u) out[0] = 1;
}
"""


def plan(k: int) -> dict:
    """gemv_row.rs's RowPlan::planned without overrides."""
    blocks = k // 64
    least = -(-blocks // 16)
    least = -(-least // 4) * 4
    bpw = min(least, blocks)
    warps = -(-blocks // bpw)
    cubes_per_sm = max(1, min(3, 2048 // (32 * warps)))
    tiles = 1  # one tile per cube
    need = 28 + 4 * bpw * tiles
    fitting = next((m for m in range(cubes_per_sm, 0, -1) if 65536 // (m * 32 * warps) >= need), 1)
    streamed = int(bpw > 8)  # REGISTER_RUN: longer runs stream through one slot
    # (with a ring, `config` sets the cubes per multiprocessor from shared memory)
    return dict(NW=warps, BPW=bpw, TPC=tiles, MINB=fitting, STAGES=streamed)


def config(name: str, k: int, n: int) -> dict:
    head, *sets = name.split(":")
    cfg = plan(k)
    if head == "plan":
        pass
    elif head.startswith("s"):
        cfg["STAGES"] = int(head[1:])
    else:
        sys.exit(f"unknown configuration {name}")
    for s in sets:
        key, value = s.split("=")
        cfg[key] = int(value)
    # Lower-case keys are the lab's own ablations (see `source`), not the kernel's defines.
    ablate = {key: cfg.pop(key) for key in list(cfg) if key.islower()}
    units = cfg["TPC"] * cfg["BPW"] // 4
    cfg["STAGES"] = min(cfg["STAGES"], units)

    def layout():
        return row_layout(k, cfg["NW"], cfg["TPC"], cfg["STAGES"])

    # No more slots than a cube's shared memory holds (227 KiB, as gemv_row.rs's MAX_DYNAMIC).
    while cfg["STAGES"] > 0 and layout()[1] > 227 * 1024:
        cfg["STAGES"] -= 1
    stage_at, dyn = layout()
    if cfg["STAGES"]:
        # Registers no longer hold W: as many cubes as shared memory allows.
        by_smem = SMEM_PER_SM // (dyn + 1024)
        if "MINB" not in "".join(sets):
            cfg["MINB"] = max(1, min(by_smem, 2048 // (32 * cfg["NW"])))
    cfg.update(K=k, N=n, NBS=NBS, DYN=dyn, STAGE_AT=stage_at, BF16=0)
    cfg["ablate"] = ablate
    return cfg


# `:nomath=1` replaces a block's table lookups and products (gemv_row.cu's
# `block_products`) by one XOR of its words: what is left is the loads, the waits and the
# bookkeeping (the check fails, as it must).
PRODUCTS = "    mma(d, PAIR0(ax)"
NO_MATH = "    d[0] = __uint_as_float((ax ^ bx ^ ay ^ by) & 0x3F800000u);\n"


def source(cfg: dict) -> str:
    text = "".join(f"#define {a} {v}u\n" for a, v in cfg.items() if a != "ablate")
    for f in ("gemv_common.cuh", "gemv_row.cu"):
        text += open(os.path.join(KERNELS, f)).read()
    if cfg["ablate"].get("notable"):
        # The pair table is not built: what the cube's prologue costs. The results are wrong
        # (unless a previous cube left a table in the same shared memory).
        table_store = "        sts128(tbase + 16u * q, U32x4{p, p, p, p});"
        assert table_store in text
        text = text.replace(table_store, "        (void)p;")
    if cfg["ablate"].get("nomath"):
        lines = text.split("\n")
        at = next(i for i, line in enumerate(lines) if line.startswith(PRODUCTS))
        lines[at:at + 4] = [NO_MATH.rstrip("\n")]
        text = "\n".join(lines)
    return text


class Weight:
    """A random NF4 weight [n, k] on the GPU in the kernel's layout, and its float64 value."""

    def __init__(self, k: int, n: int, rng):
        blocks = n * k // 64
        q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
        packed = (q[:, 0::2] << 4) | q[:, 1::2]  # even element in the high nibble
        self.words = cp.asarray(packed.reshape(-1).view(np.uint32))
        codes = rng.integers(0, 256, size=blocks + (-blocks) % 4, dtype=np.uint8)
        self.scale_words = cp.asarray(codes.view(np.uint32))
        self.absmax = cp.asarray(rng.uniform(0.5, 1.5, size=-(-blocks // NBS)).astype(np.float32))
        self.scale_map = cp.asarray(np.linspace(-1, 1, 256, dtype=np.float32))
        code = np.linspace(-1, 1, 16, dtype=np.float32)
        code[7] = 0
        self.code = cp.asarray(code)
        self.offset = np.float32(0.0625)
        # The reference: the kernel's table holds 16-bit code values.
        value = code.astype(np.float16).astype(np.float64)
        scale = (
            cp.asnumpy(self.scale_map)[codes[:blocks]].astype(np.float32)
            * np.repeat(cp.asnumpy(self.absmax), NBS)[:blocks]
            + self.offset
        ).astype(np.float64)
        self.dense = cp.asarray(value[q] * np.repeat(scale.reshape(n, k // 64), 64, axis=1))
        self.bytes = self.words.nbytes + blocks  # packed weight + 8-bit scale codes

    def copy(self):
        other = object.__new__(Weight)
        other.__dict__.update(self.__dict__)
        other.words = self.words.copy()
        other.scale_words = self.scale_words.copy()
        return other


def scalars(offset) -> np.uint64:
    return np.uint64(int(np.float32(offset).view(np.uint32)))


def launcher(kernel, cfg, w: Weight, x, out):
    args = (x, w.words, w.absmax, w.scale_words, w.scale_map, w.code, out, scalars(w.offset))
    cubes = -(-(cfg["N"] // 16) // cfg["TPC"])
    return lambda: kernel((cubes,), (cfg["NW"] * 32,), args, shared_mem=cfg["DYN"])


def time_graph(fns, reps: int) -> float:
    """Median µs per launch of a graph replaying `fns` once each."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for f in fns:
            f()
        stream.synchronize()
        stream.begin_capture()
        for f in fns:
            f()
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(stream)
        graph.launch(stream)
        e1.record(stream)
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1) * 1000 / len(fns))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES_4B))
    ap.add_argument("--configs", default="plan,s2,s4")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--ncu", action="store_true", help="one launch each, no graphs")
    ap.add_argument("--hot", action="store_true", help="also time with the weight in L2")
    a = ap.parse_args()
    dev = cp.cuda.Device()
    sms = dev.attributes["MultiProcessorCount"]
    l2 = dev.attributes["L2CacheSize"]
    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: {sms} SMs, L2 {l2 >> 20} MiB")
    rng = np.random.default_rng(5)
    reader = cp.RawKernel(READ_SOURCE, "read_floor")
    flag = cp.zeros(1, dtype=np.uint32)
    rows = []
    for shape in a.shapes.split(","):
        k, n = map(int, shape.split("x"))
        w = Weight(k, n, rng)
        x = cp.asarray(rng.uniform(-1, 1, size=k).astype(np.float16))
        ref = w.dense @ x.astype(cp.float64)
        copies = 1 if a.ncu else max(2, math.ceil(3 * l2 / w.bytes))
        ws = [w] + [w.copy() for _ in range(copies - 1)]
        outs = [cp.empty(n, dtype=np.uint16) for _ in ws]
        line = {"shape": f"{k}->{n}", "MB": w.bytes / 1e6}
        for name in a.configs.split(","):
            cfg = config(name, k, n)
            kernel = cp.RawKernel(source(cfg), "nf4_gemv_row")
            kernel.max_dynamic_shared_size_bytes = cfg["DYN"]
            out = outs[0]
            out.fill(0x7E00)  # NaN: every element must be written
            launcher(kernel, cfg, w, x, out)()
            got = out.view(cp.float16).astype(cp.float64)
            err = float(cp.linalg.norm(got - ref) / cp.linalg.norm(ref))
            ok = err <= 1e-3 and not bool(cp.isnan(got).any())
            if a.ncu:
                for _ in range(5):  # ncu profiles each launch: a median over 5 + the check
                    launcher(kernel, cfg, w, x, out)()
                cp.cuda.Device().synchronize()
                us = float("nan")
            else:
                fns = [launcher(kernel, cfg, wi, x, o) for wi, o in zip(ws, outs)]
                us = time_graph(fns, a.reps)
                # After hundreds of calls, the first output is still right.
                again = outs[0].view(cp.float16).astype(cp.float64)
                if float(cp.linalg.norm(again - ref) / cp.linalg.norm(ref)) > 1e-3:
                    print(f"{k}->{n} {name}: wrong after repeated calls")
                    ok = False
                if a.hot:  # the same weight every launch: it stays in L2
                    hot = time_graph([launcher(kernel, cfg, w, x, out)] * len(ws), a.reps)
                    line[name + " hot"] = hot
            names = ("NW", "BPW", "TPC", "MINB", "STAGES")
            desc = ",".join(f"{p}={cfg[p]}" for p in names if p in cfg)
            hot = f" (L2-hot {line[name + ' hot']:.2f} us)" if a.hot and not a.ncu else ""
            print(f"{k}->{n} {name:10s} {desc}: err {err:.2e} {'ok' if ok else 'FAILED'} "
                  f"{us:7.2f} us {w.bytes / us / 1e3:7.0f} GB/s regs {kernel.num_regs}{hot}")
            line[name] = us
        # The read floor and the copy of the same bytes (words + scale codes, as one buffer each).
        nbytes = (w.bytes + 15) // 16 * 16
        bufs = [cp.empty(nbytes, dtype=np.uint8) for _ in ws]
        for b in bufs:
            b[:] = cp.asarray(rng.integers(0, 256, size=nbytes, dtype=np.uint8))
        n16 = nbytes // 16
        for blocks_per_sm in (4, 8):
            grid = sms * blocks_per_sm
            fns = [
                (lambda b=b, grid=grid: reader((grid,), (256,), (b, np.uint32(n16), flag)))
                for b in bufs
            ]
            us = float("nan") if a.ncu else time_graph(fns, a.reps)
            if a.ncu:
                fns[0]()
            print(f"{k}->{n} read {grid:5d}x256: {us:7.2f} us {nbytes / us / 1e3:7.0f} GB/s")
            line[f"read{blocks_per_sm}"] = us
        dsts = [cp.empty_like(b) for b in bufs]
        fns = [
            (lambda s=s, d=d: d.data.copy_from_device_async(s.data, nbytes))
            for s, d in zip(bufs, dsts)
        ]
        if not a.ncu:
            us = time_graph(fns, a.reps)
            print(f"{k}->{n} copy: {us:7.2f} us {2 * nbytes / us / 1e3:7.0f} GB/s (read + write)")
            line["copy"] = us
        rows.append(line)
        del ws, outs, bufs, dsts
        cp.get_default_memory_pool().free_all_blocks()
    if a.ncu:
        return
    print("\nus per launch (graph of launches over copies, cold weights); GB/s = weight bytes / time")
    keys = [c for c in a.configs.split(",")] + ["read4", "read8", "copy"]
    if a.hot:
        keys += [c + " hot" for c in a.configs.split(",")]
    print("| in->out | MB | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for r in rows:
        print(f"| {r['shape']} | {r['MB']:.2f} | "
              + " | ".join(f"{r[c]:.2f} ({r['MB'] * 1e3 / r[c] * (2 if c == 'copy' else 1):.0f})"
                           for c in keys) + " |")


if __name__ == "__main__":
    main()
