#!/usr/bin/env python3
"""Image-processor parity fixtures: images plus what HF's Qwen3-VL image processor makes of them.

Writes into tests/reference/ (or OUT_DIR):
  images/<case>.<ext>                       the input files (PNG, JPEG, WebP; grayscale, RGBA,
                                            CMYK, EXIF-rotated)
  image-processor-reference.safetensors     per case: `<case>.levels` [N, 768] uint8, the patch
                                            rows' first temporal frame as uint8 levels
                                            (pixel value = (level - 127.5) / 127.5), `<case>.grid`
                                            [1, 3] int64 image_grid_thw, `<case>.min_pixels`
                                            [1] int64, `<case>.resize` [2] int64 (0, 0 = none)

HF side: transformers' Qwen2VLImageProcessor (torchvision backend, the default for Qwen3-VL)
with Qwen3-VL's preprocessor_config values, images opened with transformers.image_utils.load_image
(EXIF orientation applied, converted to RGB). An explicit resize (the reference workflow's
280x280) is torchvision's uint8 antialiased bicubic resize to smart_resize(h, w) before the
processor, whose own resize is then a no-op. The script asserts that every value HF returns is an
exact level and that the two temporal frames are equal, so storing levels loses nothing.

Usage: python3 make_image_fixtures.py [OUT_DIR]   (needs torch, torchvision, transformers >= 5.17, pillow)
"""
import os
import sys

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from PIL import Image
from safetensors.numpy import save_file
from transformers.image_utils import load_image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor, smart_resize


def pattern(h, w, seed):
    """Smooth colour pattern with edges and a little noise, deterministic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127 + 120 * np.sin(x / (3 + seed) + y / 11)
    g = 127 + 120 * np.cos(y / (5 + seed) - x / 17)
    b = np.where((x // 9 + y // 7) % 2 == 0, 230, 25).astype(np.float64)
    img = np.stack([r, g, b], -1) + rng.normal(0, 6, (h, w, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# name, (height, width), kind, min_pixels, explicit resize (h, w) or None
CASES = [
    ("rgb_64x96_exact", (64, 96), "png", 4096, None),
    ("rgb_150x200_mixed", (150, 200), "png", 4096, None),
    ("rgb_48x80_upscale_default", (48, 80), "png", 65536, None),
    ("gray_97x131", (97, 131), "gray", 4096, None),
    ("rgba_100x70", (100, 70), "rgba", 4096, None),
    ("jpeg_77x123", (77, 123), "jpeg", 4096, None),
    ("exif_rot90_96x64", (96, 64), "exif", 4096, None),
    ("resize280_375x500", (375, 500), "png", 65536, (280, 280)),
    ("webp_lossless_64x96_exact", (64, 96), "webp", 4096, None),
    ("jpeg_cmyk_64x96", (64, 96), "cmyk", 4096, None),
]


def write_image(path, hw, kind, seed):
    h, w = hw
    arr = pattern(h, w, seed)
    if kind == "gray":
        Image.fromarray(arr[..., 0], "L").save(path)
    elif kind == "rgba":
        alpha = (np.arange(w)[None, :] * 255 // max(w - 1, 1)).repeat(h, 0).astype(np.uint8)
        Image.fromarray(np.dstack([arr, alpha]), "RGBA").save(path)
    elif kind == "jpeg":
        Image.fromarray(arr).save(path, quality=90)
    elif kind == "exif":
        # Stored sideways (w x h) with orientation 6: viewers rotate it 90° clockwise to h x w.
        img = Image.fromarray(arr).transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(path, exif=exif.tobytes(), quality=95)
    elif kind == "webp":
        Image.fromarray(arr).save(path, lossless=True)
    elif kind == "cmyk":
        Image.fromarray(arr).convert("CMYK").save(path, quality=95)
    else:
        Image.fromarray(arr).save(path)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    tensors = {}
    for seed, (name, hw, kind, min_pixels, resize) in enumerate(CASES):
        ext = {"jpeg": "jpg", "exif": "jpg", "cmyk": "jpg", "webp": "webp"}.get(kind, "png")
        path = os.path.join(out, "images", f"{name}.{ext}")
        write_image(path, hw, kind, seed)
        proc = Qwen2VLImageProcessor(
            size={"shortest_edge": min_pixels, "longest_edge": 16777216}, patch_size=16,
            temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
            do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True)
        image = load_image(path)
        if resize is not None:
            th, tw = smart_resize(resize[0], resize[1], factor=32, min_pixels=min_pixels,
                                  max_pixels=16777216)
            t = torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1).contiguous()
            image = tvF.resize(t, [th, tw], interpolation=tvF.InterpolationMode.BICUBIC,
                               antialias=True)
        res = proc(images=[image], return_tensors="pt")
        pv = res["pixel_values"].numpy().astype(np.float32)
        grid = res["image_grid_thw"].numpy().astype(np.int64)
        rows = pv.reshape(pv.shape[0], 3, 2, 16 * 16)
        assert (rows[:, :, 0] == rows[:, :, 1]).all(), "temporal frames differ"
        levels = np.round(rows[:, :, 0] * 127.5 + 127.5)
        assert np.array_equal(((levels.astype(np.float32) - 127.5) / 127.5), rows[:, :, 0]), name
        tensors[f"{name}.levels"] = levels.astype(np.uint8).reshape(pv.shape[0], 768)
        tensors[f"{name}.grid"] = grid
        tensors[f"{name}.min_pixels"] = np.array([min_pixels], dtype=np.int64)
        tensors[f"{name}.resize"] = np.array(resize or (0, 0), dtype=np.int64)
        print(f"{name:28s} {image.size if hasattr(image, 'size') else tuple(image.shape)} -> grid {grid.tolist()} rows {pv.shape[0]}")
    import transformers
    save_file(tensors, os.path.join(out, "image-processor-reference.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__,
                        "processor": type(Qwen2VLImageProcessor()).__name__})


if __name__ == "__main__":
    main()
