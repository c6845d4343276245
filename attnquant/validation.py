"""Argument checks of the public functions: each raises TypeError (a wrong type) or ValueError
(a wrong value) naming the argument, before anything is allocated or written. Values that
live on the device are never read (no host sync); lengths, tables and offsets are checked
only when they are CPU tensors.
"""

from __future__ import annotations

import numbers

import torch

from . import quant
from .kernels.portable.config import split_head_dim

FP8_INPUT = torch.float8_e4m3fn
# The kernels compute in float32 with softmax_scale * log2(e) and softcap * log2(e) folded into
# their constants: both must stay normal float32 numbers (a subnormal or infinite constant turns
# every score into 0, inf or NaN).
SCALE_RANGE = (2.0 ** -126, 2.0 ** 126)
SINK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_INTERPRET = None


def interpreting() -> bool:
    """Triton binds a kernel to its interpreter or its compiler when the kernel is decorated, at
    import (attnquant/__init__.py sets TRITON_INTERPRET first when there is no GPU), so the mode
    is read once (reading os.environ on every call cost ~3 us)."""
    global _INTERPRET
    if _INTERPRET is None:
        import os
        _INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _INTERPRET


def as_float(name, x) -> float:
    """A Python float from any real number but a bool (numpy scalars included, as flash-attn
    takes them)."""
    if type(x) is float:
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def as_int(name, x, lo=None) -> int:
    """A Python int from any integer but a bool (numpy integers included)."""
    if type(x) is int:  # (the common case, without the ABC check's ~1 us)
        pass
    elif isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    x = int(x)
    if lo is not None and x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    return x


def check_tensor(name, t, rank=None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be one of ({names}), got {t.dtype}")


def check_device(name, t, device):
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}: all tensors must be on one device")


def check_runs_here(name, device):
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"{name} is on {device}: attnquant runs on CUDA tensors "
                         "(CPU tensors only under TRITON_INTERPRET=1)")


def check_qkv(q, k, v, q_rank, kv_rank):
    """q, k, v: ranks, dtypes (bf16/fp16, or FP8 e4m3fn K/V, or all three FP8), one device, last
    dims contiguous, matching shapes, supported head dims."""
    check_tensor("q", q, q_rank, quant.INPUT_DTYPES + (FP8_INPUT,))
    check_tensor("k", k, kv_rank)
    check_tensor("v", v, kv_rank)
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must have one dtype (mixed K/V dtypes are not supported), got {k.dtype} and "
                        f"{v.dtype}")
    allowed = (FP8_INPUT,) if q.dtype == FP8_INPUT else (q.dtype, FP8_INPUT)
    device = q.device  # (each .device / .shape read builds a new object: read them once)
    for name, t in (("k", k), ("v", v)):
        if t.dtype not in allowed:
            what = "FP8 (float8_e4m3fn), as q is" if q.dtype == FP8_INPUT else f"q's dtype {q.dtype} or float8_e4m3fn"
            raise TypeError(f"{name} must be {what}, got {t.dtype}")
        check_device(name, t, device)
    check_runs_here("q", device)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got stride {t.stride(-1)}")
    qs, ks, vs = q.shape, k.shape, v.shape
    if ks[:-1] != vs[:-1]:
        raise ValueError(f"k and v must agree in all but the last dimension, got {tuple(ks)} and {tuple(vs)}")
    h, d = qs[-2], qs[-1]
    hkv, dk, dv = ks[-2], ks[-1], vs[-1]
    if dk != d:
        raise ValueError(f"k's head dim {dk} must equal q's head dim {d}")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"q's head count {h} must be a multiple of k/v's head count {hkv}")
    if split_head_dim(d) is None:
        raise ValueError(
            f"q/k head dim {d} is unsupported: expected a power of two in [16, 256] or a sum of two "
            "(e.g. 96 = 64 + 32, 192 = 128 + 64)"
        )
    if dv % 16 != 0 or not 16 <= dv <= 256:
        raise ValueError(f"v's head dim {dv} is unsupported: expected a multiple of 16 in [16, 256]")


def check_options(softmax_scale, causal, window_size, softcap, num_splits, return_lse, head_dim):
    """Validate the shared keyword arguments; returns them normalized to Python numbers:
    (softmax_scale (the default D**-0.5 filled in), window_size, softcap, num_splits)."""
    lo, hi = SCALE_RANGE
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    softmax_scale = as_float("softmax_scale", softmax_scale)
    if not lo <= softmax_scale <= hi:  # (NaN fails too)
        raise ValueError(f"softmax_scale must be in [2**-126, 2**126] (a normal float32, finite once "
                         f"multiplied by log2(e)), got {softmax_scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    softcap = as_float("softcap", softcap)
    if softcap != 0 and not (lo <= softcap <= hi and softmax_scale / softcap >= lo):
        raise ValueError(f"softcap must be 0 (off) or in [2**-126, 2**126] with softmax_scale / softcap >= 2**-126 "
                         f"(normal float32 constants), got softcap={softcap}, softmax_scale={softmax_scale}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    window_size = (as_int("window_size[0]", window_size[0]), as_int("window_size[1]", window_size[1]))
    if min(window_size) < -1:
        raise ValueError(f"window_size entries must be >= 0 or -1 (unbounded), got {window_size}")
    num_splits = as_int("num_splits", num_splits)
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0 = heuristic), got {num_splits}")
    return softmax_scale, window_size, softcap, num_splits


def check_sinks(sinks, num_heads, device):
    """sinks: None, or one logit per query head: a (H,) float tensor on the inputs' device."""
    if sinks is None:
        return
    check_tensor("sinks", sinks, 1, SINK_DTYPES)
    if sinks.shape[0] != num_heads:
        raise ValueError(f"sinks must have one logit per query head: shape ({num_heads},), got {tuple(sinks.shape)}")
    check_device("sinks", sinks, device)


def check_descales(q, k, v, q_descale, k_descale, v_descale, batch, num_heads_kv):
    """FP8 inputs' descales (SPEC "FP8 inputs"): float32, (B, Hkv) or one element, on the inputs'
    device, and only for an input that is FP8."""
    for name, t, x in (("q_descale", q, q_descale), ("k_descale", k, k_descale), ("v_descale", v, v_descale)):
        if x is None:
            continue
        if t.dtype != FP8_INPUT:
            raise ValueError(f"{name} is only for an FP8 (float8_e4m3fn) {name[0]}; {name[0]} is {t.dtype}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (float32), got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {x.dtype}")
        if not (x.numel() == 1 and x.dim() <= 1) and tuple(x.shape) != (batch, num_heads_kv):
            raise ValueError(f"{name} must have shape (B, Hkv) = {(batch, num_heads_kv)} or hold one element, got "
                             f"{tuple(x.shape)}")
        check_device(name, x, q.device)


def check_index_tensor(name, t, device, rank, shape0=None):
    check_tensor(name, t, rank, (torch.int32,))
    check_device(name, t, device)
    if shape0 is not None and t.shape[0] != shape0:
        raise ValueError(f"{name} must have {shape0} rows, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def check_block_table(block_table, device, batch, num_blocks, page_size):
    check_index_tensor("block_table", block_table, device, 2, batch)
    if page_size & (page_size - 1) or page_size > 1024:
        raise ValueError(f"the paged cache's page size (dim 1) must be a power of two <= 1024, got {page_size}")
    if block_table.device.type == "cpu" and block_table.numel():
        lo, hi = int(block_table.min()), int(block_table.max())
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"block_table entries must lie in [0, {num_blocks}), got [{lo}, {hi}]")


def check_lengths_on_host(name, lengths, limit):
    """Values of a length tensor can only be checked without a sync when it lives on the CPU."""
    if lengths.device.type == "cpu" and lengths.numel():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > limit:
            raise ValueError(f"{name} must lie in [0, {limit}], got values in [{lo}, {hi}]")


def check_cu_seqlens(name, cu, device, batch_plus_1, total, max_seqlen):
    check_index_tensor(name, cu, device, 1, batch_plus_1)
    if cu.device.type == "cpu":
        c = cu.tolist()
        d = [b - a for a, b in zip(c, c[1:])]
        if c[0] != 0 or min(d, default=0) < 0 or c[-1] > total:
            raise ValueError(f"{name} must start at 0, be non-decreasing and end <= {total}, got {c}")
        if max(d, default=0) > max_seqlen:
            raise ValueError(f"{name} has a sequence of {max(d)} tokens, more than its max_seqlen {max_seqlen}")


def check_out(out, shape, device):
    """A caller's `out`: the output's shape, on the inputs' device, contiguous in its last dim."""
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    check_device("out", out, device)
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last dimension")
