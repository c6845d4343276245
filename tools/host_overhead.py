"""Host time of one eager call, next to the GPU time of the same call: is the benchmark timing
the kernel, or Python? Launches N calls back to back without synchronizing (the GPU queue
absorbs them, so the loop's wall time is the host's), then synchronizes; then a cProfile of
the first kind of call (the Gluon one for prefill shapes). A call whose host time exceeds its
GPU time is launch-bound, and do_bench then times the host.
Usage: python tools/host_overhead.py [shape name from attnquant.bench.PREFILL or HOST, or "decode"]
("decode": flash_attn_with_kvcache on bench.HOST's decode call, the portable kernel and its
split combine)"""

import cProfile
import io
import pstats
import sys
import time

import torch

import attnquant as aq
from attnquant.bench import HOST, PREFILL, bench_graph, prefill_inputs
from triton.backends.nvidia.driver import make_tensordesc_arg

from attnquant.kernels.launcher import Launches

name = sys.argv[1] if len(sys.argv) > 1 else "prefill_mla_4k"
scale = torch.tensor(0.02, device="cuda")
if name == "decode":
    _, b, sq, sk, h, hkv, d, causal = next(s for s in HOST if s[2] == 1)
    q, k, v = prefill_inputs(b, sq, sk, h, hkv, d, d)
    lens = torch.full((b,), sk, dtype=torch.int32, device="cuda")
    specs = {"triton": (aq.flash_attn_with_kvcache, (q, k, v, lens), dict(output_scale=scale))}
else:  # a prefill shape of the benchmark, or bench.HOST's prefill call (D = Dv)
    host = {s[0]: (*s[:7], s[6], s[7]) for s in HOST}
    _, b, sq, sk, h, hkv, d, dv, causal = host.get(name) or next(s for s in PREFILL if s[0] == name)
    q, k, v = prefill_inputs(b, sq, sk, h, hkv, d, dv)
    specs = {backend: (aq.flash_attn_func, (q, k, v), dict(causal=causal, output_scale=scale, backend=backend))
             for backend in ("gluon", "triton")}
# each call as a function of nothing; specs keep (function, arguments) for attnquant.plan
calls = {backend: (lambda f=f, a=a, kw=kw: f(*a, **kw)) for backend, (f, a, kw) in specs.items()}


def host_us(fn, n=200):
    """Host µs per call of `fn`, n calls launched back to back (the GPU queue absorbs them)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


print(f"{name}: host µs per call (n calls launched back to back), GPU µs per call (CUDA-graph replay)")
for backend, fn in calls.items():
    gpu = bench_graph(fn)
    for n in (20, 200):
        print(f"  {backend:<7} n={n:<4} host {host_us(fn, n):6.1f} µs/call   GPU {gpu:6.1f} µs/call", flush=True)


# The split of the first call's host time: its kernel launches alone (the compiled kernels
# relaunched with the arguments the call gave them: Triton's launcher, the TMA descriptors'
# encoding, the driver), and an output allocation, against the whole call.
fn = next(iter(calls.values()))
recorded = []
run = Launches.run


def recording_run(self, key, grid, args, constexprs, options):
    run(self, key, grid, args, constexprs, options)
    kernel = self._compiled.get(key)
    if kernel is not None:
        grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        recorded.append((kernel, kernel[grid3], (*args, *constexprs.values())))


Launches.run = recording_run
fn()
Launches.run = run
whole = host_us(fn)
launches = host_us(lambda: [launch(*args) for _, launch, args in recorded])
alloc = host_us(lambda: torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float8_e4m3fn, device=q.device))
# Triton's launcher encodes every TMA descriptor argument again on every launch (driver.py's
# make_tensordesc_arg: cuTensorMapEncodeTiled), cached descriptor objects or not
descs = [(a, meta) for kernel, _, args in recorded
         for a, meta in zip([a for a in args if hasattr(a, "block_shape")],
                            getattr(kernel.metadata, "tensordesc_meta", None) or [])]
encode = host_us(lambda: [make_tensordesc_arg(a, meta) for a, meta in descs]) if descs else 0.0
print(f"host µs of the whole call {whole:.1f}: its {len(recorded)} kernel launch(es) alone {launches:.1f} "
      f"(of which encoding {len(descs)} TMA descriptors {encode:.1f}), one output allocation {alloc:.1f}")
# the same call as a plan's replay (attnquant.plan): what is left of it is the launches, the
# output allocation and the run's own Python (signature checks, arguments)
f, a, kw = next(iter(specs.values()))
planned = aq.plan(f, *a, **kw)
run_us = host_us(lambda: planned.run(*a[:3]))
print(f"host µs of plan.run: {run_us:.1f} (direct replay: {planned.direct}); the run's Python beyond the "
      f"launches and the allocation: {run_us - launches - alloc:.1f}")
prof = cProfile.Profile()
prof.enable()
for _ in range(100):
    fn()
prof.disable()
torch.cuda.synchronize()
out = io.StringIO()
stats = pstats.Stats(prof, stream=out)
stats.sort_stats("cumulative").print_stats(30)
stats.sort_stats("tottime").print_stats(25)  # (where the time is spent itself: C calls, allocations)
print(out.getvalue())
