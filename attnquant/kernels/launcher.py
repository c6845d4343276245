"""Launching a kernel with little host time: Triton's JIT dispatch once per specialization, the
compiled kernel directly after that.

Triton's dispatch binds every argument, computes what it specializes the kernel on and looks the
result up in its cache on every call: for the portable forward's 85 arguments that is ~20 µs of
host time (measured on the CPU of the development machine, binder and cache key alone), the
combine kernel's ~12 µs, paid on every eager call (decode pays both). `Launches` keeps the
CompiledKernel that dispatch returned under a key made of everything the compilation depended
on, and launches it directly when the key comes again:

- the constexprs and the compile options (num_warps, num_stages, maxnreg), and the device;
- per tensor argument, its dtype and whether its address is 16-byte aligned (what Triton
  specializes pointers on);
- per int argument, whether it is 1, a multiple of 16, and in 32-bit range (Triton specializes
  ints on == 1 and % 16 unless told not to, and types them i32 or i64);
- per float argument its type only (always fp32), per TMA descriptor its dtype and block.

tests/test_launcher.py checks this key against Triton's own specialization of each kernel: two
launches Triton would compile differently never share a key. Under the interpreter every launch
goes to the interpreted function as it is.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

_I32 = 2 ** 31


def _spec(a):
    """What Triton's compilation depends on in argument `a` (see the module docstring)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if type(a) is int:
        return a == 1, a % 16 == 0, -_I32 <= a < _I32
    if type(a) is float:
        return float
    base = getattr(a, "base", None)  # a TMA descriptor: its dtype and block (its layout follows)
    if base is not None:
        return base.dtype, tuple(a.block_shape)
    return type(a), a


class Launches:
    """The compiled variants of one @triton.jit / @gluon.jit kernel `fn`, by launch key."""

    def __init__(self, fn):
        self.fn = fn
        self.direct = hasattr(fn, "arg_names") and hasattr(fn, "device_caches")  # (not interpreted)
        self._compiled: Dict[tuple, object] = {}

    def key(self, device: int, args: Sequence, constexprs: dict, options: dict) -> tuple:
        """The launch key of these arguments (args: those the key must cover, in any order).
        _spec's rule, with ints and plain tensors (most of the arguments) written inline: a
        function call per argument was a third of the key's time (55 arguments: 12.8 -> 8.2 µs
        on the development machine's CPU)."""
        return (device, *constexprs.values(), *options.values(),
                *[(a == 1, a % 16 == 0, -_I32 <= a < _I32) if type(a) is int
                  else (a.dtype, a.data_ptr() % 16 == 0) if type(a) is torch.Tensor else _spec(a) for a in args])

    def __contains__(self, key) -> bool:
        return key in self._compiled

    def run(self, key, grid, args: Sequence, constexprs: dict, options: dict) -> None:
        """Launch fn on `grid` with `args` (every runtime argument, in order) and `constexprs`
        (the constexpr parameters, in the kernel's order, after the runtime ones), on the current
        device and stream; `key` from key() over the same call (None under the interpreter)."""
        if RECORDERS:  # (a plan being made: attnquant/replay.py)
            RECORDERS[-1].launched(self, key, grid, args, constexprs, options)
        if not self.direct:
            self.fn[grid](*args, **constexprs, **options)
            return
        kernel = self._compiled.get(key)
        if kernel is None:
            assert self.fn.arg_names[len(args):] == list(constexprs), "constexprs out of the kernel's order"
            self._compiled[key] = self.fn[grid](*args, **constexprs, **options)
            return
        kernel[grid3(grid)](*args, *constexprs.values())

    def compiled(self, key):
        """The compiled kernel a launch with `key` ran (None before one ran, or interpreted)."""
        return self._compiled.get(key)

    def launch(self, device: int, grid, args: Sequence, constexprs: dict, **options) -> None:
        """key() over all of `args`, then run()."""
        self.run(self.key(device, args, constexprs, options) if self.direct else None, grid, args, constexprs, options)


def grid3(grid) -> tuple:
    """A launch grid as the compiled kernel takes it: three dimensions."""
    return grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1


# Plans being made (attnquant/replay.py) record every launch here, innermost last.
RECORDERS: List = []


def owned(t: torch.Tensor) -> torch.Tensor:
    """Mark `t` as made by the call itself (scratch, or a constant built from host values): a
    plan may keep it and pass it to every replay. A tensor argument that is neither this nor
    one of the call's own arguments (a converted copy of an input, say) makes a plan replay
    the whole call instead."""
    if RECORDERS:
        RECORDERS[-1].owned(t)
    return t
