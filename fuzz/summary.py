#!/usr/bin/env python3
"""Sums fuzz/runs.tsv per target into the Markdown table of fuzz/README.md."""
import collections, csv, os, sys

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs.tsv")
rows = list(csv.DictReader(open(path), delimiter="\t"))
per = collections.OrderedDict()
for r in rows:
    t = per.setdefault(r["target"], {"runs": 0, "secs": 0, "execs": 0, "crashes": 0, "loads": []})
    t["runs"] += 1
    t["secs"] += int(r["seconds"]) if r["outcome"] == "ok" else 0
    t["execs"] += int(r["executions"] or 0)
    t["crashes"] += r["outcome"] != "ok"
    t["loads"].append(float(r["load1"]))
print("| target | runs | executions | exec/s (mean of runs) | crashes stopped a run | load average (1 min) at run ends |")
print("|---|---:|---:|---:|---:|---|")
total = 0
for name, t in sorted(per.items()):
    eps = [int(r["exec_per_sec"] or 0) for r in rows if r["target"] == name]
    total += t["execs"]
    print(f"| `{name}` | {t['runs']} | {t['execs']:,} | {sum(eps) // len(eps):,} | {t['crashes']} | {min(t['loads'])}–{max(t['loads'])} |")
print(f"| **total** | {len(rows)} | **{total:,}** | | | |")
