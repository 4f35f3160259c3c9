#!/usr/bin/env python3
"""Build the tiny random Qwen3-VL parity fixture with HF transformers (>= 5.17) and torch.

Writes, under the output folder (default: the folder of this script):
  tiny-qwen3-vl/config.json, tiny-qwen3-vl/model.safetensors   the model in HF format (bf16 on disk)
  tiny-qwen3-vl-inputs.safetensors                              input_ids, attention_mask, pixel_values, image_grid_thw
  tiny-qwen3-vl-reference.safetensors                           HF's f32 outputs for those inputs

The model: GQA (4 query / 2 KV heads), text head_dim 32 with mrope_section [8, 4, 4], 4 decoder
layers, a 4-block vision tower with 3 DeepStack taps, spatial merge 2, tied lm_head. Weights are
rounded to bf16 before the reference is computed, so the bf16 file holds exactly the weights that
produced the f32 reference. The batch has 2 sequences, the second left-padded, and 3 images with
different non-square grids (two in row 0, one in row 1).

Usage: python3 make_tiny_qwen3vl.py [OUT_DIR]
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

IMAGE, VIDEO, VSTART, VEND, PAD = 250, 251, 252, 253, 0


def build_model():
    torch.manual_seed(20261127)
    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
            max_position_embeddings=4096, hidden_act="silu",
            rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0,
                                 mrope_section=[8, 4, 4], mrope_interleaved=True)),
        vision_config=dict(
            depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
            patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
            num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 3],
            hidden_act="gelu_pytorch_tanh"),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
        vision_end_token_id=VEND, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    model = Qwen3VLForConditionalGeneration(cfg).float().eval()
    # Random init gives tiny norms/biases = 0 or 1; perturb every tensor so each weight matters,
    # then round to bf16 so the bf16 checkpoint is exact.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16).float())
    return model


def build_inputs():
    g = torch.Generator().manual_seed(7)
    grids = torch.tensor([[1, 4, 6], [1, 6, 2], [1, 2, 4]], dtype=torch.int64)
    n_rows = int(grids.prod(dim=1).sum())
    pixel_values = torch.randn(n_rows, 3 * 2 * 16 * 16, generator=g)
    tok = lambda n: [int(t) for t in torch.randint(1, 240, (n,), generator=g)]
    row0 = tok(3) + [VSTART] + [IMAGE] * 6 + [VEND] + tok(1) + [VSTART] + [IMAGE] * 3 + [VEND] + tok(3)
    row1 = tok(2) + [VSTART] + [IMAGE] * 2 + [VEND] + tok(4)
    length = max(len(row0), len(row1))
    ids, mask = [], []
    for row in (row0, row1):  # left padding
        pad = length - len(row)
        ids.append([PAD] * pad + row)
        mask.append([0] * pad + [1] * len(row))
    return (torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.int64),
            pixel_values, grids)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    model = build_model()
    ids, mask, pv, grids = build_inputs()
    mm = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    with torch.no_grad():
        vis = model.model.visual(pv, grid_thw=grids, return_dict=True)
        pos, delta = model.model.get_rope_index(ids, mm, image_grid_thw=grids, attention_mask=mask)
        res = model(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grids,
                    mm_token_type_ids=mm, output_hidden_states=True, return_dict=True)
    ref = {
        "vision_last_hidden": vis.last_hidden_state,
        "vision_merged": vis.pooler_output,
        "position_ids": pos.to(torch.int64),
        "rope_deltas": delta.to(torch.int64),
        "logits": res.logits.float(),
    }
    for i, f in enumerate(vis.deepstack_features):
        ref[f"deepstack_{i}"] = f
    for i, h in enumerate(res.hidden_states):
        ref[f"hidden_states_{i}"] = h
    ref = {k: v.contiguous() for k, v in ref.items()}
    model_dir = os.path.join(out, "tiny-qwen3-vl")
    model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    for extra in ("generation_config.json",):
        path = os.path.join(model_dir, extra)
        if os.path.exists(path):
            os.remove(path)
    save_file({"input_ids": ids, "attention_mask": mask, "pixel_values": pv.contiguous(),
               "image_grid_thw": grids}, os.path.join(out, "tiny-qwen3-vl-inputs.safetensors"))
    save_file(ref, os.path.join(out, "tiny-qwen3-vl-reference.safetensors"),
              metadata={"transformers": __import__("transformers").__version__,
                        "torch": torch.__version__})
    for k, v in ref.items():
        print(f"{k:24s} {tuple(v.shape)} {v.dtype}")
    print("position_ids row 0:", pos[:, 0].tolist())
    print("position_ids row 1:", pos[:, 1].tolist())
    print("rope_deltas:", delta.tolist())


if __name__ == "__main__":
    main()
