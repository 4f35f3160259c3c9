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
import statistics
import sys
import time

import torch
from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

config_path, variant = sys.argv[1], sys.argv[2]
batches = [int(b) for b in sys.argv[3].split(",")]
new_tokens = int(sys.argv[4])
cfg = Qwen3VLConfig.from_json_file(config_path)
torch.manual_seed(0)
with torch.device("cuda"):
    model = Qwen3VLForConditionalGeneration(cfg).to(torch.bfloat16)
if variant == "nf4":
    # Every linear layer of the decoder and the vision tower becomes a bitsandbytes Linear4bit
    # (NF4, double quant, bf16 compute) quantized on the GPU, as `load_in_4bit` does; lm_head and
    # embeddings stay bf16. (Saving and reloading the random 8 GB model takes minutes.)
    import bitsandbytes as bnb

    def quantize(module):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                      bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, name, q.cuda())
            else:
                quantize(child)

    quantize(model)
    print(f"nf4: {sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())} Linear4bit",
          file=sys.stderr)
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
