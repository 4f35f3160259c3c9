#!/usr/bin/env python3
"""Summarizes `ncu --csv` output: per (kernel, grid, block), the median device time (µs), DRAM
bytes read (MB) and GB/s, registers and warp instructions over its launches.

  tests/gpu/ncu_summary.py FILE.csv...
"""
import csv, sys, statistics, collections, re
# ncu --csv rows -> per (kernel, grid) medians of duration (us), dram bytes (MB), regs, inst
for path in sys.argv[1:]:
    rows = [r for r in csv.reader(l for l in open(path) if l.startswith('"'))]
    if not rows: print(path, "empty"); continue
    hdr = rows[0]; idx = {h: i for i, h in enumerate(hdr)}
    launches = collections.OrderedDict()
    for r in rows[1:]:
        if len(r) < len(hdr): continue
        key = r[idx["ID"]]
        d = launches.setdefault(key, {"name": r[idx["Kernel Name"]][:40], "grid": r[idx["Grid Size"]], "block": r[idx["Block Size"]]})
        v = r[idx["Metric Value"]].replace(",", "")
        try: d[r[idx["Metric Name"]]] = (float(v), r[idx["Metric Unit"]])
        except ValueError: pass
    groups = collections.OrderedDict()
    for d in launches.values():
        groups.setdefault((d["name"], d["grid"], d["block"]), []).append(d)
    print("==", path)
    for (name, grid, block), ds in groups.items():
        def med(m, scale=1.0):
            vals = [x[m][0] * scale for x in ds if m in x]
            return statistics.median(vals) if vals else float("nan")
        unit = ds[0].get("gpu__time_duration.sum", (0, "ns"))[1]
        tscale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3}.get(unit, 1e-3)
        dunit = ds[0].get("dram__bytes_read.sum", (0, "byte"))[1]
        bscale = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3}.get(dunit, 1e-6)
        t = med("gpu__time_duration.sum", tscale); mb = med("dram__bytes_read.sum", bscale)
        print(f"{name:40s} grid {grid:>14s} block {block:>12s} n={len(ds):2d} {t:8.2f} us  dram {mb:7.2f} MB  {mb/t*1e3 if t else 0:7.0f} GB/s  regs {med('launch__registers_per_thread'):4.0f}  inst {med('smsp__inst_executed.sum'):10.0f}")
