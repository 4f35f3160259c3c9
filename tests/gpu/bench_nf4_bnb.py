"""bitsandbytes NF4 (double quant) on the 4B layer shapes, timed like `bench nf4`.

For each (in, out): `bnb.matmul_4bit` (rows 1 takes bitsandbytes' GEMV inference kernel; more
rows dequantize then matmul), torch's matmul on the pre-dequantized weight, and the dequantize
alone; plus torch's device-to-device copy bandwidth. CUDA events around `iters` calls, median
of `repeats`, after a warm-up. One JSON line at the end.

Usage: python3 bench_nf4_bnb.py [f16|bf16] [GEMV_ROWS] [GEMM_ROWS]
"""
import json
import statistics
import sys

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F

dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[sys.argv[1] if len(sys.argv) > 1 else "f16"]
gemv_rows = [int(r) for r in (sys.argv[2] if len(sys.argv) > 2 else "1,8").split(",")]
gemm_rows = [int(r) for r in (sys.argv[3] if len(sys.argv) > 3 else "128,512,2048").split(",")]
shapes = [(2560, 4096), (2560, 1024), (4096, 2560), (2560, 9728), (9728, 2560)]
iters, repeats = 20, 7


def per_call(f):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            f()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


torch.manual_seed(0)
big = torch.randn(1 << 28, device="cuda", dtype=dtype)
dst = torch.empty_like(big)
copy_s = per_call(lambda: dst.copy_(big))
copy_gb_s = 2 * big.numel() * big.element_size() / copy_s / 1e9
del big, dst
print(f"torch copy_: {copy_gb_s:.0f} GB/s", file=sys.stderr)

rows_out = []
with torch.inference_mode():
    for d_in, d_out in shapes:
        w = (torch.rand(d_out, d_in, device="cuda") * 0.1 - 0.05).to(dtype)
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        dense = F.dequantize_4bit(packed, state).to(dtype)
        deq_s = per_call(lambda: F.dequantize_4bit(packed, state))
        weight_bytes = d_in * d_out * (0.5 + 1 / 64)
        for rows in gemv_rows + gemm_rows:
            x = torch.randn(rows, d_in, device="cuda", dtype=dtype)
            bnb_s = per_call(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state))
            dense_s = per_call(lambda: x @ dense.t())
            flops = 2 * rows * d_in * d_out
            row = dict(d_in=d_in, d_out=d_out, rows=rows, bnb_us=bnb_s * 1e6, dense_us=dense_s * 1e6,
                       bnb_weight_gb_s=weight_bytes / bnb_s / 1e9, bnb_tflops=flops / bnb_s / 1e12,
                       dense_tflops=flops / dense_s / 1e12, dequantize_us=deq_s * 1e6)
            print(f"{d_in:>5}->{d_out:<5} rows {rows:>4}: bnb {row['bnb_us']:>8.1f} us "
                  f"({row['bnb_weight_gb_s']:>6.0f} GB/s, {row['bnb_tflops']:>6.1f} TFLOP/s) | "
                  f"torch dense {row['dense_us']:>8.1f} us ({row['dense_tflops']:>6.1f} TFLOP/s)",
                  file=sys.stderr)
            rows_out.append(row)
print(json.dumps(dict(torch=torch.__version__, bitsandbytes=bnb.__version__,
                      device=torch.cuda.get_device_name(), copy_gb_s=copy_gb_s, rows=rows_out)))
