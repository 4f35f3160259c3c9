#!/usr/bin/env python3
"""HF transformers baseline for the `forward` timing: the 4B architecture with random bf16
weights on CUDA, same inputs file, warm-up then the median of 10 forwards.

Usage: hf_forward_4b.py INPUTS.safetensors [eager|sdpa]
"""
import statistics
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

attn = sys.argv[2] if len(sys.argv) > 2 else "sdpa"
cfg = Qwen3VLConfig.from_json_file("model/configs/qwen3-vl-4b-instruct.json")
cfg._attn_implementation = attn
with torch.device("cuda"):
    model = Qwen3VLForConditionalGeneration(cfg).to(torch.bfloat16).eval()
inp = {k: v.cuda() for k, v in load_file(sys.argv[1]).items()}
ids = inp["input_ids"]
mm = (ids == cfg.image_token_id).long()
times = []
with torch.no_grad():
    for i in range(13):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(input_ids=ids, pixel_values=inp["pixel_values"].to(torch.bfloat16),
              image_grid_thw=inp["image_grid_thw"], mm_token_type_ids=mm)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
print(f"HF transformers {__import__('transformers').__version__} bf16 {attn}: median of 10 forwards "
      f"{statistics.median(times) * 1e3:.2f} ms (min {min(times) * 1e3:.2f} ms)")
