"""Does compute-sanitizer's racecheck report hazards in a Gluon warp_specialize kernel that
shares nothing between its partitions? If it does, the hazards it reports at attnquant's
kernel entry and `gl.warp_specialize` line come from Triton's lowering of the partition
start / end (not from attnquant's code).

    compute-sanitizer --tool racecheck python tools/ws_race_probe.py

The kernel has the attnquant kernel's partition shape (two 4-warp "consumers" and a 1-warp
"producer", register reallocation) and each partition only writes its own slice of a global
buffer: no shared memory of its own, no barriers, nothing to race on.
"""

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
    out = torch.zeros(3 * N.value, device="cuda")
    ws_kernel[(4,)](out, 1.5, num_warps=4)
    torch.cuda.synchronize()
    ok = bool((out == 1.5).all())
    print("ws_race_probe ran,", "every partition wrote its slice" if ok else "WRONG RESULT")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
