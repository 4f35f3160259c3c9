#!/usr/bin/env bash
# One device call for the split one-row GEMV (gemv_split.cu), in order of priority, ~3 minutes:
# 1. the lab (tests/gpu/gemv_lab.py, CuPy, no Rust build): W in registers with a tile per
#    cube (plan) next to the split kernel at several warps per cube and cubes per
#    multiprocessor, with the 32 or the 64 KiB table, cold and L2-hot, and without the products
#    (:nomath=1), next to a read-only pass and a copy of the same bytes;
# 2. ncu stall reasons of the split kernel at the two 12.8 MB shapes (tests/gpu/ncu_stalls.py);
# 3. the binary's GPU checks with QWEN3VL_GEMV=split (f16; bf16 with the wide table);
# 4. the binary's own bench at one row, split against the default (sliced).
# Needs the stripped binary as .device/qv.xz and the kernel cache in .device/kc
# (tests/gpu/kernel_cache.sh) for steps 3-4: run with carry [".device"]:
#   cargo build --release && strip -o /tmp/qv target/release/qwen3-vl-moelora &&
#   xz -T2 -6 -c /tmp/qv > .device/qv.xz
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
echo "== lab $(date +%s)"
C=plan,split,split:NW=4,split:NW=8,split:NW=16:MINB=2,split:NW=32:MINB=1,split:NW=32:MINB=1:WIDE=1
C=$C,split:NW=24:MINB=1:WIDE=1,split:NW=5:MINB=1,split:NW=8:nomath=1
# LEAN=1 (a short device budget): fewer layouts and no ncu.
[ -n "$LEAN" ] && C=plan,split,split:NW=8,split:NW=16:MINB=2,split:NW=32:MINB=1:WIDE=1,split:NW=8:nomath=1
# LEAN=2 (a minimal budget): three layouts, the f16 checks, no bench.
[ "$LEAN" = 2 ] && C=plan,split,split:NW=16:MINB=2
timeout 150 python3 tests/gpu/gemv_lab.py --hot --configs $C --reps 9 2>&1 | tee $OUT/lab.txt | grep -vE "^\|"
if [ -z "$LEAN" ]; then
echo "== ncu stalls $(date +%s)"
M=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio
timeout 60 ncu --clock-control none -k regex:nf4_gemv --metrics $M --csv python3 tests/gpu/gemv_lab.py --ncu --shapes 2560x9728,9728x2560 --configs split,split:NW=8,split:NW=32:MINB=1:WIDE=1 > $OUT/ncu_stalls.csv 2>&1; echo "rc $?"
python3 tests/gpu/ncu_stalls.py $OUT/ncu_stalls.csv
fi
if [ -f .device/qv.xz ]; then
  xz -dc .device/qv.xz > /tmp/qv && chmod +x /tmp/qv
  eval "$(tests/gpu/kernel_cache.sh env)"
  tests/gpu/kernel_cache.sh unpack .device/kc >/dev/null
  echo "== checks split $(date +%s)"
  QWEN3VL_GEMV=split timeout 40 /tmp/qv bench nf4 --check-only --device cuda --checks gemv --dtype f16 2>&1 | grep -E "forward|FAIL|error|panic" | grep -v "backward" | grep -E "rows   1|FAIL|error|panic"
  [ "$LEAN" = 2 ] || QWEN3VL_GEMV=split QWEN3VL_GEMV_WIDE=1 QWEN3VL_GEMV_CUBE_WARPS=32 timeout 40 /tmp/qv bench nf4 --check-only --device cuda --checks gemv --dtype bf16 2>&1 | grep -E "forward|FAIL|error|panic" | grep -v "backward" | grep -E "rows   1|FAIL|error|panic"
  echo "== bench one row $(date +%s)"
  [ "$LEAN" = 2 ] || for g in split sliced; do
    QWEN3VL_GEMV=$g timeout 60 /tmp/qv bench nf4 --device cuda --checks none --gemv-rows 1 --gemm-rows none 2>&1 | grep -E "rows    1|copy" | sed "s/^/$g /"
  done
fi
echo "== end $(date +%s)"
grep -E "^\|" $OUT/lab.txt
