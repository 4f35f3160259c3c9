#!/usr/bin/env python3
"""Write timing inputs for the 4B architecture: one 288x288 image (grid 1x18x18 = 324 patch
rows, 81 image tokens) inside 40 text tokens, as the `forward` command reads them.

Usage: make_4b_inputs.py OUT.safetensors   (needs numpy and safetensors)
"""
import sys

import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(0)
text = rng.integers(0, 151000, 40)
ids = np.concatenate([text[:5], [151652], np.full(81, 151655), [151653], text[5:38]])
assert len(ids) == 40 + 81
save_file({
    "input_ids": ids.astype(np.int64)[None, :],
    "pixel_values": rng.standard_normal((324, 1536)).astype(np.float32),
    "image_grid_thw": np.array([[1, 18, 18]], dtype=np.int64),
}, sys.argv[1])
