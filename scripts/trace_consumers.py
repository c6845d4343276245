"""Consumer timelines of the Gluon kernel from %clock marks (scripts/trace_kernel.py writes the
marked kernel to scratch/fx_trace.py): per step and per tile, on every CTA, with and without the
ping-pong; prints medians (step period and its parts, the warpgroups' phase, per-tile costs) and
saves the raw marks to $OUT/trace_<shape>[_pp].npz.
    python3 scripts/trace_kernel.py && PYTHONPATH=$PWD python3 scripts/trace_consumers.py [shape ...] [trace=FILE] [pp=0]
("base" is the committed kernel; max|out diff| is the marked kernel's output against it)."""
import importlib.util
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attnquant.bench import _gluon_format_calls, _prefill_cases, _with_config, bench  # noqa: E402
from attnquant.kernels.hopper import forward, launch  # noqa: E402

# trace=FILE: another marked kernel (scripts/trace_kernel.py SOURCE FILE); pp=0: without the ping-pong runs
opts = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
TRACED = opts.get("trace", "scratch/fx_trace.py")
spec = importlib.util.spec_from_file_location("attnquant.kernels.hopper._trace", TRACED)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
BUF = torch.zeros(1 << 22, dtype=torch.int32, device="cuda")  # the marked kernel's workspace (trace_kernel.py)
OUT = os.environ.get("OUT", "/tmp")
TRACE_CACHE = {}  # the marked kernel's own launch cache (launch._COMPILED is keyed on the config, not the kernel)


def traced(fn):
    """fn with the marked kernel, its launch cache and the big workspace."""
    def run():
        saved = forward.attn_fwd_ws_kernel, launch._COMPILED, launch.workspace
        forward.attn_fwd_ws_kernel, launch._COMPILED, launch.workspace = mod.attn_fwd_ws_kernel, TRACE_CACHE, \
            (lambda *a, **k: BUF)
        try:
            return fn()
        finally:
            forward.attn_fwd_ws_kernel, launch._COMPILED, launch.workspace = saved
    return run


def analyse(raw, tag):
    raw = raw.astype(np.int64) & 0xFFFFFFFF
    steps = raw[1024:1024 + 264 * 8192].reshape(132, 2, 2048, 4)
    tiles = raw[1024 + 264 * 8192:1024 + 264 * 8192 + 264 * 256].reshape(132, 2, 32, 8)
    ref = (tiles[:, 0, 0, 0] - 200000)[:, None, None, None]
    st = np.where(steps > 0, (steps - ref) % (1 << 32), -1)
    ti = np.where(tiles > 0, (tiles - ref) % (1 << 32), -1)
    np.savez_compressed(f"{OUT}/trace_{tag}.npz", steps=st, tiles=ti)
    ok = (st[:, :, :-1, 0] >= 0) & (st[:, :, 1:, 0] >= 0) & (st[:, :, :-1, 3] >= 0)
    period = np.where(ok, st[:, :, 1:, 0] - st[:, :, :-1, 0], -1)
    # consecutive steps of one tile only: the next step starts soon after this one's release
    gap = np.where(ok, st[:, :, 1:, 0] - st[:, :, :-1, 3], 1 << 30)
    inner = ok & (gap < 20000)
    P = np.median(period[inner])
    print(f"{tag}: {inner.sum()} inner steps; step period median {P:.0f} clk, p10 {np.percentile(period[inner], 10):.0f}, "
          f"p90 {np.percentile(period[inner], 90):.0f}")
    s0 = st[:, :, :-1, :][inner]
    for name, a, b in (("K wait + issue (0->1)", 0, 1), ("S wait (1->2)", 1, 2), ("PV wait + softmax + release (2->3)", 2, 3)):
        d = s0[:, b] - s0[:, a]
        print(f"   {name:<36} median {np.median(d):6.0f}  mean {d.mean():6.0f}  ({d.mean() / P:.2f} of a period)")
    nxt = st[:, :, 1:, 0][inner] - s0[:, 3]
    print(f"   {'release -> next step start':<36} median {np.median(nxt):6.0f}  mean {nxt.mean():6.0f}")
    # phase: warpgroup 1's step start against warpgroup 0's, for the same ring block
    both = (st[:, 0, :, 0] >= 0) & (st[:, 1, :, 0] >= 0)
    d = (st[:, 1, :, 0] - st[:, 0, :, 0])[both]
    ph = ((d / P + 0.5) % 1.0) - 0.5
    hist, edges = np.histogram(ph, bins=10, range=(-0.5, 0.5))
    print("   phase of WG1 against WG0 (step starts, in periods):", " ".join(f"{e:+.1f}:{h}" for e, h in zip(edges, hist)))
    # per CTA: span from its first tile's start to its last tile's last PV, against the steps in it
    spans, over = [], []
    for c in range(132):
        for w in range(2):
            t = ti[c, w]
            n = int((t[:, 0] >= 0).sum())
            if n == 0:
                continue
            span = t[n - 1, 3] - t[0, 0]
            nsteps = int((st[c, w, :, 0] >= 0).sum())
            spans.append(span)
            over.append((span - (nsteps + n) * P) / n / P)
    print(f"   CTA span median {np.median(spans):.0f} clk; per-tile cost beyond its blocks x period: "
          f"median {np.median(over):.2f} periods (mean {np.mean(over):.2f})")
    allq = ti[:, :, :, 1] - ti[:, :, :, 0]
    allf = ti[:, :, :, 2] - ti[:, :, :, 1]
    m = (ti[:, :, :, 0] >= 0) & (ti[:, :, :, 2] >= 0)
    print(f"   tile start: Q wait median {np.median(allq[m]):.0f} clk, first block (QK^T + softmax) median "
          f"{np.median(allf[m]):.0f} clk")
    # epilogue + hand-over: from a tile's last PV to the next tile's start
    ep = ti[:, :, 1:, 0] - ti[:, :, :-1, 3]
    m2 = (ti[:, :, 1:, 0] >= 0) & (ti[:, :, :-1, 3] >= 0)
    print(f"   last PV -> next tile start (epilogue, tile hand-over) median {np.median(ep[m2]):.0f} clk")
    # the epilogue's parts (events 4-7, where trace_kernel.py could mark them), per warpgroup
    t, nxt = ti[:, :, :-1, :], ti[:, :, 1:, 0]
    for w in range(2):
        parts = []
        for name, a, b in (("values", 3, 4), ("smem + TMA", 4, 5), ("rest", 5, 6), ("read id", 6, 7)):
            m = (t[:, w, :, a] >= 0) & (t[:, w, :, b] >= 0)
            if m.any():
                parts.append(f"{name} {np.median((t[:, w, :, b] - t[:, w, :, a])[m]):.0f}")
        m = (t[:, w, :, 7] >= 0) & (nxt[:, w] >= 0)
        if m.any():
            parts.append(f"-> next start {np.median((nxt[:, w] - t[:, w, :, 7])[m]):.0f}")
        if parts:
            print(f"   WG{w} epilogue, medians in clk: " + ", ".join(parts))
    # last step release -> last PV done
    return P


shapes = [a for a in sys.argv[1:] if "=" not in a] or ["mla"]
label = Path(TRACED).stem.replace("fx_trace", "")
for name, q, k, v, causal, scale, flops in _prefill_cases(shapes):
    call = _gluon_format_calls(q, k, v, causal, scale)[1]
    d, dv = q.shape[-1], v.shape[-1]
    for tag, cfg_opts in (("", {}), ("_pp", {"pingpong": True}))[:1 if opts.get("pp") == "0" else 2]:
        cfg = replace(launch.ws_config(d, dv), **cfg_opts)
        base = _with_config(launch, cfg, call)
        tr = traced(_with_config(launch, cfg, call))
        ref = base()
        out = tr()
        torch.cuda.synchronize()
        pick = lambda o: (o[0] if isinstance(o, tuple) else o).float()  # noqa: E731
        diff = (pick(out) - pick(ref)).abs().max().item()
        tb, tt = bench(base), bench(tr)
        BUF.zero_()
        tr()
        torch.cuda.synchronize()
        print(f"\n{name}{tag} {TRACED}: base {tb:.0f} µs, traced {tt:.0f} µs (max|out diff| {diff})")
        analyse(BUF.cpu().numpy(), name + tag + label)
