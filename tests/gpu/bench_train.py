"""Side-by-side training-step benchmark on one GPU: our `bench train` and HF transformers + peft
(tests/gpu/hf_train_4b.py) on the same workload, one after the other in the same call.

Each job runs in its own process while a thread samples nvidia-smi's used memory every 100 ms;
"peak GiB" is the highest reading minus the reading before the job started (CUDA context and
allocator pools included, the same way for both). The allocator's own view is printed too:
torch's peak allocated / reserved for HF, and for ours the live tensors (max between
micro-batches) / the pools' reservation from `bench train`'s probe.

Usage: python3 tests/gpu/bench_train.py BINARY JOB... [--steps N] [--warmup N] [--timeout S] [--memcap MIB]
--warmup: our untimed steps (HF's script always does 2); --memcap: run ours as if the GPU had MIB
of memory (tests/gpu/memcap.sh: pools sized for that card, allocations past it refused).
JOB: ours[@MIB][~VAR=VALUE...]:EXPERIMENT[:key=value,...]   e.g. ours:experiments/qwen3-vl-4b-lora.toml
     hf:VARIANT                        bf16 | bf16-ckpt | f16-ckpt | nf4 (hf_train_4b.py lists all)
ours@MIB: this job alone under a MIB memory cap (as --memcap); ~VAR=VALUE: an environment
variable for this job alone (e.g. ours~QWEN3VL_ROUTING_KERNELS=0:...).
The 4B config is model/configs/qwen3-vl-4b-instruct.json for both.
"""
import json
import os
import subprocess
import sys
import threading
import time

CONFIG = "model/configs/qwen3-vl-4b-instruct.json"


def used_mib():
    # The first visible GPU (CUDA_VISIBLE_DEVICES picks it when several jobs share a host).
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=memory.used",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
    return int(out.split()[0])


def run(cmd, timeout, env=None):
    base = used_mib()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], used_mib())
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, **(env or {})))
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode() if isinstance(b, bytes) else (b or "")
        out, rc = text(e.stdout) + text(e.stderr), "timeout"
    except OSError as e:
        out, rc = str(e), "not started"
    finally:
        done.set()
        t.join()
    wall = time.time() - start
    result = None
    for line in out.splitlines():
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                pass
    if result is None:
        print(f"--- {' '.join(cmd)} (rc {rc}, {wall:.0f} s) gave no result; output tail:")
        print("\n".join(out.splitlines()[-25:]))
        return None
    result["peak_gib"] = (peak[0] - base) / 1024
    result["memcap"] = next((l for l in reversed(out.splitlines()) if l.startswith("memcap:")), None)
    # QWEN3VL_PROFILE=1's phase lines (the last few steps).
    profile = [l for l in out.splitlines() if l.startswith("profile ")]
    if profile:
        result["profile"] = profile[-4:]
    # Our per-step loss and gradient norm (same seed: equal across variants of the step).
    steps = [l for l in out.splitlines() if l.startswith("bench step ")]
    if steps:
        result["steps"] = [l[len("bench step "):] for l in steps]
    result["wall_s"] = wall
    return result


def option(args, name, default):
    """Removes `name VALUE` from `args` and returns VALUE (`default` when absent)."""
    if name not in args:
        return default
    i = args.index(name)
    value = args[i + 1]
    del args[i:i + 2]
    return value


def allocator_gib(r):
    """The allocator's 'live / reserved' GiB of a job's result: torch's peak allocated /
    reserved for HF, our probe's live tensors / pool reservation for ours; '' when unknown."""
    if "torch_peak_allocated_gib" in r:
        return f"{r['torch_peak_allocated_gib']:.2f} / {r['torch_peak_reserved_gib']:.2f}"
    if r.get("in_use_mib") is not None:
        return f"{r['in_use_mib'] / 1024:.2f} / {r['reserved_mib'] / 1024:.2f}"
    return ""


def main():
    args = sys.argv[1:]
    steps, warmup = option(args, "--steps", "5"), option(args, "--warmup", "2")
    timeout, memcap = int(option(args, "--timeout", "540")), option(args, "--memcap", None)
    binary, jobs = args[0], args[1:]
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
    rows = []
    if any(j.startswith("hf:nf4") for j in jobs):  # the random checkpoint, outside the timing
        t = time.time()
        subprocess.run([sys.executable, "tests/gpu/hf_train_4b.py", CONFIG, "prepare"], timeout=timeout)
        print(f"random f16 checkpoint for bitsandbytes ready after {time.time() - t:.0f} s", flush=True)
    for job in jobs:
        kind, _, spec = job.partition(":")
        kind, *env = kind.split("~")
        env = dict(e.split("=", 1) for e in env)
        kind, _, job_cap = kind.partition("@")
        if kind == "ours":
            exp, _, sets = spec.partition(":")
            cmd = [binary, "bench", "train", "--config", exp, "--model", CONFIG, "--random-weights",
                   "--steps", steps, "--warmup", warmup, "--device", "cuda"]
            if job_cap or memcap:
                cmd = ["tests/gpu/memcap.sh", job_cap or memcap] + cmd
            for s in filter(None, sets.split(",")):
                cmd += ["--set", s]
        else:
            cmd = [sys.executable, "tests/gpu/hf_train_4b.py", CONFIG, spec, steps]
        r = run(cmd, timeout, env)
        print(job, json.dumps(r), flush=True)
        if r:
            rows.append((job, r))
    hf = [r["samples_per_s"] for j, r in rows if j.startswith("hf:")]
    best_hf = max(hf) if hf else None
    print("\n| job | samples/s | tokens/s | s/step (median) | peak GiB (nvidia-smi) | allocator live / reserved GiB | vs best HF |")
    print("|---|---|---|---|---|---|---|")
    for job, r in rows:
        ratio = f"{r['samples_per_s'] / best_hf:.2f}x" if best_hf else ""
        print(f"| {job} | {r['samples_per_s']:.3f} | {r['tokens_per_s']:.0f} | {r['step_s_median']:.3f} "
              f"| {r['peak_gib']:.2f} | {allocator_gib(r)} | {ratio} |")


if __name__ == "__main__":
    main()
