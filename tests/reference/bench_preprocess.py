#!/usr/bin/env python3
"""Benchmark: 640x480 JPEG -> 288x288 Qwen3-VL patches, ours vs HF, same machine, same run.

Writes 32 deterministic 640x480 JPEGs to a temp folder, runs
`qwen3-vl-moelora data bench --images DIR --resize 288x288`, then times HF on the same files:
PIL decode (transformers.image_utils.load_image) + torchvision uint8 antialiased bicubic resize
to 288x288 + Qwen2VLImageProcessor (normalise, patchify), one image at a time, best of 3 passes.

Usage: python3 bench_preprocess.py BINARY   (needs torch, torchvision, transformers, pillow)
"""
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from PIL import Image
from transformers.image_utils import load_image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor


def main():
    binary = sys.argv[1]
    tmp = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    for i in range(32):
        base = np.stack([128 + 100 * np.sin(x / (7 + i) + y / 13), 128 + 100 * np.cos(y / (5 + i)),
                         (x * y) % 256], -1)
        arr = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(tmp, f"{i:03d}.jpg"), quality=90)
    files = sorted(os.path.join(tmp, f) for f in os.listdir(tmp))
    ours = subprocess.run([binary, "data", "bench", "--images", tmp, "--resize", "288x288"],
                          capture_output=True, text=True, check=True).stdout.strip()
    print(ours)
    proc = Qwen2VLImageProcessor(size={"shortest_edge": 65536, "longest_edge": 16777216},
                                 patch_size=16, temporal_patch_size=2, merge_size=2,
                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)

    def one(path):
        img = load_image(path)
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
        t = tvF.resize(t, [288, 288], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        return proc(images=[t], return_tensors="pt")["pixel_values"]

    for f in files:
        one(f)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for f in files:
            one(f)
        best = max(best, len(files) / (time.perf_counter() - t))
    print(f"HF (PIL decode + torchvision resize + Qwen2VLImageProcessor, torch threads "
          f"{torch.get_num_threads()}): {best:.1f} images/s")
    ours_rate = float(ours.split(" images/s on 1 thread")[0].split()[-1])
    ours_all = float(ours.split(", ")[-1].split()[0])
    print(f"ratio ours/HF: {ours_rate / best:.2f}x on 1 thread, {ours_all / best:.2f}x on all threads")


if __name__ == "__main__":
    main()
