"""A/B the package against other versions of itself, interleaved in one process (the card
drifts by a few % between runs, so two separate benchmark runs cannot show a 2 % change):

    python tools/ab_versions.py --prepare REV scratch/base        # here: REV's package (git), or
    python tools/ab_versions.py --prepare PATH scratch/variant     # a package folder (an experiment)
    python tools/ab_versions.py scratch/base [scratch/variant ...] [--formats bf16,fp8,group,nvfp4]
                                [--shapes mla,gqa] [--decode] [--rounds 5]    # on the GPU machine

--prepare writes the package as DEST/attnquant_NAME (NAME: DEST's folder name) with its torch
ops renamed (attnquant_NAME::*), so that every version loads side by side. The first folder is
the base. The A/B times the public API of each (backend 'auto': the kernels a user gets) on
the benchmark's prefill shapes in every output format asked for, and with --decode the decode
shapes under CUDA graphs; it prints medians over interleaved rounds, each version's ratio to
the base, and the share of output bytes that differ from the base's (identical kernels: 0).
"""

import argparse
import importlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_name(folder: Path) -> str:
    return "attnquant_" + re.sub(r"\W", "_", folder.resolve().name)


def prepare(src: str, dest: Path):
    """The package of git revision `src` (or the package folder `src`) as dest/attnquant_NAME,
    its op names and self-imports renamed."""
    dest.mkdir(parents=True, exist_ok=True)
    name = package_name(dest)
    target = dest / name
    subprocess.run(["rm", "-rf", str(target)], check=True)
    if Path(src).is_dir():
        shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "pkg.tar"
            subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), src, "attnquant"], check=True)
            with tarfile.open(archive) as tar:
                tar.extractall(tmp)
            (Path(tmp) / "attnquant").rename(target)
    for path in target.rglob("*.py"):
        text = path.read_text()
        text = text.replace("attnquant::", f"{name}::").replace("torch.ops.attnquant.", f"torch.ops.{name}.")
        text = re.sub(r"\b(from|import) attnquant\b", rf"\1 {name}", text)
        path.write_text(text)
    print(f"{src} -> {target}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="folders holding a prepared package each (see --prepare); the "
                    "first is the base")
    ap.add_argument("--prepare", metavar="SRC", help="write SRC's package (a git revision or a package folder) "
                    "into the folder and stop")
    ap.add_argument("--formats", default="bf16,fp8,group,nvfp4")
    ap.add_argument("--shapes", default="", help="comma-separated substrings of the prefill shape names")
    ap.add_argument("--decode", action="store_true", help="also the decode shapes (CUDA graphs)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.prepare:
        return prepare(args.prepare, Path(args.folders[0]))
    import torch

    sys.path.insert(0, str(ROOT))
    versions = {}
    for folder in args.folders:
        sys.path.insert(0, str(Path(folder).resolve()))
        versions[Path(folder).resolve().name] = importlib.import_module(package_name(Path(folder)))
    import attnquant as current
    from attnquant import bench

    versions["current"] = current
    formats = args.formats.split(",")
    shapes = [s for s in args.shapes.split(",") if s]
    print(f"A/B (µs; median of {args.rounds} interleaved rounds; ratio to the base, {args.folders[0]}; the share of "
          "output bytes that differ from the base's)")
    for name, q, k, v, causal, scale, flops in bench.prefill_cases(shapes):
        for fmt in formats:
            calls = [bench.format_call(mod, fmt, q, k, v, causal, scale) for mod in versions.values()]
            outs = [fn()[0].view(torch.uint8) for fn in calls]
            t = bench.interleaved(calls, rounds=args.rounds)
            cells = [f"{label} {us:7.1f} ({us / t[0]:5.3f}, {(o != outs[0]).float().mean().item():.1%})"
                     for label, us, o in zip(versions, t, outs)]
            print(f"  {name:<18} {fmt:<6} " + "  ".join(cells), flush=True)
    if args.decode:
        for name, b, sk, h, hkv, d in bench.DECODE:
            for page in (0, 16):
                calls = [bench.decode_calls(mod, b, sk, h, hkv, d, page=page)[0]["bf16 kv"] for mod in versions.values()]
                t = bench.interleaved(calls, rounds=args.rounds, graph=True)
                label = f"{name} {'paged16' if page else 'contiguous'} fp8 out"
                print(f"  {label:<36} " + "  ".join(f"{v} {us:7.1f} ({us / t[0]:5.3f})" for v, us in zip(versions, t)),
                      flush=True)


if __name__ == "__main__":
    main()
