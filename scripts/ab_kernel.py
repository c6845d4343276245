"""A/B the Gluon kernel against another version of its source, interleaved in one process
(the card drifts by a few % between runs, so two separate benchmark runs cannot show a 2 % change):

    git show REV:attnquant/kernels/hopper/forward.py > scratch/forward_base.py   # (ignored: pass carry=["scratch"] to the device tool)
    python3 scripts/ab_kernel.py scratch/forward_base.py [SHAPE ...]

Times static-FP8 output on the PREFILL shapes whose names contain a SHAPE (all by default),
base and current in turn over 5 rounds; prints medians and current / base. The base file must
keep the kernel's signature (launch.py passes the same arguments)."""

import importlib.util
import sys

from attnquant.bench import _gluon_fp8, _interleaved, _prefill_cases
from attnquant.kernels.hopper import forward, launch

path, shapes = sys.argv[1], sys.argv[2:]
spec = importlib.util.spec_from_file_location("attnquant.kernels.hopper._ab_base", path)
base_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base_module)
# each version with its own launch cache (launch._COMPILED is keyed on the config, not the kernel)
versions = {"base": (base_module.attn_fwd_ws_kernel, {}), "current": (forward.attn_fwd_ws_kernel, {})}


def run_as(version, fn):
    def run():
        kernel, compiled = versions[version]
        saved = forward.attn_fwd_ws_kernel, launch._COMPILED
        forward.attn_fwd_ws_kernel, launch._COMPILED = kernel, compiled
        try:
            return fn()
        finally:
            forward.attn_fwd_ws_kernel, launch._COMPILED = saved
    return run


print(f"kernel A/B (µs; gluon, static fp8 out; median of 5 interleaved rounds): base = {path}")
for name, q, k, v, causal, scale, flops in _prefill_cases(shapes):
    fns = [run_as(version, _gluon_fp8(q, k, v, causal, scale)) for version in versions]
    outs = [fn() for fn in fns]  # (compiled before the timed rounds; outputs must agree)
    outs = [o[0] if isinstance(o, tuple) else o for o in outs]
    diff = (outs[0].float() - outs[1].float()).abs().max().item()
    t_base, t_cur = _interleaved(fns, rounds=5)
    print(f"  {name:<18} base {t_base:7.0f} ({flops / t_base * 1e-6:4.0f} TF)  current {t_cur:7.0f} "
          f"({flops / t_cur * 1e-6:4.0f} TF)  current/base {t_cur / t_base:6.3f}  max|out diff| {diff:.3g}", flush=True)
