"""A/B the package against another version of itself, interleaved in one process (the card
drifts by a few % between runs, so two separate benchmark runs cannot show a 2 % change):

    python tools/ab_versions.py --prepare REV scratch/base    # here (git): that revision's package
    python tools/ab_versions.py scratch/base [--formats bf16,fp8,group,nvfp4] [--shapes mla,gqa]
                                             [--decode] [--rounds 5]       # on the GPU machine

--prepare writes REV's attnquant/ as scratch/base/attnquant_base/ with its torch ops renamed
(attnquant_base::*), so that both versions load side by side. The A/B times the public API of
each (backend 'auto': the kernels a user gets) on the benchmark's prefill shapes in every
output format asked for, and with --decode the decode shapes under CUDA graphs; it prints
medians over interleaved rounds, each version's ratio to the base, and how far the outputs
are apart (identical kernels: 0).
"""

import argparse
import importlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(rev: str, dest: Path):
    """REV's attnquant package as dest/attnquant_base, its op names and self-imports renamed."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "pkg.tar"
        subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev, "attnquant"], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp)
        target = dest / "attnquant_base"
        subprocess.run(["rm", "-rf", str(target)], check=True)
        (Path(tmp) / "attnquant").rename(target)
    for path in target.rglob("*.py"):
        text = path.read_text()
        text = text.replace("attnquant::", "attnquant_base::").replace("torch.ops.attnquant.", "torch.ops.attnquant_base.")
        text = re.sub(r"\b(from|import) attnquant\b", r"\1 attnquant_base", text)
        path.write_text(text)
    print(f"{rev} -> {target}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="folder holding attnquant_base/ (see --prepare)")
    ap.add_argument("--prepare", metavar="REV", help="write REV's package into BASE and stop")
    ap.add_argument("--formats", default="bf16,fp8,group,nvfp4")
    ap.add_argument("--shapes", default="", help="comma-separated substrings of the prefill shape names")
    ap.add_argument("--decode", action="store_true", help="also the decode shapes (CUDA graphs)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.prepare:
        return prepare(args.prepare, Path(args.base))
    import torch

    sys.path.insert(0, str(Path(args.base).resolve()))
    sys.path.insert(0, str(ROOT))
    base = importlib.import_module("attnquant_base")
    import attnquant as current
    from attnquant import bench

    versions = {"base": base, "current": current}
    formats = args.formats.split(",")
    shapes = [s for s in args.shapes.split(",") if s]
    print(f"A/B (µs; median of {args.rounds} interleaved rounds; ratio to base; max |out - base|): base = {args.base}")
    for name, q, k, v, causal, scale, flops in bench.prefill_cases(shapes):
        for fmt in formats:
            calls = [bench.format_call(mod, fmt, q, k, v, causal, scale) for mod in versions.values()]
            outs = [fn()[0].view(torch.uint8) for fn in calls]
            differ = (outs[1] != outs[0]).float().mean().item()  # (the fraction of output bytes)
            t = bench.interleaved(calls, rounds=args.rounds)
            print(f"  {name:<18} {fmt:<6} base {t[0]:7.1f}  current {t[1]:7.1f} ({flops / t[1] * 1e-6:4.0f} TF)"
                  f"  ratio {t[1] / t[0]:5.3f}  bytes differing {differ:.2%}", flush=True)
    if args.decode:
        for name, b, sk, h, hkv, d in bench.DECODE:
            for page in (0, 16):
                calls = [bench.decode_calls(mod, b, sk, h, hkv, d, page=page)[0]["bf16 kv"] for mod in versions.values()]
                t = bench.interleaved(calls, rounds=args.rounds, graph=True)
                label = f"{name} {'paged16' if page else 'contiguous'} fp8 out"
                print(f"  {label:<36} base {t[0]:7.1f}  current {t[1]:7.1f}  ratio {t[1] / t[0]:5.3f}", flush=True)


if __name__ == "__main__":
    main()
