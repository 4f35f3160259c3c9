"""GPU check of data-parallel training (`train --devices`, a build with the `ddp` feature) on a
machine with at least two CUDA devices.

Three runs of the same small MoE-LoRA experiment (demo architecture, random frozen base, 40
synthetic samples, dropout off so the runs differ only in how the work is spread), same seed,
same global batch of 4 samples per optimizer step:
  one   -- cuda:0, batch 2 x grad_accum 2
  two   -- cuda:0,cuda:1, batch 2 x grad_accum 1 per device (burn-train's DDP strategy)
  back  -- a copy of `two` cut back to its step-10 checkpoint, resumed on cuda:0 alone (the
           per-device accumulation becomes 2 to keep the checkpoint's global batch)
and compares their per-step losses and gradient norms from metrics.csv.

Usage: python3 tests/gpu/ddp_check.py BINARY WORK_DIR
libnccl.so must be loadable (the torch wheel's nvidia/nccl/lib/libnccl.so.2 linked as
libnccl.so on LD_LIBRARY_PATH).
"""
import csv
import os
import shutil
import subprocess
import sys
import time

# Differences from the shared template: dropout off (the runs may differ only in how the
# work is spread), 2 epochs, every checkpoint kept (the resume run cuts back to step 10).
OVERRIDES = ["adapter.dropout=0.0", "adapter.router_dropout=0.0", "train.epochs=2",
             "train.keep_last=10"]


def run(binary, args, log):
    start = time.time()
    p = subprocess.run([binary, "train", "--plain"] + args, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(p.stdout + p.stderr)
    print(f"$ train {' '.join(args)}  (rc {p.returncode}, {time.time() - start:.0f} s)")
    for line in (p.stdout + p.stderr).splitlines():
        if any(k in line for k in ("device", "data-parallel", "resuming", "error", "panick")):
            print("   ", line[:300])
    return p.returncode


def rows(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def compare(name, a, b, steps):
    worst = {"loss": 0.0, "grad_norm": 0.0}
    for s in steps:
        for k in worst:
            x, y = float(a[s][k]), float(b[s][k])
            worst[k] = max(worst[k], abs(x - y) / max(abs(y), 1e-12))
    print(f"{name}: steps {steps[0]}..{steps[-1]}: max rel. difference loss {worst['loss']:.2e}, "
          f"grad norm {worst['grad_norm']:.2e}")
    return worst


def main():
    binary, work = sys.argv[1], os.path.abspath(sys.argv[2])
    os.makedirs(work, exist_ok=True)
    with open("tests/small-moelora.toml") as f:
        template = f.read()
    exp = os.path.join(work, "exp.toml")
    with open(exp, "w") as f:
        f.write(template.replace("@ROOT@", os.path.abspath(".")).replace("@WORK@", work))
    sets = [a for s in OVERRIDES for a in ("--set", s)]
    one, two, back = (os.path.join(work, n) for n in ("one", "two", "back"))
    rc = run(binary, ["--config", exp, "--device", "cuda:0", "--output-dir", one] + sets,
             one + ".log")
    rc |= run(binary, ["--config", exp, "--devices", "cuda:0,cuda:1", "--set",
                       "train.grad_accum=1", "--output-dir", two] + sets, two + ".log")
    if rc:
        print("a run failed; logs:", one + ".log", two + ".log")
        sys.exit(1)
    shutil.copytree(two, back)
    for d in os.listdir(os.path.join(back, "checkpoints")):
        if int(d.split("-")[1]) > 10:
            shutil.rmtree(os.path.join(back, "checkpoints", d))
    rc = run(binary, ["--resume", back, "--device", "cuda:0"], back + ".log")
    r1, r2, r3 = rows(one), rows(two), rows(back)
    steps = sorted(r1)
    print(f"{len(steps)} optimizer steps; losses step 1 / last: one {float(r1[1]['loss']):.6f} / "
          f"{float(r1[steps[-1]]['loss']):.6f}, two {float(r2[1]['loss']):.6f} / "
          f"{float(r2[steps[-1]]['loss']):.6f}")
    a = compare("2 devices x accum 1 vs 1 device x accum 2", r2, r1, steps)
    b = compare("resumed on 1 device vs uninterrupted 2 devices", r3, r2,
                [s for s in steps if s > 10]) if rc == 0 else None
    ok = sorted(r2) == steps and a["loss"] < 1e-4 and (b is not None and b["loss"] < 1e-4)
    print("DDP check", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
