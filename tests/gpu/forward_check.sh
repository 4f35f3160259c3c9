#!/usr/bin/env bash
# GPU check of the forward pass, run on a machine with CUDA, numpy and safetensors:
#   1. the tiny fixture on CUDA in f32 and bf16 vs the CPU f32 result and HF's reference;
#   2. wall time of one forward of the 4B architecture with random weights (288x288 image +
#      40 text tokens), bf16 and f32, after a warm-up, median of repeats.
# Usage: tests/gpu/forward_check.sh BINARY OUT_DIR
set -euo pipefail
BIN=$1; OUT=$2
REF=tests/reference
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for spec in "cpu f32" "cuda f32" "cuda bf16" "cuda f16"; do
  set -- $spec
  "$BIN" forward --device "$1" --dtype "$2" --model $REF/tiny-qwen3-vl \
    --inputs $REF/tiny-qwen3-vl-inputs.safetensors --out "$OUT/tiny-$1-$2.safetensors" --all
done
for v in "cuda-f32" "cuda-bf16" "cuda-f16"; do
  echo "== tiny $v vs CPU f32"
  python3 $REF/compare_outputs.py "$OUT/tiny-$v.safetensors" "$OUT/tiny-cpu-f32.safetensors" \
    --mask $REF/tiny-qwen3-vl-inputs.safetensors
done
echo "== tiny cuda-f32 vs HF transformers reference"
python3 $REF/compare_outputs.py "$OUT/tiny-cuda-f32.safetensors" $REF/tiny-qwen3-vl-reference.safetensors \
  --mask $REF/tiny-qwen3-vl-inputs.safetensors
python3 $REF/make_4b_inputs.py "$OUT/in4b.safetensors"
for dt in bf16 f32; do
  echo "== 4B random weights, $dt"
  "$BIN" forward --device cuda --dtype $dt --random-init --model model/configs/qwen3-vl-4b-instruct.json \
    --inputs "$OUT/in4b.safetensors" --out "$OUT/out4b-$dt.safetensors" --repeat 10
done
