#!/usr/bin/env python3
"""Compare two safetensors files of model outputs tensor by tensor.

Usage: compare_outputs.py GOT.safetensors WANT.safetensors [--mask INPUTS.safetensors]

Prints, for every tensor in WANT, max|got - want| / max|want| (integers: equal or not). With
--mask, tensors shaped [B, T, ...] (logits, hidden_states_*) are compared only where the
attention_mask of INPUTS is 1.
"""
import sys

import numpy as np
from safetensors.numpy import load_file


def main():
    args = sys.argv[1:]
    mask = None
    if "--mask" in args:
        i = args.index("--mask")
        mask = load_file(args[i + 1])["attention_mask"].astype(bool)
        del args[i:i + 2]
    got, want = load_file(args[0]), load_file(args[1])
    worst = 0.0
    for name in sorted(want):
        if name not in got:
            print(f"{name:24s} MISSING")
            continue
        g, w = got[name], want[name]
        if g.shape != w.shape:
            print(f"{name:24s} shape {g.shape} != {w.shape}")
            continue
        if w.dtype.kind in "iu":
            print(f"{name:24s} {'equal' if (g == w).all() else 'DIFFERENT'}")
            continue
        if mask is not None and w.shape[:2] == mask.shape:
            g, w = g[mask], w[mask]
        g, w = g.astype(np.float64), w.astype(np.float64)
        rel = np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)
        worst = max(worst, rel)
        print(f"{name:24s} max rel err {rel:.3e}")
    print(f"worst {worst:.3e}")


if __name__ == "__main__":
    main()
