#!/usr/bin/env python3
"""Chat-template and tokenisation fixture made by HF's Qwen3VLProcessor.

Uses tests/reference/qwen-tokenizer/tokenizer.json (a small byte-level BPE with Qwen's special
tokens at their real ids, written by `qwen3-vl-moelora data prepare --special-ids qwen`), the
torchvision Qwen2VLImageProcessor (min_pixels 4096) and a Jinja template with the Qwen3-VL
Instruct rules (no default system prompt; image items rendered as
<|vision_start|><|image_pad|><|vision_end|>; items joined with nothing; turns end with
<|im_end|>\\n; generation prompt <|im_start|>assistant\\n). HF's processor renders the template,
expands each <|image_pad|> to t*h*w/4 copies and tokenises; the results go to
tests/reference/template-reference.json.

Usage: python3 make_template_fixture.py   (needs torch, torchvision, transformers >= 5.17)
"""
import json
import os

from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def img(name):
    return {"type": "image", "image": os.path.join(HERE, "images", name)}


def txt(t):
    return {"type": "text", "text": t}


CASES = [
    ("caption_training", False, [
        {"role": "user", "content": [img("rgb_64x96_exact.png"), txt("COCO Yes:")]},
        {"role": "assistant", "content": [txt("a red circle to the left of a blue square")]},
    ]),
    ("caption_prompt", True, [
        {"role": "user", "content": [img("rgb_64x96_exact.png"), txt("COCO Yes:")]},
    ]),
    ("system_text_only", True, [
        {"role": "system", "content": [txt("You are a captioner.")]},
        {"role": "user", "content": [txt("Describe the picture in one sentence, please! 42 words?")]},
    ]),
    ("multi_image_multi_turn", True, [
        {"role": "user", "content": [txt("Compare "), img("gray_97x131.png"), txt(" and "),
                                     img("rgba_100x70.png"), txt(".")]},
        {"role": "assistant", "content": [txt("They differ.")]},
        {"role": "user", "content": [img("rgb_64x96_exact.png"), txt("And this one?\nBe brief.")]},
    ]),
]


def main():
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(HERE, "qwen-tokenizer", "tokenizer.json"))
    proc = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": 4096, "longest_edge": 16777216}, patch_size=16,
            temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok, video_processor=Qwen3VLVideoProcessor(), chat_template=TEMPLATE)
    out = []
    for name, gen, messages in CASES:
        text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        enc = proc.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen,
                                       return_dict=True, return_tensors="np")
        grids = enc["image_grid_thw"].tolist() if "image_grid_thw" in enc else []
        rel = [{"role": m["role"], "content": [
            {"type": "image", "image": os.path.basename(c["image"])} if c["type"] == "image" else c
            for c in m["content"]]} for m in messages]
        out.append({"name": name, "add_generation_prompt": gen, "messages": rel, "text": text,
                    "input_ids": enc["input_ids"][0].tolist(), "image_grid_thw": grids})
        print(name, len(out[-1]["input_ids"]), grids)
    with open(os.path.join(HERE, "template-reference.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
