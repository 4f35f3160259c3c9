"""HF transformers (+ bitsandbytes) `generate` benchmark: prefill time and decode tokens/s.

Builds Qwen3-VL from a config.json with random weights, prompts like our `bench generate`
(120 tokens: text, <vision_start>, 81 image pads of one 18x18-patch image, <vision_end>, text),
greedy, no stop token. Time to first token = generate(max_new_tokens=1); decode tokens/s =
B·(N−1) / (time of N tokens − time to first token). Median of 3 after a warm-up. One JSON line
per batch size.

Usage: python3 hf_generate_4b.py CONFIG_JSON VARIANT BATCHES NEW_TOKENS
VARIANT: bf16 | nf4 (bitsandbytes NF4 + double quant, bf16 compute)
"""
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

config_path, variant = sys.argv[1], sys.argv[2]
batches = [int(b) for b in sys.argv[3].split(",")]
new_tokens = int(sys.argv[4])
cfg = Qwen3VLConfig.from_json_file(config_path)
torch.manual_seed(0)
if variant == "nf4":
    from transformers import BitsAndBytesConfig
    folder = os.path.join(tempfile.gettempdir(), "qwen3-vl-random-bf16")
    if not os.path.exists(os.path.join(folder, "config.json")):
        Qwen3VLForConditionalGeneration(cfg).to(torch.bfloat16).save_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        folder, quantization_config=quant, device_map={"": 0}, dtype=torch.bfloat16)
else:
    with torch.device("cuda"):
        model = Qwen3VLForConditionalGeneration(cfg).to(torch.bfloat16)
model.eval()

prompt_tokens, n_img = 120, 81
text = prompt_tokens - n_img - 2
vocab = cfg.text_config.vocab_size


def row(r):
    ids = []
    for i in range(prompt_tokens):
        if i == text // 2:
            ids.append(cfg.vision_start_token_id)
        elif text // 2 < i <= text // 2 + n_img:
            ids.append(cfg.image_token_id)
        elif i == text // 2 + n_img + 1:
            ids.append(cfg.vision_end_token_id)
        else:
            ids.append((1000 + 7919 * (r * prompt_tokens + i)) % (vocab // 2))
    return ids


def timed(inputs, n):
    gen = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                           pad_token_id=0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=gen)
    torch.cuda.synchronize()
    assert out.shape[1] == prompt_tokens + n, out.shape
    return time.perf_counter() - t


for b in batches:
    ids = torch.tensor([row(r) for r in range(b)], device="cuda")
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  mm_token_type_ids=(ids == cfg.image_token_id).int(),
                  pixel_values=torch.rand(b * 324, 3 * 2 * 16 * 16, device="cuda",
                                          dtype=torch.bfloat16) * 2 - 1,
                  image_grid_thw=torch.tensor([[1, 18, 18]] * b, device="cuda"))
    timed(inputs, new_tokens)  # warm-up
    firsts, totals = [], []
    for _ in range(3):
        firsts.append(timed(inputs, 1))
        totals.append(timed(inputs, new_tokens))
    first, total = statistics.median(firsts), statistics.median(totals)
    print(json.dumps({"impl": "hf", "variant": variant, "batch": b, "prompt_tokens": prompt_tokens,
                      "new_tokens": new_tokens, "prefill_s": first,
                      "decode_tokens_per_s": b * (new_tokens - 1) / (total - first),
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30}), flush=True)
