"""Where the Gluon kernel's warps wait, from an Nsight Compute source-page CSV
(`gpu_check.sh --ncu-source` writes one per shape: `ncu -i R --page source --csv --print-source sass`).

    python3 scripts/stall_report.py src_noncausal_mha_8k.csv.gz [top]

Prints the stall reasons over the whole kernel, then the `top` SASS instructions by warp-stall
samples (each with its share and its main reasons), so a wait can be traced to the barrier,
wgmma wait or mbarrier poll in the code that causes it."""

import csv
import gzip
import sys
from collections import Counter

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
rows = list(csv.reader(gzip.open(path, "rt") if path.endswith(".gz") else open(path)))
header_at = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
header, body = rows[header_at], [r for r in rows[header_at + 1:] if len(r) == len(rows[header_at])]
col = {name: i for i, name in enumerate(header)}
reasons = [h for h in header if h.startswith("stall_") and not h.endswith("(Not Issued)")]


def num(r, name):
    try:
        return float(r[col[name]] or 0)
    except ValueError:
        return 0.0


total = sum(num(r, "Warp Stall Sampling (All Samples)") for r in body)
by_reason = Counter()
for r in body:
    for x in reasons:
        by_reason[x] += num(r, x)
print(f"{len(body)} instructions, {total:.0f} samples")
print("reasons: " + ", ".join(f"{k[6:]} {v / total:.1%}" for k, v in by_reason.most_common(10)))
print(f"\n{'address':>8} {'share':>6}  {'instruction':<60} main reasons")
for r in sorted(body, key=lambda r: -num(r, "Warp Stall Sampling (All Samples)"))[:top]:
    n = num(r, "Warp Stall Sampling (All Samples)")
    main = sorted(((num(r, x), x[6:]) for x in reasons), reverse=True)[:3]
    why = ", ".join(f"{k} {v / n:.0%}" for v, k in main if v > 0)
    print(f"{r[col['Address']]:>8} {n / total:6.1%}  {r[col['Source']][:60]:<60} {why}")
