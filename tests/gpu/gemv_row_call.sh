#!/usr/bin/env bash
# One device call for the one-row GEMV (gemv_row.cu), in order of priority: the lab
# (tests/gpu/gemv_lab.py, CuPy: W in registers, rings of 2 and 4, one cube per SM with the wide
# and the narrow table, against a read-only pass and a copy of the same bytes, cold weights,
# graph timings); the binary's checks of the ring and of the wide one-cube-per-SM plan; ncu
# device time of the sliced kernel and that plan through the binary; stall reasons at
# 2560->9728 under ncu. Needs the stripped binary as .device/qv.xz and the kernel cache in
# .device/kc (tests/gpu/kernel_cache.sh): run with carry [".device"]:
#   cargo build --release && strip -o /tmp/qv target/release/qwen3-vl-moelora &&
#   xz -T2 -6 -c /tmp/qv > .device/qv.xz
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
echo "== lab $(date +%s)"
timeout 200 python3 tests/gpu/gemv_lab.py --configs plan,s2,s4,s4:TPC=2,p8,p8:WIDE=0 --reps 15 2>&1 | tee $OUT/lab.txt | grep -vE "^\|"
xz -dc .device/qv.xz > /tmp/qv && chmod +x /tmp/qv
eval "$(tests/gpu/kernel_cache.sh env)"
tests/gpu/kernel_cache.sh unpack .device/kc >/dev/null
chk() { echo "== checks $* $(date +%s)"; timeout 60 env "$@" /tmp/qv bench nf4 --check-only --device cuda --checks gemv --dtype f16 2>&1 | grep -E "forward|FAIL|error|panic" | grep -v "backward" | grep -E "rows   1|FAIL|error|panic"; }
chk QWEN3VL_GEMV=row QWEN3VL_GEMV_STAGES=4
chk QWEN3VL_GEMV=row QWEN3VL_GEMV_STAGES=8 QWEN3VL_GEMV_WIDE=1
N="ncu --clock-control none -k regex:nf4_gemv|unary_float --metrics gpu__time_duration.sum,launch__registers_per_thread,dram__bytes_read.sum,smsp__inst_executed.sum --csv"
NB="/tmp/qv bench nf4 --checks none --dtype f16 --device cuda --iters 2 --repeats 2 --gemm-rows none --gemv-rows 1"
prof() { local name=$1; shift; echo "== ncu $name $(date +%s)"; env "$@" timeout 60 $N $NB 2>&1 | grep -E '^"|rror|panic' > "$OUT/ncu_$name.csv"; echo "rc $? $(wc -l < "$OUT/ncu_$name.csv")"; }
prof sliced QWEN3VL_GEMV=sliced
prof p8 QWEN3VL_GEMV=row QWEN3VL_GEMV_STAGES=8 QWEN3VL_GEMV_WIDE=1
echo "== ncu stalls $(date +%s)"
M=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio
timeout 90 ncu --clock-control none -k regex:nf4_gemv_row --metrics $M --csv python3 tests/gpu/gemv_lab.py --ncu --shapes 2560x9728 --configs plan,s4,p8 2>&1 | grep -E '^"|rror' > $OUT/ncu_stalls.csv; echo "rc $?"
python3 tests/gpu/ncu_stalls.py $OUT/ncu_stalls.csv
echo "== end $(date +%s)"
python3 tests/gpu/ncu_summary.py $OUT/ncu_*.csv 2>&1 | cut -c1-160
grep -E "^\|" $OUT/lab.txt
