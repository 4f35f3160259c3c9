"""Writes tests/reference/nf4-<device>.safetensors: inputs and bitsandbytes' NF4 quantization of them.

Runs bitsandbytes' own quantize_4bit (CUDA kernel on a GPU, the pure-torch default path on the
CPU) and stores, per case, the input and every tensor bitsandbytes serialises for a 4-bit weight
(`QuantState.as_dict(packed=True)`, the keys of an HF checkpoint) plus the dequantized values.

Usage: PYTHONPATH=<bitsandbytes> python3 make_nf4_fixture.py [cpu|cuda] [OUT_DIR]
"""
import sys

import torch
from safetensors.torch import save_file
import bitsandbytes.functional as F

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
out_dir = sys.argv[2] if len(sys.argv) > 2 else "tests/reference"
g = torch.Generator().manual_seed(0)


def edge_block():
    """64 values with absmax exactly 1: every NF4 code value and every threshold (midpoint, in
    f32 as bitsandbytes computes it), and values one ulp either side of three thresholds."""
    code = F.get_4bit_type("nf4", device="cpu")
    mids = (code[:-1] + code[1:]) / 2
    near = []
    for m in mids[[0, 7, 14]]:
        near += [torch.nextafter(m, torch.tensor(2.0)), torch.nextafter(m, torch.tensor(-2.0))]
    vals = torch.cat([code, mids, torch.stack(near)])
    return torch.cat([vals, torch.zeros(64 - vals.numel())])


def weight(rows, cols, dtype, zero_block=False, edges=False):
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
    flat = w.view(-1)
    if zero_block:
        flat[64:128] = 0
    if edges:
        flat[128:192] = edge_block().to(dtype)
    return w


cases = {
    # name: (tensor, blocksize, double quant)
    "f32_edges": (weight(16, 128, torch.float32, zero_block=True, edges=True), 64, False),
    # 260 blocks: two nested (256-wide) absmax blocks, the second partial.
    "bf16_nested": (weight(130, 128, torch.bfloat16, zero_block=True), 64, True),
    "f16_bs128": (weight(24, 256, torch.float16), 128, True),
    "f32_bs32": (weight(8, 96, torch.float32), 32, False),
    # 315 values: an odd count and a partial last block.
    "f32_odd": (weight(7, 45, torch.float32), 64, True),
}

tensors = {}
for name, (w, blocksize, nested) in cases.items():
    packed, state = F.quantize_4bit(w.to(device), blocksize=blocksize, quant_type="nf4",
                                    compress_statistics=nested)
    tensors[f"{name}.input"] = w.contiguous()
    tensors[f"{name}.weight"] = packed.cpu()
    for k, v in state.as_dict(packed=True).items():
        tensors[f"{name}.weight.{k}"] = v.cpu()
    # Dequantized in f32 (bitsandbytes then casts to the input dtype).
    state.dtype = torch.float32
    tensors[f"{name}.dequantized_f32"] = F.dequantize_4bit(packed, state).cpu().contiguous()
    if nested:
        tensors[f"{name}.absmax_f32"] = F.dequantize_blockwise(state.absmax, state.state2).cpu() + \
            state.offset.cpu()
        # The f32 block maxima before double quantization (to test the 8-bit step alone).
        _, plain = F.quantize_4bit(w.to(device), blocksize=blocksize, quant_type="nf4",
                                   compress_statistics=False)
        tensors[f"{name}.absmax_plain"] = plain.absmax.cpu()

save_file(tensors, f"{out_dir}/nf4-{device}.safetensors",
          metadata={"bitsandbytes": __import__("bitsandbytes").__version__, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})
print(f"wrote {out_dir}/nf4-{device}.safetensors ({len(tensors)} tensors)")
