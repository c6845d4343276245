"""Where the Gluon kernel's warps wait, from an Nsight Compute source-page CSV
(`gpu_check.sh --ncu-source` writes one per shape: `ncu -i R --page source --csv --print-source sass`).

    python3 tools/stall_report.py src_noncausal_mha_8k.csv.gz [top]

Warp-stall samples land on SASS instructions in proportion to the time warps spend there, so:
1. the samples by execution count: instructions run once per key block (the consumer loops),
   once per tile (prologue, masked diagonal block, epilogue), by the producer, and the idle
   padding warps parked at a barrier for the whole kernel;
2. the main loop by instruction class (the exp2s, the row max, the wgmma waits, the mbarrier
   polls, ...), with samples per loop iteration: the period of one warpgroup's key block in
   sample units, comparable between variants of one shape;
3. the `top` instructions by samples, with their main stall reasons."""

import csv
import gzip
import re
import sys
from collections import Counter, defaultdict

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 20
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


def samples(r):
    return num(r, "Warp Stall Sampling (All Samples)")


def executed(r):
    return int(num(r, "Instructions Executed"))


def opcode(r):
    text = re.sub(r"^@!?U?P\w+\s+", "", r[col["Source"]].strip())
    return text.split()[0] if text else "?"


def op_class(r):
    op = opcode(r)
    if op.startswith("WARPGROUP.DEPBAR"):
        return "wgmma wait (" + r[col["Source"]].split(",")[-1].strip() + " left)"
    for prefix, name in (("HGMMA", "wgmma issue"), ("QGMMA", "wgmma issue"), ("WARPGROUP", "wgmma issue"), ("MUFU", "exp2 (MUFU)"),
                         ("FMNMX", "row max"), ("SHFL", "row max / sum shuffles"), ("FADD", "fp32 add/fma/mul"),
                         ("FFMA", "fp32 add/fma/mul"), ("FMUL", "fp32 add/fma/mul"), ("F2FP", "P pack"),
                         ("BAR", "bar.sync"), ("SYNCS", "mbarrier arrive / test"), ("BRA", "branch (mbarrier polls)")):
        if op.startswith(prefix):
            return name
    return "other (addresses, moves, predicates)"


def breakdown(part, total, indent="   "):
    by_class = defaultdict(Counter)
    for r in part:
        for x in reasons:
            by_class[op_class(r)][x[6:]] += num(r, x)
    for name, why in sorted(by_class.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(why.values())
        if n / total >= 0.005:
            print(f"{indent}{name:<38} {n / total:6.1%}  " + ", ".join(f"{k} {v / n:.0%}" for k, v in why.most_common(3)))


total = sum(samples(r) for r in body)
print(f"{len(body)} instructions, {total:.0f} samples")
by_count = Counter()
for r in body:
    by_count[executed(r)] += samples(r)
print("samples by execution count (the largest count with wgmmas is the key-block loop):")
print("   " + ", ".join(f"{n}x: {s / total:.1%}" for n, s in by_count.most_common(6)))

loop_count = max((executed(r) for r in body if "GMMA" in r[col["Source"]]), default=0)  # HGMMA, QGMMA (FP8)
loop = [r for r in body if executed(r) == loop_count]
in_loop = sum(samples(r) for r in loop)
print(f"\nkey-block loop ({loop_count} warp executions per instruction): {in_loop / total:.1%} of samples, "
      f"{in_loop / loop_count:.4f} samples per warp-iteration")
breakdown(loop, in_loop)

print(f"\n{'address':>8} {'share':>6}  {'instruction':<60} main reasons")
for r in sorted(body, key=lambda r: -samples(r))[:top]:
    n = samples(r)
    main = sorted(((num(r, x), x[6:]) for x in reasons), reverse=True)[:3]
    why = ", ".join(f"{k} {v / n:.0%}" for v, k in main if v > 0)
    print(f"{r[col['Address']][-8:]:>8} {n / total:6.1%}  {r[col['Source']][:60]:<60} {why}")
