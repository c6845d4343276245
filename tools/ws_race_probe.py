"""Does compute-sanitizer's racecheck report hazards in a Gluon warp_specialize kernel that
shares nothing between its partitions? If it does, the hazards it reports at attnquant's
kernel entry and `gl.warp_specialize` line come from Triton's lowering of the partition
start / end (not from attnquant's code).

    compute-sanitizer --tool racecheck python tools/ws_race_probe.py

The kernel has the attnquant kernel's partition shape (two 4-warp "consumers" and a 1-warp
"producer", register reallocation) and each partition only writes its own slice of a global
buffer: no shared memory of its own, no barriers, nothing to race on.

With 4 CTAs it reports 0 hazards, while attnquant's kernel reports ~20 a call set (sanitize_cases.py),
all between the workers' read of their partition state at Triton's switch loop (the kernel's
entry) and the default partition's writes of it (before the partitions start, and at the end),
once against a torch reduction kernel that ran before on the same SM. What attnquant's calls have
and the bare probe does not: many CTAs a launch (each SM runs several in turn) and a kernel
using shared memory just before. The options add them, so one racecheck run tells which one
brings the reports:

    compute-sanitizer --tool racecheck python tools/ws_race_probe.py --ctas 1056 --prior-reduce
"""

import argparse


import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

N = gl.constexpr(128)


@gluon.jit
def _fill(out, value, part: gl.constexpr, warps: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [warps], [0])
    offs = gl.arange(0, N, layout=layout)
    gl.store(out + part * N + offs, offs.to(gl.float32) * 0.0 + value)


@gluon.jit
def _consumer(out, value, part: gl.constexpr):
    _fill(out, value, part, 4)


@gluon.jit
def _producer(out, value):
    _fill(out, value, 2, 1)


@gluon.jit
def ws_kernel(out, value):
    gl.warp_specialize([(_consumer, (out, value, 0)), (_consumer, (out, value, 1)), (_producer, (out, value))],
                       [4, 1], [240, 24])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctas", type=int, default=4, help="CTAs a launch (8 x the SMs: each SM runs several in turn)")
    ap.add_argument("--prior-reduce", action="store_true", help="a torch reduction (shared memory) just before")
    ap.add_argument("--launches", type=int, default=1)
    args = ap.parse_args()
    out = torch.zeros(3 * N.value, device="cuda")
    for _ in range(args.launches):
        if args.prior_reduce:
            torch.randn(1 << 22, device="cuda").abs().amax()
        ws_kernel[(args.ctas,)](out, 1.5, num_warps=4)
    torch.cuda.synchronize()
    ok = bool((out == 1.5).all())
    print(f"ws_race_probe ran ({args.ctas} CTAs, prior reduce {args.prior_reduce}, {args.launches} launches),",
          "every partition wrote its slice" if ok else "WRONG RESULT")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
