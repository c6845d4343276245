"""A/B the Gluon kernel against another version of its source, interleaved in one process
(the card drifts by a few % between runs, so two separate benchmark runs cannot show a 2 % change):

    git show REV:attnquant/kernels/hopper/forward.py > scratch/forward_base.py   # (ignored: pass carry=["scratch"] to the device tool)
    python3 scripts/ab_kernel.py scratch/forward_base.py [scratch/other.py ...] [SHAPE ...]
    python3 scripts/ab_kernel.py scratch/forward_base.py scratch/forward_base.py:pingpong=1 current:pingpong=1

Times static-FP8 output (or `format=bf16|group|nvfp4`) on the PREFILL shapes whose names contain
a SHAPE (all by default) and the bench.EXTRA_PREFILL shapes named in full, the versions in turn
over 5 rounds (the first is the base; the working tree's kernel is "current", always timed);
prints medians, each version / base, and how far each version's output is from the base's. A
version may name WsConfig options to run with (`:option=N[:...]`; on non-causal shapes the
launcher may switch to three consumers, launch.for_problem: `:auto_consumers=0` keeps two). The
files must keep the kernel's signature (launch.py passes the same arguments)."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's attnquant without PYTHONPATH
from attnquant.bench import _gluon_format_calls, _interleaved, _prefill_cases, _with_config
from attnquant.kernels.hopper import forward, launch

specs = [a for a in sys.argv[1:] if ".py" in a or a.startswith("current:")]
# format=bf16|fp8|group|nvfp4: the output format timed (bench._gluon_format_calls; static FP8 by default)
FORMATS = ("bf16", "fp8", "group", "nvfp4")
fmt = ([a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("format=")] or ["fp8"])[-1]
shapes = [a for a in sys.argv[1:] if a not in specs and not a.startswith("format=")]


def load(path, i):
    if path == "current":
        return forward.attn_fwd_ws_kernel
    spec = importlib.util.spec_from_file_location(f"attnquant.kernels.hopper._ab_{i}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.attn_fwd_ws_kernel


def options(spec):
    return {k: int(v) for k, v in (o.split("=") for o in spec.split(":")[1:])}


# each version with its own launch cache (launch._COMPILED is keyed on the config, not the kernel)
versions = {("base" if i == 0 else spec.rsplit("/", 1)[-1].replace(".py", "")):
            (load(spec.split(":")[0], i), {}, options(spec)) for i, spec in enumerate(specs)}
versions.setdefault("current", (forward.attn_fwd_ws_kernel, {}, {}))


def run_as(version, fn, d, dv):
    """fn with this version's kernel, launch cache and config options (bench._with_config)."""
    kernel, compiled, opts = versions[version]
    configured = _with_config(launch, replace(launch.ws_config(d, dv), **opts), fn)

    def run():
        saved = forward.attn_fwd_ws_kernel, launch._COMPILED, launch.SMEM_LIMIT
        forward.attn_fwd_ws_kernel, launch._COMPILED = kernel, compiled
        if "num_stages" in opts:  # a stage count of one's own may use shared memory up to the card's maximum
            launch.SMEM_LIMIT = launch.SMEM_MAX
        try:
            return configured()
        finally:
            forward.attn_fwd_ws_kernel, launch._COMPILED, launch.SMEM_LIMIT = saved
    return run


print(f"kernel A/B (µs; gluon, {fmt} out; median of 5 interleaved rounds): base = {specs[0]}")
for name, q, k, v, causal, scale, flops in _prefill_cases(shapes):
    call = _gluon_format_calls(q, k, v, causal, scale)[FORMATS.index(fmt)]
    fns = [run_as(version, call, q.shape[-1], v.shape[-1]) for version in versions]
    outs = [fn() for fn in fns]  # (compiled before the timed rounds; outputs must agree)
    outs = [(o[0] if isinstance(o, tuple) else o).float() for o in outs]
    diffs = [(o - outs[0]).abs().max().item() for o in outs]  # each version's output against the base's
    times = _interleaved(fns, rounds=5)
    print(f"  {name:<18} " + "  ".join(f"{version} {t:6.0f} ({flops / t * 1e-6:3.0f} TF, {t / times[0]:5.3f}, "
                                      f"max|out - base| {diff:.3g})"
                                      for version, t, diff in zip(versions, times, diffs)), flush=True)
