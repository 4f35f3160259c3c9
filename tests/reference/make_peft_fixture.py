#!/usr/bin/env python3
"""PEFT LoRA parity fixture on the tiny model of make_tiny_qwen3vl.py.

Builds a peft LoRA (r 4, alpha 8, text q/k/v/o and vision qkv/linear_fc1 — the latter also
matches the mergers' linear_fc1, as peft's name matching does) on tests/reference/tiny-qwen3-vl with non-zero random A and B, saves it with
`save_pretrained` to tests/reference/tiny-qwen3-vl-lora/, and the f32 logits of the fixture
inputs to tests/reference/tiny-qwen3-vl-lora-reference.safetensors.

With `--check DIR`, instead loads the adapter folder DIR (e.g. one exported by
`qwen3-vl-moelora`) with `PeftModel.from_pretrained` and prints the max relative logits error
against `DIR/logits.safetensors` (written by `forward --adapter DIR`).

Usage: python3 make_peft_fixture.py [--check DIR]   (needs torch, transformers >= 5.17, peft)
"""
import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLForConditionalGeneration

HERE = os.path.dirname(os.path.abspath(__file__))


def base_and_inputs():
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        os.path.join(HERE, "tiny-qwen3-vl"), dtype=torch.float32, attn_implementation="eager").eval()
    inp = load_file(os.path.join(HERE, "tiny-qwen3-vl-inputs.safetensors"))
    ids = inp["input_ids"]
    inp["mm_token_type_ids"] = (ids == model.config.image_token_id).long()
    return model, inp


def logits(model, inp):
    with torch.no_grad():
        return model(**inp).logits.float()


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--check":
        d = sys.argv[2]
        model, inp = base_and_inputs()
        model = PeftModel.from_pretrained(model, d).eval()
        got = logits(model, inp)
        want = load_file(os.path.join(d, "logits.safetensors"))["logits"]
        mask = inp["attention_mask"].bool()
        err = (got[mask] - want[mask]).abs().max() / want[mask].abs().max()
        print(f"peft logits vs ours: max relative error {err:.3e}")
        return
    torch.manual_seed(99)
    model, inp = base_and_inputs()
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "qkv", "linear_fc1"])
    model = get_peft_model(model, cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((0.05 * torch.randn_like(p)).to(torch.bfloat16).float())
    model.print_trainable_parameters()
    out = os.path.join(HERE, "tiny-qwen3-vl-lora")
    model.save_pretrained(out)
    readme = os.path.join(out, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    cfg_path = os.path.join(out, "adapter_config.json")
    with open(cfg_path) as f:
        written = json.load(f)
    written["base_model_name_or_path"] = "tests/reference/tiny-qwen3-vl"
    with open(cfg_path, "w") as f:
        json.dump(written, f, indent=2)
    save_file({"logits": logits(model, inp).contiguous()},
              os.path.join(HERE, "tiny-qwen3-vl-lora-reference.safetensors"))


if __name__ == "__main__":
    main()
