"""The issue-8 table in one call: our `bench train` and HF transformers + peft + bitsandbytes on
the 4B reference workload, LoRA and MoE-LoRA, gradient checkpointing on and off, batch 1 x 8 and
8 x 1 (per-sample loss), spread over the host's GPUs, merged into one table with ratios.

Usage (repository root, on the GPU machine):
  python3 tests/gpu/train_table.py BINARY [--gpus N] [--steps 3] [--warmup 1] [--deadline 560]
                                   [--kernel-cache DIR] [--pack OUT] [--only ours|hf]
                                   [--chains "JOB JOB;JOB ..."] [--reuse]
Each GPU runs one chain of tests/gpu/bench_train.py jobs in its own copy of the repository
(our jobs of one adapter share a copy, so after the first one the kernels are compiled);
--kernel-cache unpacks tests/gpu/kernel_cache.sh pieces into every copy first (DIR/gN for GPU N
when that folder exists, else DIR), --pack writes each GPU's cache to OUT/gN afterwards.
--chains replaces the built-in chains (bench_train.py's JOB syntax, `ours@MIB:...` for a memory
cap); a job may be named more than once (repeats for the spread: each gets its own row, and a
repeated HF job's median run is the reference of the ratios). --reuse keeps an earlier call's copies' target/ (the kernel caches of a machine still
warm: its jobs start compiled) and HF's random checkpoint. Chains still running at --deadline seconds are
stopped and the table shows what finished. Ratios: each of our jobs against HF's job with the
same targets and checkpointing (LoRA vs `nf4`, MoE-LoRA vs `nf4-all`, peft's LoRA r16 on the same
7 targets: peft has no MoE-LoRA).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from bench_train import allocator_gib, option  # tests/gpu/ is this script's own folder

LORA, MOE = "experiments/qwen3-vl-4b-lora.toml", "experiments/qwen3-vl-4b-moelora.toml"
NOCKPT = "train.gradient_checkpointing=false"
OPS = "train.gradient_checkpointing=ops"  # burn's balanced checkpointing (the files say layers)
BATCH8 = "train.batch_size=8,train.grad_accum=1,train.loss_average=samples"


def ours(exp, *sets):
    return f"ours:{exp}:" + ",".join(sets) if sets else f"ours:{exp}"


# Chains in priority order; with fewer GPUs than chains, later chains join earlier GPUs' lists.
CHAINS = [
    [ours(MOE, BATCH8), ours(MOE)],
    [ours(LORA, BATCH8), ours(LORA)],
    ["hf:nf4", "hf:nf4-all", "hf:nf4-nockpt", "hf:nf4-all-nockpt"],
    [ours(MOE, NOCKPT, BATCH8), ours(MOE, NOCKPT)],
    [ours(MOE, OPS, BATCH8), ours(LORA, OPS, BATCH8)],
    [ours(LORA, NOCKPT, BATCH8), ours(LORA, NOCKPT)],
]


def describe(job):
    """(adapter, checkpointing: off | layers | ops, batch) of a job name."""
    if job.startswith("hf:"):
        flags = job[3:].split("-")
        ckpt = "off" if "nockpt" in flags else "layers"
        return ("moelora" if "all" in flags else "lora", ckpt, "1 x 8")
    adapter = "moelora" if "moelora" in job else "lora"
    ckpt = "off" if NOCKPT in job else "ops" if OPS in job else "layers"
    return (adapter, ckpt, "8 x 1" if "batch_size=8" in job else "1 x 8")


def job_results(lines, jobs, gpu):
    """Each job's JSON results in `lines` of a bench_train.py log, in order (a job named
    twice in a chain has two); failure lines are printed with the GPU's number."""
    out = {}
    for line in lines:
        job, _, rest = line.partition(" ")
        if job in jobs and rest.startswith("{"):
            out.setdefault(job, []).append(json.loads(rest))
        elif line.startswith("---") or "panicked" in line:
            print(f"GPU {gpu}: {line.rstrip()[:300]}")
    return out


def median_run(runs):
    """The run with the median samples/s (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["samples_per_s"])[(len(runs) - 1) // 2]


def main():
    args = sys.argv[1:]
    gpus = int(option(args, "--gpus", "0")) or len(
        subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.splitlines())
    steps, warmup = option(args, "--steps", "3"), option(args, "--warmup", "1")
    deadline = float(option(args, "--deadline", "560"))
    cache, pack, only = option(args, "--kernel-cache", None), option(args, "--pack", None), \
        option(args, "--only", None)
    custom = option(args, "--chains", None)
    reuse = "--reuse" in args
    args = [a for a in args if a != "--reuse"]
    binary = os.path.abspath(args[0])
    root = os.getcwd()
    chains = [c.split() for c in custom.split(";")] if custom else CHAINS
    chains = [[j for j in c if only is None or j.startswith(only)] for c in chains]
    chains = [c for c in chains if c]
    per_gpu = [[] for _ in range(min(gpus, len(chains)))]
    for i, chain in enumerate(chains):
        per_gpu[i % len(per_gpu)].append(chain)
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader", "-i", "0"],
                         capture_output=True, text=True).stdout.strip(), flush=True)
    start = time.time()
    procs = []
    for g, gpu_chains in enumerate(per_gpu):
        jobs = [j for c in gpu_chains for j in c]
        work = f"/tmp/train-table-{g}"
        kept = os.path.join(work, "target")
        if reuse and os.path.isdir(kept):
            for item in os.listdir(work):
                if item not in ("target", "qwen3-vl-random-f16"):
                    path = os.path.join(work, item)
                    (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
        else:
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
        # A Cargo.toml makes ./target CubeCL's cache root (else ~/.cache/cubecl, shared).
        for item in ["Cargo.toml", "cubecl.toml", "experiments", "model", "tests"]:
            src = os.path.join(root, item)
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(work, item))
        if cache:
            own = os.path.join(cache, f"g{g}")
            subprocess.run(["tests/gpu/kernel_cache.sh", "unpack",
                            os.path.abspath(own if os.path.isdir(own) else cache)],
                           cwd=work, check=False)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(g),
                   CUDA_CACHE_PATH=os.path.join(work, "target", "nvcache"), TMPDIR=work)
        log = open(os.path.join(work, "bench.log"), "w")
        cmd = [sys.executable, "tests/gpu/bench_train.py", binary, *jobs, "--steps", steps,
               "--warmup", warmup, "--timeout", str(int(deadline))]
        procs.append((g, jobs, work, subprocess.Popen(cmd, cwd=work, env=env, stdout=log,
                                                      stderr=subprocess.STDOUT,
                                                      start_new_session=True)))
        print(f"GPU {g}: {' '.join(jobs)}", flush=True)
    for g, jobs, work, p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - (time.time() - start)))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # bench_train.py and the job it runs
            p.wait()
            print(f"GPU {g}: stopped at the deadline", flush=True)
    print(f"all chains done after {time.time() - start:.0f} s", flush=True)

    results = {}  # job -> its results in the order they ran (a job may repeat)
    for g, jobs, work, p in procs:
        for job, r in job_results(open(os.path.join(work, "bench.log")), jobs, g).items():
            results.setdefault(job, []).extend(r)
    for g, jobs, work, p in procs if pack else []:
        if any(j.startswith("ours") for j in jobs):
            subprocess.run(["tests/gpu/kernel_cache.sh", "pack", os.path.abspath(f"{pack}/g{g}")],
                           cwd=work, check=False)

    # HF recomputes layers; ours with either kind of checkpointing is held against that.
    # A repeated HF job counts with the median of its runs.
    hf = {(describe(j)[0], describe(j)[1] != "off"): median_run(rs)
          for j, rs in results.items() if j.startswith("hf:") and rs}
    print("\n| who | adapter | ckpt | batch | samples/s | s/step | peak GiB (nvidia-smi) "
          "| live / reserved GiB | vs HF (same targets, ckpt) |")
    print("|---|---|---|---|---|---|---|---|---|")
    taken = {}
    for job in [j for c in chains for j in c]:
        k = taken[job] = taken.get(job, -1) + 1
        r = results[job][k] if k < len(results.get(job, [])) else None
        adapter, ckpt, batch = describe(job)
        kind, *env = job.split(":")[0].split("~")
        cap = kind.partition("@")[2]
        who = job if job.startswith("hf:") else " ".join(
            ["ours"] + ([f"(cap {cap} MiB)"] if cap else []) + env)
        if r is None:
            print(f"| {who} | {adapter} | {ckpt} | {batch} | no result |||||")
            continue
        mem = allocator_gib(r) + (" (torch)" if "torch_peak_allocated_gib" in r else "")
        ref = hf.get((adapter, ckpt != "off"))
        ratio = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x" \
            if ref and not job.startswith("hf:") else ""
        print(f"| {who} | {adapter} | {ckpt} | {batch} "
              f"| {r['samples_per_s']:.3f} | {r['step_s_median']:.3f} | {r['peak_gib']:.2f} "
              f"| {mem} | {ratio} |")
    for job, rs in results.items():
        for r in rs:
            if r.get("memcap"):
                print(f"{job}: {r['memcap']}")


if __name__ == "__main__":
    main()
