"""Plan once, run many times: `attnquant.plan(fn, *args, **kwargs)` makes one call of a public
function and records its kernel launches; `.run(...)` replays them on other tensors of the same
shapes, strides and dtypes.

Serving engines call attention once per layer with the same shapes (FlashInfer's plan/run
wrappers). An eager call spends most of its host time (~100-150 µs on the H100's host against
10-20 µs of GPU time for a small decode or prefill) on validation, planning and building kernel
arguments, all of which depend only on what a plan fixes. A replay checks each tensor's
signature (dtype, shape, strides, device, 16-byte alignment: what the compiled kernel and its
integer arguments were built for), puts the new addresses in the recorded arguments and
launches the compiled kernels directly.

What a plan fixes: every non-tensor argument (scale, causal, window, softcap, splits,
max_seqlen_*, ...) and the key-length metadata tensors (cu_seqlens_*, seqused_k, block_table,
cache_seqlens), which the kernels read on the device: update them in place between runs,
as CUDA graphs do. What a run takes: q/k/v (or merge_attn_states' partials) and the per-layer
tensors `out`, `output_scale`, `output_block_scale`, `sinks`, `q_descale`, `k_descale`,
`v_descale`; one omitted is the plan's (`out` omitted: a new one, as the call allocates).

A run validates no values (neither does the eager call on the GPU: it never reads device
memory) and keeps the plan's scratch buffers (split-KV partials, the Gluon kernel's tile
counter): run one plan on one stream at a time. A planned call whose launches take a tensor
the plan cannot place (for example a converted copy of an input) replays the whole call
instead (`CallPlan.direct` is False).
"""

from __future__ import annotations

import inspect
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import api
from .kernels import launcher
from .dispatch import zero_nvfp4_padding
from .kernels.device import on_device
from .kernels.hopper.launch import descriptor_params, rebased

# per-run tensors besides the leading ones (q, k, v / the partials), in this order
PER_RUN = ("out", "output_scale", "output_block_scale", "sinks", "q_descale", "k_descale", "v_descale")
_LEADING = {
    api.flash_attn_func: ("q", "k", "v"),
    api.flash_attn_varlen_func: ("q", "k", "v"),
    api.flash_attn_with_kvcache: ("q", "k_cache", "v_cache"),
    api.merge_attn_states: ("prefix_out", "prefix_lse", "suffix_out", "suffix_lse"),
}


def _signature(t: Optional[torch.Tensor]):
    """What a replay's kernels and arguments were built for."""
    if t is None:
        return None
    return t.dtype, t.shape, t.stride(), t.device, t.data_ptr() % 16 == 0


class _Recorder:
    """What one call did to the GPU, in order (launches, NVFP4 padding zeroed), and the tensors
    it made itself (launcher.owned)."""

    def __init__(self):
        self.steps: List[tuple] = []
        self.kept: List[torch.Tensor] = []

    def launched(self, launches, key, grid, args, constexprs, options):
        self.steps.append(("launch", launches, key, tuple(grid), tuple(args), dict(constexprs), dict(options)))

    def owned(self, t):
        self.kept.append(t)

    def nvfp4_padding(self, block_scale, num_tokens, num_heads, head_dim_v):
        self.steps.append(("nvfp4", block_scale, num_tokens, num_heads, head_dim_v))


class _ZeroPadding:
    """The NVFP4 block scales' padding zeroed (dispatch.zero_nvfp4_padding) on a run's tensor."""

    def __init__(self, slot, dims):
        self.slot, self.dims = slot, dims

    def __call__(self, tensors, ptrs):
        zero_nvfp4_padding(tensors[self.slot], *self.dims)


class _Launch:
    """One recorded launch with its pointer arguments turned into slots: `fixed` the argument
    list with constants in place, `slots` (position, slot, dtype) the tensors a run supplies,
    `descs` (position, slot, descriptor_params) the TMA descriptors rebuilt over them."""

    def __init__(self, launches, key, grid, args, constexprs, options, slots, descs):
        self.launches, self.key, self.grid = launches, key, grid
        self.fixed, self.constexprs, self.options = list(args), constexprs, options
        for pos, _, _ in slots + descs:  # (a plan keeps none of the planning call's inputs alive)
            self.fixed[pos] = None
        self.slots, self.descs = slots, descs
        kernel = launches.compiled(key) if launches.direct else None
        self.kernel = kernel[launcher.grid3(grid)] if kernel is not None else None
        self.tail = tuple(constexprs.values())

    def __call__(self, tensors: Sequence[Optional[torch.Tensor]], ptrs: Sequence[int]):
        args = self.fixed.copy()
        if self.kernel is not None:  # the compiled kernel: addresses as ints (no pointer lookup)
            for pos, slot, _ in self.slots:
                args[pos] = ptrs[slot]
            if self.descs:
                for pos, slot, params in self.descs:
                    args[pos] = rebased(params, ptrs[slot])
            self.kernel(*args, *self.tail)
            return
        for pos, slot, dtype in self.slots:  # the interpreter: tensors (views in the recorded dtype)
            t = tensors[slot]
            args[pos] = t if t.dtype == dtype else t.view(dtype)
        self.launches.run(self.key, self.grid, args, self.constexprs, self.options)


class CallPlan:
    """A recorded call of `fn`; run() replays it (module docstring). `result` is the planning
    call's own (out, lse)."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict):
        if fn not in _LEADING:
            raise TypeError(f"attnquant.plan takes one of attnquant's public attention functions, got {fn!r}")
        self.fn = fn
        arguments = inspect.signature(fn).bind(*args, **kwargs).arguments
        self._lead = len(_LEADING[fn])
        self._names = _LEADING[fn] + (PER_RUN if fn is not api.merge_attn_states else PER_RUN[:3])
        self._i_out = self._names.index("out")
        # what every run shares (non-tensor arguments, metadata); the per-layer tensors' defaults
        # (the plan keeps no leading tensor or output alive)
        self._fixed = {n: a for n, a in arguments.items() if n not in self._names}
        self._defaults = [None if i < self._lead or i == self._i_out else arguments.get(n)
                          for i, n in enumerate(self._names)]
        recorder = _Recorder()
        launcher.RECORDERS.append(recorder)
        try:
            self.result = fn(*args, **kwargs)
        finally:
            launcher.RECORDERS.pop()
        out, lse = self.result
        self._out_spec = (tuple(out.shape), out.dtype, out.device)
        self._lse_spec = (tuple(lse.shape), lse.device) if lse is not None else None
        planned = [arguments.get(n) for n in self._names]
        planned[self._i_out] = out
        self._sigs = [_signature(t) if isinstance(t, torch.Tensor) else t for t in planned]
        self._kept = recorder.kept  # (alive as long as the plan: the replays pass their addresses)
        self.steps = self._bind(recorder, planned + [lse])
        self.direct = self.steps is not None

    def _bind(self, rec: _Recorder, tensors: list) -> Optional[List[tuple]]:
        """The recorded launches with every tensor argument placed: a slot of the run's
        tensors, or a constant (a tensor the call made, or fixed metadata). None when one
        cannot be placed, or when two of the run's tensors share an address (which would
        make the placement ambiguous)."""
        ptrs = [t.data_ptr() if isinstance(t, torch.Tensor) else None for t in tensors]
        slot_of = {p: i for i, p in enumerate(ptrs) if p is not None}
        if len(slot_of) != sum(p is not None for p in ptrs):
            return None
        constant = {t.data_ptr() for t in rec.kept}
        constant |= {t.data_ptr() for t in self._fixed.values() if isinstance(t, torch.Tensor)}
        if constant & set(slot_of):
            return None
        steps = []
        for kind, *step in rec.steps:
            if kind == "nvfp4":
                block_scale, *dims = step
                if block_scale.data_ptr() not in slot_of:
                    return None
                steps.append(_ZeroPadding(slot_of[block_scale.data_ptr()], dims))
                continue
            launches, key, grid, args, constexprs, options = step
            slots, descs = [], []
            for pos, a in enumerate(args):
                base = a if isinstance(a, torch.Tensor) else getattr(a, "base", None)
                if base is None:
                    continue
                ptr = base.data_ptr()
                if ptr in slot_of:
                    if base is a:
                        slots.append((pos, slot_of[ptr], a.dtype))
                    else:
                        descs.append((pos, slot_of[ptr], descriptor_params(a)))
                elif ptr not in constant:
                    return None
            steps.append(_Launch(launches, key, grid, args, constexprs, options, slots, descs))
        return steps

    def run(self, *tensors, **named) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The planned call on these tensors: the leading ones by position (q, k, v, or
        merge_attn_states' prefix_out, prefix_lse, suffix_out, suffix_lse), the per-layer ones
        by name (PER_RUN; omitted: the plan's; `out` omitted: a new one). Returns (out, lse) as
        the call does. A tensor whose dtype, shape, strides, device or 16-byte alignment differs
        from the plan's (or None where the plan had one) raises ValueError naming it, and nothing
        is written: make a new plan."""
        names = self._names
        if len(tensors) != self._lead:
            raise TypeError(f"run() takes the leading tensors {_LEADING[self.fn]} by position, got {len(tensors)}")
        given = list(tensors) + self._defaults[self._lead:]
        for name, t in named.items():
            i = names.index(name) if name in names else 0
            if i < self._lead:
                raise TypeError(f"run() got an unexpected argument {name!r} (a plan fixes everything but {names})")
            given[i] = t
        if given[self._i_out] is None:
            shape, dtype, device = self._out_spec
            given[self._i_out] = torch.empty(shape, dtype=dtype, device=device)
        for name, t, sig in zip(names, given, self._sigs):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
            if (_signature(t) if t is not None else None) != sig:
                raise ValueError(f"{name} differs from the planned call's (dtype, shape, strides, device and "
                                 f"16-byte alignment must match, None where it was None): make a new plan")
        if not self.direct:
            out, lse = self.fn(**self._fixed, **dict(zip(names, given)))
            return out, lse
        lse = torch.empty(self._lse_spec[0], dtype=torch.float32, device=self._lse_spec[1]) if self._lse_spec else None
        given.append(lse)
        out = given[self._i_out]
        if out.numel():
            ptrs = [t.data_ptr() if t is not None else 0 for t in given]
            with on_device(out.device):
                for step in self.steps:
                    step(given, ptrs)
        return out, lse


def plan(fn: Callable, *args, **kwargs) -> CallPlan:
    """Call `fn` (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache or
    merge_attn_states) with these arguments, validated as always, and keep what it launched
    for CallPlan.run to replay on other tensors of the same shapes. The call's own result is
    CallPlan.result."""
    return CallPlan(fn, args, kwargs)
