#!/usr/bin/env python3
"""HF transformers' greedy `generate` on the tiny Qwen3-VL fixture (run make_tiny_qwen3vl.py first).

Reads tiny-qwen3-vl/ and tiny-qwen3-vl-inputs.safetensors (2 left-padded rows, 3 images) and
writes tiny-qwen3-vl-generate.safetensors:
  new_tokens [B, N]         the N greedy tokens of each row (no stop token: N steps)
  step_logits [N, B, V]     the raw f32 logits each token was chosen from (HF's `output_logits`)
  new_tokens_rep1.5 [B, N]  greedy with repetition_penalty 1.5 (the random model repeats itself)
  step_logits_rep1.5

Usage: python3 make_generate_fixture.py [DIR]
"""
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

NEW_TOKENS = 12
IMAGE, VIDEO = 250, 251


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        os.path.join(root, "tiny-qwen3-vl"), dtype=torch.float32, attn_implementation="eager").eval()
    inputs = load_file(os.path.join(root, "tiny-qwen3-vl-inputs.safetensors"))
    ids = inputs["input_ids"]
    # Which positions are image (1) or video (2) tokens: HF's M-RoPE needs it to place images.
    mm = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    tensors = {}
    for suffix, penalty in (("", 1.0), ("_rep1.5", 1.5)):
        gen = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, repetition_penalty=penalty,
                               pad_token_id=0, eos_token_id=None, bos_token_id=None,
                               return_dict_in_generate=True, output_logits=True)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=inputs["attention_mask"],
                                 pixel_values=inputs["pixel_values"],
                                 image_grid_thw=inputs["image_grid_thw"],
                                 mm_token_type_ids=mm, generation_config=gen)
        new = out.sequences[:, ids.shape[1]:].contiguous()
        assert new.shape[1] == NEW_TOKENS, new.shape
        tensors["new_tokens" + suffix] = new.to(torch.int64)
        tensors["step_logits" + suffix] = torch.stack([l.float() for l in out.logits]).contiguous()
        print(f"new tokens (repetition penalty {penalty}):", new.tolist())
    save_file(tensors, os.path.join(root, "tiny-qwen3-vl-generate.safetensors"),
              metadata={"transformers": __import__("transformers").__version__,
                        "torch": torch.__version__})


if __name__ == "__main__":
    main()
