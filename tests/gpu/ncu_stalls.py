#!/usr/bin/env python3
"""Prints, per launch in an `ncu --csv` file, its duration, DRAM and issue utilization and the
stall reasons that cost most (warps stalled per issued instruction, ncu's
smsp__average_warps_issue_stalled_*_per_issue_active.ratio).

  tests/gpu/ncu_stalls.py FILE.csv
"""
import collections
import csv
import sys

rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
if not rows:
    sys.exit(f"{sys.argv[1]}: no ncu rows (did the profiled program fail?)")
hdr = {h: i for i, h in enumerate(rows[0])}
launches = collections.OrderedDict()
for r in rows[1:]:
    d = launches.setdefault(r[hdr["ID"]], {"grid": r[hdr["Grid Size"]], "block": r[hdr["Block Size"]]})
    try:
        d[r[hdr["Metric Name"]]] = float(r[hdr["Metric Value"]].replace(",", ""))
    except ValueError:
        pass
for i, d in launches.items():
    stalls = {
        k.split("stalled_")[1].split("_per_issue")[0]: v
        for k, v in d.items()
        if isinstance(v, float) and "stalled_" in k
    }
    top = sorted(stalls.items(), key=lambda kv: -kv[1])[:6]
    print(f"{i} grid {d['grid']} block {d['block']}: {d.get('gpu__time_duration.sum', 0):.0f} ns "
          f"dram {d.get('dram__throughput.avg.pct_of_peak_sustained_elapsed', 0):.0f}% "
          f"issue {d.get('smsp__issue_active.avg.pct_of_peak_sustained_active', 0):.0f}% "
          f"warps {d.get('sm__warps_active.avg.pct_of_peak_sustained_active', 0):.0f}% | "
          + " ".join(f"{k} {v:.1f}" for k, v in top))
