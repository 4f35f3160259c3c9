"""HF transformers + peft (+ bitsandbytes) training-step benchmark on the reference workload.

Builds the Qwen3-VL architecture from a config.json with random weights (speed does not depend
on the values), one 288x288 image (18x18 patches, 81 image tokens) and 120 tokens per sample,
batch 1 x gradient accumulation 8, LoRA r=8 alpha=16 on q/k/v/o, AdamW; prints one JSON line.

Usage: python3 hf_train_4b.py CONFIG_JSON VARIANT [STEPS]
VARIANT: prepare (write the random checkpoint only) | bf16 | bf16-ckpt | f16-ckpt | nf4 | nf4-nockpt | nf4-all | nf4-all-nockpt
(nf4: bitsandbytes NF4 + double quant, f16 autocast, gradient checkpointing -- the reference's
setup; -nockpt: without checkpointing; -all: LoRA r16 on q,k,v,o,gate,up,down, the adapter
FLOPs of our 2-expert r8 MoE-LoRA on the same targets without its router -- peft has no
MoE-LoRA). Run in the same call as our `bench train`.
"""
import json
import os
import sys
import tempfile
import time

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from peft import LoraConfig, TaskType, get_peft_model

config_path, variant = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
accum, warmup = 8, 2
cfg = Qwen3VLConfig.from_json_file(config_path)
flags = variant.split("-")
dtype = torch.bfloat16 if flags[0] == "bf16" else torch.float16
checkpointing = "ckpt" in flags or (flags[0] == "nf4" and "nockpt" not in flags)
targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
rank = 8
if "all" in flags:
    targets += ["gate_proj", "up_proj", "down_proj"]
    rank = 16
torch.manual_seed(0)


def random_checkpoint():
    """A saved f16 checkpoint of the random model (for bitsandbytes to quantize while loading),
    written once per TMPDIR; initialised on the GPU (minutes faster than on the CPU)."""
    folder = os.path.join(tempfile.gettempdir(), "qwen3-vl-random-f16")
    if not os.path.exists(os.path.join(folder, "config.json")):
        with torch.device("cuda"):
            Qwen3VLForConditionalGeneration(cfg).to(torch.float16).save_pretrained(folder)
        torch.cuda.empty_cache()
    return folder


if variant == "prepare":  # bench_train.py runs this before timing (and sampling memory)
    random_checkpoint()
    sys.exit(0)
if flags[0] == "nf4":
    from transformers import BitsAndBytesConfig
    folder = random_checkpoint()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16)
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        folder, quantization_config=quant, device_map={"": 0}, dtype=torch.float16)
else:
    with torch.device("cuda"):
        model = Qwen3VLForConditionalGeneration(cfg).to(dtype)
model.config.use_cache = False
if checkpointing:
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=2 * rank,
                                         lora_dropout=0.05, bias="none", target_modules=targets))
trainable, total = model.get_nb_trainable_parameters()

# 3 text tokens, <vision_start>, 81 image pads, <vision_end>, 10 prompt tokens, 24 caption tokens.
n_img = 81
vocab = cfg.text_config.vocab_size
filler = [(1000 + 7 * k) % vocab for k in range(1, 40)]
prompt = filler[:3] + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img \
    + [cfg.vision_end_token_id] + filler[3:13]
caption = filler[13:37]
ids = torch.tensor([prompt + caption], device="cuda")
labels = torch.tensor([[-100] * len(prompt) + caption], device="cuda")
mm = (ids == cfg.image_token_id).int()
grid = torch.tensor([[1, 18, 18]], device="cuda")
pixels = torch.randn(324, 3 * 2 * 16 * 16, device="cuda", dtype=dtype)
optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def optimizer_step():
    for _ in range(accum):
        with torch.autocast("cuda", dtype=dtype):
            out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                        mm_token_type_ids=mm, labels=labels)
        scaler.scale(out.loss / accum).backward()
    scaler.unscale_(optim)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    scaler.step(optim)
    scaler.update()
    optim.zero_grad(set_to_none=True)
    return out.loss.item()


for _ in range(warmup):
    optimizer_step()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
times = []
for _ in range(steps):
    t = time.perf_counter()
    loss = optimizer_step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
times.sort()
median = times[len(times) // 2]
print(json.dumps({
    "variant": variant, "trainable": trainable, "params": total, "seq_tokens": ids.shape[1],
    "step_s_median": median, "samples_per_s": accum / median,
    "tokens_per_s": accum * ids.shape[1] / median,
    "torch_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
    "torch_peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    "loss": loss, "gpu": torch.cuda.get_device_name(),
}))
