"""Side by side on one GPU, in one call: our `bench generate` and HF `generate` (+ bitsandbytes
for NF4) on the 4B architecture with random weights; prints a table with the ratios.

Usage: python3 bench_generate.py BINARY CONFIG_JSON [--batches 1,8] [--new-tokens 64]
       [--variants bf16,nf4] [--timeout 500]
A variant ending in "-ops" runs ours only, with QWEN3VL_LAYER_KERNELS=0 (the decoder's tensor ops
instead of the fused layer kernels), e.g. --variants bf16,bf16-ops; one ending in "-apart" runs
ours only with QWEN3VL_FUSE_PROJECTIONS=0 (q/k/v and gate/up as separate matmuls).
"""
import argparse
import json
import os
import subprocess
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("binary")
p.add_argument("config")
p.add_argument("--batches", default="1,8")
p.add_argument("--new-tokens", type=int, default=64)
p.add_argument("--variants", default="bf16,nf4")
p.add_argument("--timeout", type=int, default=500)
p.add_argument("--skip-hf", action="store_true")
a = p.parse_args()
here = os.path.dirname(os.path.abspath(__file__))


def run(cmd, timeout, env=None):
    t = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        print(f"TIMEOUT after {timeout} s: {' '.join(cmd)}", flush=True)
        print(((e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""))[-2000:])
        return []
    print(f"[{time.time() - t:.0f} s] {' '.join(cmd[:3])}...", flush=True)
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-3000:], flush=True)
    sys.stderr.write(r.stderr[-1500:])
    return [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]


rows = {}
for v in a.variants.split(","):
    switches = {"-ops": "QWEN3VL_LAYER_KERNELS", "-apart": "QWEN3VL_FUSE_PROJECTIONS"}
    off = [var for suffix, var in switches.items() if v.endswith(suffix)]
    base = v.removesuffix("-ops").removesuffix("-apart")
    ops = bool(off)
    cmd = [a.binary, "bench", "generate", "--model", a.config, "--batch", a.batches,
           "--new-tokens", str(a.new_tokens), "--dtype", "bf16"] + (["--nf4"] if base == "nf4" else [])
    env = dict(os.environ, **{var: "0" for var in off}) if ops else None
    for r in run(cmd, a.timeout, env):
        rows[("ours", v, r["batch"])] = r
    if not a.skip_hf and not ops:
        cmd = [sys.executable, os.path.join(here, "hf_generate_4b.py"), a.config, v, a.batches,
               str(a.new_tokens)]
        for r in run(cmd, a.timeout):
            rows[("hf", v, r["batch"])] = r

print(f"\n{'variant':8} {'batch':>5} | {'ours prefill ms':>15} {'ours tok/s':>10} | "
      f"{'HF prefill ms':>13} {'HF tok/s':>9} | {'decode x':>8}")
for v in a.variants.split(","):
    for b in [int(x) for x in a.batches.split(",")]:
        o, h = rows.get(("ours", v, b)), rows.get(("hf", v.removesuffix("-ops").removesuffix("-apart"), b))
        f = lambda r, k, s=1: f"{r[k] * s:.1f}" if r else "-"
        ratio = f"{o['decode_tokens_per_s'] / h['decode_tokens_per_s']:.2f}" if o and h else "-"
        print(f"{v:8} {b:>5} | {f(o, 'prefill_s', 1e3):>15} {f(o, 'decode_tokens_per_s'):>10} | "
              f"{f(h, 'prefill_s', 1e3):>13} {f(h, 'decode_tokens_per_s'):>9} | {ratio:>8}")
