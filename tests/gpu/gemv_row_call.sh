#!/usr/bin/env bash
# One device call for the one-row GEMV (gemv_row.cu), in order of priority, ~2 minutes:
# 1. the lab (tests/gpu/gemv_lab.py, CuPy, no Rust build): W in registers (plan), one cube per SM
#    with a ring of 8 one-block slots and the wide table (p8), whole-line slots (LINES=1), each
#    timed with cold weights and with the weight hot in L2, and without the products
#    (:nomath=1), and with x read by the lanes g = 0 only (:XZERO=1), next to a read-only pass
#    and a copy of the same bytes;
# 2. ncu stall reasons at 2560->9728 (tests/gpu/ncu_stalls.py);
# 3. the binary's GPU checks with whole-line slots.
# Needs the stripped binary as .device/qv.xz and the kernel cache in .device/kc
# (tests/gpu/kernel_cache.sh) for step 3: run with carry [".device"]:
#   cargo build --release && strip -o /tmp/qv target/release/qwen3-vl-moelora &&
#   xz -T2 -6 -c /tmp/qv > .device/qv.xz
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
echo "== lab $(date +%s)"
C=plan,p8,plan:nomath=1,p8:nomath=1,plan:XZERO=1,p8:XZERO=1,s1:LINES=1,s2:LINES=1,s2:LINES=1:nomath=1,s2:LINES=1:XZERO=1,p4:LINES=1
timeout 120 python3 tests/gpu/gemv_lab.py --hot --configs $C --reps 7 2>&1 | tee $OUT/lab.txt | grep -vE "^\|"
echo "== ncu stalls $(date +%s)"
M=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio
timeout 60 ncu --clock-control none -k regex:nf4_gemv_row --metrics $M --csv python3 tests/gpu/gemv_lab.py --ncu --shapes 2560x9728 --configs plan,p8,s2:LINES=1 > $OUT/ncu_stalls.csv 2>&1; echo "rc $?"
python3 tests/gpu/ncu_stalls.py $OUT/ncu_stalls.csv
if [ -f .device/qv.xz ]; then
  xz -dc .device/qv.xz > /tmp/qv && chmod +x /tmp/qv
  eval "$(tests/gpu/kernel_cache.sh env)"
  tests/gpu/kernel_cache.sh unpack .device/kc >/dev/null
  echo "== checks LINES $(date +%s)"
  QWEN3VL_GEMV=row QWEN3VL_GEMV_STAGES=2 QWEN3VL_GEMV_LINES=1 timeout 40 /tmp/qv bench nf4 --check-only --device cuda --checks gemv --dtype f16 2>&1 | grep -E "forward|FAIL|error|panic" | grep -v "backward" | grep -E "rows   1|FAIL|error|panic"
fi
echo "== end $(date +%s)"
grep -E "^\|" $OUT/lab.txt
