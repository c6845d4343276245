"""The key-block loops of a Hopper attention kernel, read from its SASS: each innermost loop that
issues wgmmas, with its instruction count and opcode histogram, or one loop's instructions.
It compares kernel versions, and FA4's cubin with ours, without a GPU.

    export TRITON_INTERPRET=0 PYTHONPATH=$PWD
    python3 tools/sass_loops.py "d=192, group=16"                  # compile_sm90.gluon_variant(d=192, group=16): mla
    python3 tools/sass_loops.py "d=192, group=16" --source scratch/fx.py   # the same, another version of the kernel
    python3 tools/sass_loops.py "gluon d128 causal"                # a compile_sm90.VARIANTS entry (name contains it)
    python3 tools/sass_loops.py kernel.cubin [--list N]            # any sm_90a cubin (or a .sass listing)

`--list N` prints loop N's instructions in address order; `--source` compiles attn_fwd_ws_kernel
from another file (another version of the kernel's file)."""

import argparse
import collections
import importlib.util
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import compile_sm90 as C  # noqa: E402


def opcode(ins: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernel", help="a .cubin or .sass file, or (part of) a compile_sm90 variant name")
    ap.add_argument("--list", type=int, metavar="N", help="print loop N's instructions")
    ap.add_argument("--source", help="a file whose attn_fwd_ws_kernel to compile instead of the package's")
    args = ap.parse_args()
    if args.kernel.endswith(".sass"):
        sass = open(args.kernel).read()
    elif args.kernel.endswith(".cubin"):
        sass = C.sass_text(open(args.kernel, "rb").read())
    else:
        import triton

        if args.source:
            spec = importlib.util.spec_from_file_location("attnquant.kernels.hopper._sass_loops", args.source)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            C.attn_fwd_ws_kernel = module.attn_fwd_ws_kernel
        if "=" in args.kernel:
            src, opts = eval(f"C.gluon_variant({args.kernel})")  # noqa: S307 - a developer's own arguments
        else:
            name = next((n for n in C.VARIANTS if args.kernel in n), None)
            if name is None:
                sys.exit(f"no compile_sm90 variant matches {args.kernel!r}")
            if args.source:
                sys.exit("--source needs gluon_variant arguments (VARIANTS are built with the package's kernel)")
            src, opts = C.VARIANTS[name]
        k = triton.compile(src, target=C.TARGET, options=opts)
        print(C.ptxas_report(k.asm["ptx"]))
        sass = C.sass_text(k.asm["cubin"])
    loops = C.wgmma_loops(sass)
    if args.list is not None:
        for ins in loops[args.list][2]:
            print(ins)
        return
    for n, (lo, hi, body) in enumerate(loops):
        hist = collections.Counter(opcode(i) for i in body)
        kind = "masked" if C.is_masked(body) else "unmasked"
        print(f"loop {n} {lo:#x}-{hi:#x} {kind:>8}: {len(body)} instructions  "
              + " ".join(f"{op} {k}" for op, k in hist.most_common()))


if __name__ == "__main__":
    main()
