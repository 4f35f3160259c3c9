"""Checks that transformers + bitsandbytes load a checkpoint written by `quantize` and that it
holds exactly what bitsandbytes itself produces when transformers quantizes the original.

Usage: PYTHONPATH=<bitsandbytes> python3 check_bnb_interop.py ORIGINAL_DIR OURS_DIR [cpu|cuda]
Prints each state-dict tensor that differs (with the differing count) and the max logit
difference of the two models on one text input.
"""
import sys

import torch
from transformers import BitsAndBytesConfig, Qwen3VLForConditionalGeneration

src, ours = sys.argv[1], sys.argv[2]
device = sys.argv[3] if len(sys.argv) > 3 else "cpu"
dtype = torch.bfloat16
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float16)
theirs = Qwen3VLForConditionalGeneration.from_pretrained(src, quantization_config=quant,
                                                         device_map={"": device}, dtype=dtype)
mine = Qwen3VLForConditionalGeneration.from_pretrained(ours, device_map={"": device}, dtype=dtype)
a, b = theirs.state_dict(), mine.state_dict()
assert set(a) == set(b), set(a) ^ set(b)
layers = sum(type(m).__name__ == "Linear4bit" for m in mine.modules())
differing = 0
for k in a:
    if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
        differing += 1
        n = (a[k] != b[k]).sum().item() if a[k].shape == b[k].shape else "shape"
        print(f"differs: {k} ({n} of {a[k].numel()})")
ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25]], device=device)
with torch.no_grad():
    la = theirs(input_ids=ids).logits.float()
    lb = mine(input_ids=ids).logits.float()
print(f"{device}: {layers} Linear4bit layers loaded from ours; {len(a)} tensors, {differing} differ; "
      f"max |logit difference| {(la - lb).abs().max().item():.3e}")
