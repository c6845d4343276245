"""Public entry points: validate -> output format and allocation -> backend and tile config
-> launch -> (split-KV) combine.

Backend: on sm_90 prefill-sized calls the Hopper Gluon kernel takes (kernels/hopper), else
the portable Triton kernel; `backend=` / $ATTNQUANT_BACKEND force either (see _forward).

The three attention entry points describe their inputs as one `_Problem` (strides per
(batch, token, head), optional cu_seqlens / seqused / block table) and share
`_forward`; merge_attn_states runs the combine kernel alone. The launches sit in
functions registered as torch ops (attnquant::fwd, attnquant::merge) so that
torch.compile(fullgraph=True) sees them as opaque calls; eager calls skip the op
dispatcher. Nothing here reads a device value on the host: no synchronization, so the
calls are safe under CUDA-graph capture.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from . import quant
from .kernels.combine import combine_kernel
from .kernels.config import FwdConfig, cdiv, forward_config, next_pow2, num_sms, num_splits_heuristic, split_head_dim
from .kernels.forward import attn_fwd_kernel
from .kernels.hopper import launch as hopper

LOG2E = 1.4426950408889634

_FP8_PARAMS = {  # max finite, mantissa bits, exponent of the smallest normal
    torch.float8_e4m3fn: (448.0, 3, -6),
    torch.float8_e5m2: (57344.0, 2, -14),
}
# Output dtypes whose fp32 -> dtype conversion Triton's interpreter gets wrong (it truncates
# bf16 and does not carry an fp8 rounding into the exponent): the epilogue rounds them itself
# there (epilogue.round_to_fp8_grid). (mantissa bits, exponent of the smallest normal)
_EMULATED_ROUNDING = {**{dt: p[1:] for dt, p in _FP8_PARAMS.items()}, torch.bfloat16: (7, -126)}


# Triton binds a kernel to its interpreter or its compiler when the kernel is decorated, at
# import (attnquant/__init__.py sets TRITON_INTERPRET first when there is no GPU), so the mode
# is read once here too; reading os.environ on every call cost ~3 us a read.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreting() -> bool:
    return _INTERPRET


# ----------------------------------------------------------------------------------
# Validation helpers: each raises TypeError / ValueError naming the argument.
# ----------------------------------------------------------------------------------


def _check_tensor(name, t, rank=None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be one of ({names}), got {t.dtype}")


def _check_device(name, t, device):
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}: all tensors must be on one device")


def _check_qkv(q, k, v, q_rank, kv_rank):
    _check_tensor("q", q, q_rank, quant.INPUT_DTYPES)
    _check_tensor("k", k, kv_rank)
    _check_tensor("v", v, kv_rank)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        _check_device(name, t, q.device)
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _interpreting()):
        raise ValueError(
            f"q is on {q.device}: attnquant runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got stride {t.stride(-1)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree in all but the last dimension, got {tuple(k.shape)} and {tuple(v.shape)}")
    h, d = q.shape[-2], q.shape[-1]
    hkv, dk, dv = k.shape[-2], k.shape[-1], v.shape[-1]
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


# The kernels compute in float32 with softmax_scale * log2(e) and softcap * log2(e) folded into
# their constants: both must stay normal float32 numbers (a subnormal or infinite constant
# turns every score into 0, inf or NaN).
SCALE_RANGE = (2.0 ** -126, 2.0 ** 126)


def _as_float(name, x):
    """A Python float from any real number but a bool (numpy scalars included, as flash-attn
    takes them)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def _as_int(name, x, lo=None):
    """A Python int from any integer but a bool (numpy integers included)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    x = int(x)
    if lo is not None and x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    return x


def _check_options(softmax_scale, causal, window_size, softcap, num_splits, return_lse, head_dim):
    """Validate the shared keyword arguments; returns them normalized to Python numbers:
    (softmax_scale (the default D**-0.5 filled in), window_size, softcap, num_splits)."""
    lo, hi = SCALE_RANGE
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    softmax_scale = _as_float("softmax_scale", softmax_scale)
    if not lo <= softmax_scale <= hi:  # (NaN fails too)
        raise ValueError(f"softmax_scale must be in [2**-126, 2**126] (a normal float32, finite once "
                         f"multiplied by log2(e)), got {softmax_scale}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    softcap = _as_float("softcap", softcap)
    if softcap != 0 and not (lo <= softcap <= hi and softmax_scale / softcap >= lo):
        raise ValueError(f"softcap must be 0 (off) or in [2**-126, 2**126] with softmax_scale / softcap >= 2**-126 "
                         f"(normal float32 constants), got softcap={softcap}, softmax_scale={softmax_scale}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    window_size = (_as_int("window_size[0]", window_size[0]), _as_int("window_size[1]", window_size[1]))
    if min(window_size) < -1:
        raise ValueError(f"window_size entries must be >= 0 or -1 (unbounded), got {window_size}")
    num_splits = _as_int("num_splits", num_splits)
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0 = heuristic), got {num_splits}")
    return softmax_scale, window_size, softcap, num_splits


def _check_int(name, x, lo=0):
    return _as_int(name, x, lo)


def _check_index_tensor(name, t, device, rank, shape0=None):
    _check_tensor(name, t, rank, (torch.int32,))
    _check_device(name, t, device)
    if shape0 is not None and t.shape[0] != shape0:
        raise ValueError(f"{name} must have {shape0} rows, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def _check_block_table(block_table, device, batch, num_blocks, page_size):
    _check_index_tensor("block_table", block_table, device, 2, batch)
    if page_size & (page_size - 1) or page_size > 1024:
        raise ValueError(f"the paged cache's page size (dim 1) must be a power of two <= 1024, got {page_size}")
    if block_table.device.type == "cpu" and block_table.numel():
        lo, hi = int(block_table.min()), int(block_table.max())
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"block_table entries must lie in [0, {num_blocks}), got [{lo}, {hi}]")


def _check_lengths_on_host(name, lengths, limit):
    """Values of a length tensor can only be checked without a sync when it lives on the CPU."""
    if lengths.device.type == "cpu" and lengths.numel():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > limit:
            raise ValueError(f"{name} must lie in [0, {limit}], got values in [{lo}, {hi}]")


def _check_cu_seqlens(name, cu, device, batch_plus_1, total, max_seqlen):
    _check_index_tensor(name, cu, device, 1, batch_plus_1)
    if cu.device.type == "cpu":
        c = cu.tolist()
        d = [b - a for a, b in zip(c, c[1:])]
        if c[0] != 0 or min(d, default=0) < 0 or c[-1] > total:
            raise ValueError(f"{name} must start at 0, be non-decreasing and end <= {total}, got {c}")
        if max(d, default=0) > max_seqlen:
            raise ValueError(f"{name} has a sequence of {max(d)} tokens, more than its max_seqlen {max_seqlen}")


# ----------------------------------------------------------------------------------
# The problem description shared by all entry points, and the launcher.
# ----------------------------------------------------------------------------------


@dataclass
class _Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    batch: int
    num_heads: int
    num_heads_kv: int
    head_dim: int
    head_dim_v: int
    max_seqlen_q: int
    max_seqlen_k: int
    q_strides: Tuple[int, int, int]  # (batch, token, head)
    k_strides: Tuple[int, int, int]  # (batch or page, token, head)
    v_strides: Tuple[int, int, int]
    out_shape: Tuple[int, ...]  # (B, Sq, H, Dv) or (total_q, H, Dv)
    lse_shape: Tuple[int, ...]  # (B, H, Sq) or (H, total_q)
    varlen: bool
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    seqused_k: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None
    page_size: int = 1

    @property
    def num_tokens(self) -> int:  # rows of the output, batch and sequence flattened
        return self.out_shape[0] if self.varlen else self.batch * self.max_seqlen_q


def _make_problem(q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
                  block_table=None) -> _Problem:
    """Describe validated inputs: q (B, Sq, H, D) or packed (total_q, H, D); k/v batched,
    packed, or paged (num_blocks, page_size, Hkv, *) when block_table is given."""
    varlen = q.dim() == 3
    paged = block_table is not None
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    h, d = q.shape[-2], q.shape[-1]
    hkv, dv = v.shape[-2], v.shape[-1]
    if paged or not varlen:
        k_strides, v_strides = tuple(k.stride()[:3]), tuple(v.stride()[:3])
    else:
        k_strides, v_strides = (0,) + tuple(k.stride()[:2]), (0,) + tuple(v.stride()[:2])
    if varlen:
        q_strides, out_shape, lse_shape = (0,) + tuple(q.stride()[:2]), (q.shape[0], h, dv), (h, q.shape[0])
    else:
        q_strides, out_shape, lse_shape = tuple(q.stride()[:3]), (batch, max_seqlen_q, h, dv), (batch, h, max_seqlen_q)
    return _Problem(q, k, v, batch, h, hkv, d, dv, max_seqlen_q, max_seqlen_k, q_strides, k_strides, v_strides,
                    out_shape, lse_shape, varlen, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table,
                    k.shape[1] if paged else 1)


def _token_strides(t: torch.Tensor, varlen: bool):
    """(batch, token, head) strides of an output-like tensor; batch stride 0 for varlen."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool):
    """(batch, head, token) strides of an LSE tensor: (B, H, Sq) or (H, total_q)."""
    if varlen:
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)


def _prepare_out(p: _Problem, fmt: quant.OutputFormat, out: Optional[torch.Tensor]) -> torch.Tensor:
    shape = fmt.out_shape(p.out_shape)
    if out is None:
        return torch.empty(shape, dtype=fmt.dtype, device=p.q.device)
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    _check_device("out", out, p.q.device)
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in its last dimension")
    return out


def _epilogue_constexprs(fmt: quant.OutputFormat):
    fp8_max = _FP8_PARAMS[fmt.dtype][0] if fmt.dtype in _FP8_PARAMS else 0.0
    mant, emin = _EMULATED_ROUNDING.get(fmt.dtype, (0, 0))
    return dict(
        OUT_KIND=fmt.kind, FP8_MAX=fp8_max, ROUND_MANT=mant, ROUND_EMIN=emin,
        EMULATE_ROUNDING=_interpreting() and (fmt.dtype in _EMULATED_ROUNDING or fmt.kind == quant.NVFP4),
        GROUP_SIZE=max(fmt.group_size, 1), UE8M0=fmt.ue8m0,
    )


def _portable_config(p: _Problem, interpret: bool) -> FwdConfig:
    """The portable kernel's tile config for this call (kernels/config.py)."""
    return forward_config(p.head_dim, p.head_dim_v, p.max_seqlen_q * (p.num_heads // p.num_heads_kv), interpret,
                          p.page_size if p.block_table is not None else 0)


def _forward(p: _Problem, fmt: quant.OutputFormat, out: torch.Tensor, softmax_scale, causal, window_size,
             softcap, num_splits, return_lse, config: Optional[FwdConfig] = None, backend: Optional[str] = "triton"):
    """Host planning (backend, tile config, split count, LSE allocation), then the registered op.

    backend: 'auto' (the Hopper Gluon kernel where it applies, else the portable one),
    'gluon' (that kernel or a ValueError saying why not), 'triton' (the portable kernel);
    None reads $ATTNQUANT_BACKEND (default 'auto').
    """
    choice = hopper.requested_backend(backend)
    lse = torch.empty(p.lse_shape, dtype=torch.float32, device=p.q.device) if return_lse else None
    if out.numel() == 0:  # an empty problem (B, Sq, H or total_q 0): nothing to launch
        return out, lse
    group = p.num_heads // p.num_heads_kv
    left, right = window_size
    if causal:
        right = 0
    interpret = _interpreting()
    if choice == "gluon":  # (no portable planning: host time is what an eager call pays for)
        why_not = hopper.unsupported_reason(p, causal, window_size, softcap, num_splits, interpret)
        if why_not is not None:
            raise ValueError(f"backend='gluon' cannot run this call: {why_not}")
        use_gluon, num_splits, cfg = True, 1, None
    else:
        paged = p.block_table is not None
        cfg = config or _portable_config(p, interpret)
        m_tiles = cdiv(max(p.max_seqlen_q, 1) * group, cfg.block_m)
        key_blocks = cdiv(max(p.max_seqlen_k, 1), cfg.block_n)
        requested_splits = num_splits
        if num_splits == 0:
            device = p.q.device
            sms = 16 if interpret else num_sms(device.index if device.index is not None else torch.cuda.current_device())
            gather = paged and p.page_size < cfg.block_n
            num_splits = num_splits_heuristic(m_tiles * p.batch * p.num_heads_kv, p.max_seqlen_k, cfg.block_n, sms,
                                              min_blocks_per_split=8 if gather else 16)
        num_splits = max(1, min(num_splits, key_blocks))
        use_gluon = False
        if choice == "auto" and config is None and p.max_seqlen_q * group > 64 and num_splits == 1:
            # decode-sized tiles and calls the split heuristic splits stay portable, unchecked
            # (the decode path's host time is what eager decode pays for)
            use_gluon = hopper.unsupported_reason(p, causal, window_size, softcap, requested_splits, interpret) is None
    scale = softmax_scale
    tile = ([0, 0, 0, 0, 0, 1] if cfg is None else  # (Gluon picks its tiles; _run plans a fallback if needed)
            [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, int(cfg.block_ptr), int(use_gluon)])
    # Under torch.compile the call goes through the registered op (which rebuilds the problem
    # from its tensor arguments); eagerly the op's dispatcher would add ~150 us of host time
    # per call, so the planned problem goes straight to _run.
    if torch.compiler.is_compiling():
        torch.ops.attnquant.fwd(p.q, p.k, p.v, out, lse, fmt.scale, fmt.block_scale, p.block_table, p.cu_seqlens_q,
                                p.cu_seqlens_k, p.seqused_k, p.max_seqlen_q, p.max_seqlen_k, num_splits, left, right,
                                scale, float(softcap), tile, [fmt.group_size, int(fmt.ue8m0), *fmt.block_scale_strides])
    else:
        _run(p, fmt, out, lse, num_splits, left, right, scale, float(softcap), tile)
    return out, lse


def _format_from_op_args(out, output_scale, output_block_scale, group) -> quant.OutputFormat:
    """Rebuild the validated OutputFormat inside an op from its tensor / int-list arguments."""
    if out.dtype in quant.NVFP4_DTYPES:
        return quant.OutputFormat(quant.NVFP4, out.dtype, scale=output_scale, block_scale=output_block_scale,
                                  group_size=group[0], block_scale_strides=tuple(group[2:6]))
    if output_block_scale is not None:
        return quant.OutputFormat(quant.FP8_GROUP, out.dtype, block_scale=output_block_scale, group_size=group[0],
                                  ue8m0=bool(group[1]), block_scale_strides=tuple(group[2:6]))
    if output_scale is not None:
        return quant.OutputFormat(quant.FP8_STATIC, out.dtype, scale=output_scale)
    return quant.OutputFormat(quant.PLAIN, out.dtype)


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: Optional[torch.Tensor],
         output_scale: Optional[torch.Tensor], output_block_scale: Optional[torch.Tensor],
         block_table: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
         cu_seqlens_k: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor], max_seqlen_q: int,
         max_seqlen_k: int, num_splits: int, window_left: int, window_right: int, softmax_scale: float,
         softcap: float, tile: List[int], group: List[int]) -> None:
    """The forward as a torch op (torch.compile sees one opaque call that writes out, lse and
    the per-group scales): the problem and the format rebuilt from tensor / int arguments,
    then _run. group: (G, ue8m0, block-scale strides per batch, token, head, group)."""
    p = _make_problem(q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table)
    fmt = _format_from_op_args(out, output_scale, output_block_scale, group)
    _run(p, fmt, out, lse, num_splits, window_left, window_right, softmax_scale, softcap, tile)


def _run(p: _Problem, fmt: quant.OutputFormat, out: torch.Tensor, lse: Optional[torch.Tensor], num_splits: int,
         window_left: int, window_right: int, softmax_scale: float, softcap: float, tile: List[int]) -> None:
    """Launch the planned forward. tile: (block_m, block_n, warps, stages, block_ptr, gluon)."""
    out = _nvfp4_prologue(fmt, out, p.num_tokens, p.num_heads, p.head_dim_v)
    # The Hopper fast path: host planning checked that it applies, except (under torch.compile)
    # the pointers' alignment, known only here.
    if tile[5] and hopper.aligned_for_tma(p.q, p.k, p.v):
        args = (p, fmt, out, lse, window_right == 0, softmax_scale, _epilogue_constexprs(fmt),
                _token_strides(out, p.varlen), _lse_strides(lse, p.varlen) if lse is not None else (0, 0, 0))
        if p.q.device.index == torch.cuda.current_device():  # (entering torch.cuda.device costs host time)
            hopper.launch(*args)
        else:
            with torch.cuda.device(p.q.device):
                hopper.launch(*args)
        return
    if tile[0]:
        cfg = FwdConfig(tile[0], tile[1], tile[2], tile[3], bool(tile[4]))
    else:  # forced Gluon, whose pointers (seen only here under torch.compile) are not 16-byte aligned
        cfg = _portable_config(p, _interpreting())
    if _interpreting() and p.q.dtype == torch.bfloat16:
        # Triton 3.6's interpreter computes tl.dot wrongly for bf16 operands (values ~1e8): run the
        # kernel on float32 copies there, which hold bf16 values exactly.
        p = _make_problem(p.q.float(), p.k.float(), p.v.float(), p.max_seqlen_q, p.max_seqlen_k, p.cu_seqlens_q,
                          p.cu_seqlens_k, p.seqused_k, p.block_table)
    _launch_kernels(p, fmt, out, lse, num_splits, window_left, window_right, softmax_scale, softcap, cfg)


_fwd_op = torch.library.custom_op("attnquant::fwd", mutates_args=("out", "lse", "output_block_scale"))(_fwd)


@_fwd_op.register_fake
def _fwd_op_fake(q, k, v, out, lse, output_scale, output_block_scale, block_table, cu_seqlens_q, cu_seqlens_k,
                 seqused_k, max_seqlen_q, max_seqlen_k, num_splits, window_left, window_right, softmax_scale,
                 softcap, tile, group):
    return None


def _launch_kernels(p: _Problem, fmt: quant.OutputFormat, out, lse, num_splits, left, right, scale, softcap,
                    cfg: FwdConfig):
    q, k, v = p.q, p.k, p.v
    device = q.device
    group = p.num_heads // p.num_heads_kv
    block_da, block_db = split_head_dim(p.head_dim)
    block_dv = max(16, next_pow2(p.head_dim_v))
    m_tiles = cdiv(max(p.max_seqlen_q, 1) * group, cfg.block_m)
    split = num_splits > 1
    if split:  # float32 partials, token-major so the combine reads rows contiguously
        tokens = p.num_tokens
        o_buf = torch.empty((num_splits, tokens, p.num_heads, p.head_dim_v), dtype=torch.float32, device=device)
        l_buf = torch.empty((num_splits, tokens, p.num_heads), dtype=torch.float32, device=device)
        tok_per_b = 0 if p.varlen else p.max_seqlen_q
        o_strides = (o_buf.stride(0), tok_per_b * o_buf.stride(1), o_buf.stride(1), o_buf.stride(2))
        l_strides = (l_buf.stride(0), tok_per_b * l_buf.stride(1), l_buf.stride(2), l_buf.stride(1))
        fwd_fmt = quant.OutputFormat(quant.PLAIN, torch.float32)
    else:
        o_buf, l_buf = out, (lse if lse is not None else out)
        o_strides = (0,) + _token_strides(out, p.varlen)
        l_strides = (0,) + (_lse_strides(lse, p.varlen) if lse is not None else (0, 0, 0))
        fwd_fmt = fmt

    dummy = q  # stands in for pointer arguments a variant does not read
    out_scale = fmt.scale if fmt.scale is not None else dummy
    block_scale = fmt.block_scale if fmt.block_scale is not None else dummy
    paged = p.block_table is not None
    with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
        attn_fwd_kernel[(m_tiles, p.batch * p.num_heads_kv, num_splits)](
            q, k, v, o_buf, l_buf, out_scale, block_scale,
            p.block_table if paged else dummy,
            p.cu_seqlens_q if p.cu_seqlens_q is not None else dummy,
            p.cu_seqlens_k if p.cu_seqlens_k is not None else dummy,
            p.seqused_k if p.seqused_k is not None else dummy,
            *p.q_strides, *p.k_strides, *p.v_strides,
            *o_strides, *l_strides, *fwd_fmt.block_scale_strides,
            p.block_table.stride(0) if paged else 0,
            p.max_seqlen_q, p.max_seqlen_k, p.num_heads_kv, num_splits,
            scale * LOG2E, scale / softcap if softcap > 0 else 0.0, softcap * LOG2E,
            max(left, 0), max(right, 0),
            GROUP=group, DV=p.head_dim_v,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_DA=block_da, BLOCK_DB=block_db, BLOCK_DV=block_dv,
            VARLEN_Q=p.cu_seqlens_q is not None, VARLEN_K=p.cu_seqlens_k is not None,
            HAS_SEQUSED=p.seqused_k is not None,
            PAGED=paged, PAGE_SIZE=p.page_size, BLOCK_PTR=cfg.block_ptr,
            WINDOW_LEFT=left >= 0, WINDOW_RIGHT=right >= 0, HAS_SOFTCAP=softcap > 0,
            STORE_LSE=split or lse is not None,
            **_epilogue_constexprs(fwd_fmt),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if split:
            ob, os_, oh = _token_strides(out, p.varlen)
            lb, lh, ls = _lse_strides(lse, p.varlen) if lse is not None else (0, 0, 0)
            _launch_combine(
                (o_buf, o_buf.stride(0), o_buf.stride(1), o_buf.stride(2)),
                (l_buf, l_buf.stride(0), l_buf.stride(1), l_buf.stride(2)), num_splits, None,
                out, (ob, os_, oh), lse, (lb, ls, lh), p.num_tokens, p.num_heads,
                p.num_tokens if p.varlen else p.max_seqlen_q, p.head_dim_v, fmt)


def _nvfp4_prologue(fmt: quant.OutputFormat, out: torch.Tensor, num_tokens: int, num_heads: int,
                    head_dim_v: int) -> torch.Tensor:
    """NVFP4 only: zero the block-scale padding the kernels do not reach (SPEC: padding rows and
    columns read 0; rows past T exist when T % 128 != 0, columns when H * Dv / 16 % 4 != 0), and
    hand the kernels out's bytes (a float4_e2m1fn_x2 tensor viewed as uint8)."""
    if fmt.kind != quant.NVFP4:
        return out
    bs = fmt.block_scale.view(torch.uint8)
    if (num_heads * head_dim_v // quant.NVFP4_BLOCK) % 4:
        bs.zero_()
    elif num_tokens % 128:
        bs[num_tokens // 128 * 128:].zero_()  # the last 128-row tile: one contiguous piece
    return out.view(torch.uint8)


def _launch_combine(parts, parts_lse, num_splits, suffix, out, out_strides, lse, lse_strides, num_tokens,
                    num_heads, tokens_per_batch, head_dim_v, fmt: quant.OutputFormat):
    """Merge `num_splits` partials (tensor, split/token/head strides) plus an optional suffix
    ((out, token, head strides), (lse, token, head strides)) into `out` in format `fmt`."""
    dummy = parts[0]
    rows = num_tokens * num_heads
    block_r = 16
    (so, so_t, so_h), (sl, sl_t, sl_h) = suffix if suffix is not None else ((dummy, 0, 0), (dummy, 0, 0))
    combine_kernel[(cdiv(rows, block_r),)](
        parts[0], parts_lse[0], so, sl, out, lse if lse is not None else dummy,
        fmt.scale if fmt.scale is not None else dummy,
        fmt.block_scale if fmt.block_scale is not None else dummy,
        rows, num_heads, tokens_per_batch, num_splits,
        *parts[1:], *parts_lse[1:], so_t, so_h, sl_t, sl_h,
        *out_strides, *lse_strides, *fmt.block_scale_strides,
        DV=head_dim_v, BLOCK_R=block_r, BLOCK_DV=max(16, next_pow2(head_dim_v)),
        HAS_SUFFIX=suffix is not None, STORE_LSE=lse is not None,
        **_epilogue_constexprs(fmt),
        num_warps=4,
    )


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _resolve(p: _Problem, out, out_dtype, output_scale, output_block_scale, ue8m0):
    tokens = p.out_shape[:-2]  # (B, Sq) or (total_q,)
    return quant.resolve_output_format(p.q.dtype, p.q.device, out, out_dtype, output_scale, output_block_scale,
                                       ue8m0, tokens, p.num_heads, p.head_dim_v)


# ----------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    num_splits=0, return_lse=False, out=None, out_dtype=None, output_scale=None,
                    output_block_scale=None, ue8m0=False, *, backend: Optional[str] = None,
                    _config: Optional[FwdConfig] = None):
    """Attention of q (B, Sq, H, D) over k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv).

    Returns (out, lse): out (B, Sq, H, Dv) in the format the arguments ask for
    (SPEC.md, "Output formats"), lse (B, H, Sq) float32 or None. backend: 'auto' | 'gluon'
    | 'triton' (None: $ATTNQUANT_BACKEND, default 'auto'), see _forward.
    """
    _check_qkv(q, k, v, 4, 4)
    softmax_scale, window_size, softcap, num_splits = _check_options(
        softmax_scale, causal, window_size, softcap, num_splits, return_lse, q.shape[-1])
    b, sq, h, d = q.shape
    _, sk, hkv, dv = v.shape
    if k.shape[0] != b:
        raise ValueError(f"k/v batch {k.shape[0]} must equal q's batch {b}")
    p = _make_problem(q, k, v, sq, sk)
    fmt = _resolve(p, out, out_dtype, output_scale, output_block_scale, ue8m0)
    out = _prepare_out(p, fmt, out)
    return _forward(p, fmt, out, softmax_scale, causal, window_size, softcap, num_splits, return_lse, _config,
                    backend)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k=None,
                           block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, num_splits=0, return_lse=False, out=None, out_dtype=None,
                           output_scale=None, output_block_scale=None, ue8m0=False, *,
                           backend: Optional[str] = None, _config: Optional[FwdConfig] = None):
    """Attention over packed sequences: q (total_q, H, D); k, v (total_k, Hkv, *), or paged
    caches (num_blocks, page_size, Hkv, *) with `block_table` (B, max_blocks) int32.

    Sequence b has queries cu_seqlens_q[b]:cu_seqlens_q[b+1] and keys from
    cu_seqlens_k (or its first seqused_k[b] keys). Returns (out (total_q, H, Dv), lse (H, total_q)).
    backend: as for flash_attn_func.
    """
    paged = block_table is not None
    _check_qkv(q, k, v, 3, 4 if paged else 3)
    softmax_scale, window_size, softcap, num_splits = _check_options(
        softmax_scale, causal, window_size, softcap, num_splits, return_lse, q.shape[-1])
    max_seqlen_q = _check_int("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_int("max_seqlen_k", max_seqlen_k)
    total_q = q.shape[0]
    _check_tensor("cu_seqlens_q", cu_seqlens_q, 1, (torch.int32,))
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0:
        raise ValueError("cu_seqlens_q must hold batch + 1 >= 1 entries, got none")
    if max_seqlen_q > total_q:
        raise ValueError(f"max_seqlen_q={max_seqlen_q} exceeds the {total_q} query tokens in q")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, batch + 1, total_q, max_seqlen_q)
    if paged:
        num_blocks, page_size = k.shape[0], k.shape[1]
        _check_block_table(block_table, q.device, batch, num_blocks, page_size)
        capacity = block_table.shape[1] * page_size
        if max_seqlen_k > capacity:
            raise ValueError(f"max_seqlen_k={max_seqlen_k} exceeds the block table's capacity {capacity}")
    else:
        capacity = k.shape[0]
        if max_seqlen_k > capacity:
            raise ValueError(f"max_seqlen_k={max_seqlen_k} exceeds the {capacity} key tokens in k")
    if cu_seqlens_k is None:
        if seqused_k is None:
            raise ValueError("cu_seqlens_k may be None only when seqused_k gives the key lengths")
        if not paged:
            raise ValueError("cu_seqlens_k is required unless k/v are paged (block_table given)")
    else:
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, batch + 1,
                          capacity if not paged else batch * capacity, max_seqlen_k)
    if seqused_k is not None:
        _check_index_tensor("seqused_k", seqused_k, q.device, 1, batch)
        _check_lengths_on_host("seqused_k", seqused_k, max_seqlen_k)
    p = _make_problem(q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q,
                      None if paged and seqused_k is not None else cu_seqlens_k, seqused_k, block_table)
    fmt = _resolve(p, out, out_dtype, output_scale, output_block_scale, ue8m0)
    out = _prepare_out(p, fmt, out)
    return _forward(p, fmt, out, softmax_scale, causal, window_size, softcap, num_splits, return_lse, _config,
                    backend)


def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table=None, softmax_scale=None,
                            causal=True, window_size=(-1, -1), softcap=0.0, num_splits=0, return_lse=False,
                            out=None, out_dtype=None, output_scale=None, output_block_scale=None, ue8m0=False,
                            *, _config: Optional[FwdConfig] = None):
    """Decode / chunked prefill against a KV cache: q (B, Sq, H, D); caches (B, Sk_max, Hkv, *)
    or paged (num_blocks, page_size, Hkv, *) with block_table (B, max_blocks) int32.

    Sequence b attends to its first cache_seqlens[b] keys (int32 (B,) tensor or an int),
    bottom-right causal by default. Returns (out (B, Sq, H, Dv), lse (B, H, Sq)).
    """
    paged = block_table is not None
    _check_qkv(q, k_cache, v_cache, 4, 4)
    softmax_scale, window_size, softcap, num_splits = _check_options(
        softmax_scale, causal, window_size, softcap, num_splits, return_lse, q.shape[-1])
    b, sq = q.shape[:2]
    if paged:
        num_blocks, page_size = k_cache.shape[0], k_cache.shape[1]
        _check_block_table(block_table, q.device, b, num_blocks, page_size)
        capacity = block_table.shape[1] * page_size
    else:
        if k_cache.shape[0] != b:
            raise ValueError(f"k_cache batch {k_cache.shape[0]} must equal q's batch {b} (or pass block_table)")
        page_size, capacity = 1, k_cache.shape[1]
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        cache_seqlens = int(cache_seqlens)
        if not 0 <= cache_seqlens <= capacity:
            raise ValueError(f"cache_seqlens={cache_seqlens} must lie in [0, {capacity}]")
        cache_seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    _check_index_tensor("cache_seqlens", cache_seqlens, q.device, 1, b)
    _check_lengths_on_host("cache_seqlens", cache_seqlens, capacity)
    p = _make_problem(q, k_cache, v_cache, sq, capacity, seqused_k=cache_seqlens, block_table=block_table)
    fmt = _resolve(p, out, out_dtype, output_scale, output_block_scale, ue8m0)
    out = _prepare_out(p, fmt, out)
    return _forward(p, fmt, out, softmax_scale, causal, window_size, softcap, num_splits, return_lse, _config)


def _merge(prefix_out: torch.Tensor, prefix_lse: torch.Tensor, suffix_out: torch.Tensor, suffix_lse: torch.Tensor,
           out: torch.Tensor, lse: Optional[torch.Tensor], output_scale: Optional[torch.Tensor],
           output_block_scale: Optional[torch.Tensor], group: List[int]) -> None:
    """merge_attn_states as a torch op: writes out, lse and the per-group scales."""
    fmt = _format_from_op_args(out, output_scale, output_block_scale, group)
    t, h, dv = prefix_out.shape
    out = _nvfp4_prologue(fmt, out, t, h, dv)
    with torch.cuda.device(out.device) if out.device.type == "cuda" else _nullcontext():
        _launch_combine(
            (prefix_out, 0, prefix_out.stride(0), prefix_out.stride(1)),
            (prefix_lse, 0, prefix_lse.stride(1), prefix_lse.stride(0)), 1,
            ((suffix_out, suffix_out.stride(0), suffix_out.stride(1)),
             (suffix_lse, suffix_lse.stride(1), suffix_lse.stride(0))),
            out, (0, out.stride(0), out.stride(1)), lse,
            (0, lse.stride(1), lse.stride(0)) if lse is not None else (0, 0, 0),
            t, h, max(t, 1), dv, fmt)


_merge_op = torch.library.custom_op("attnquant::merge", mutates_args=("out", "lse", "output_block_scale"))(_merge)


@_merge_op.register_fake
def _merge_op_fake(prefix_out, prefix_lse, suffix_out, suffix_lse, out, lse, output_scale, output_block_scale,
                   group):
    return None


def merge_attn_states(prefix_out, prefix_lse, suffix_out, suffix_lse, return_lse=False, out=None, out_dtype=None,
                      output_scale=None, output_block_scale=None, ue8m0=False):
    """Merge two partial attentions over disjoint key sets by their LSEs (vLLM layout):
    outputs (T, H, Dv) in bf16/fp16/fp32, LSEs (H, T) float32. The merged output is
    quantized like the forward's (SPEC.md, "Output formats"). Returns (out (T, H, Dv),
    lse (H, T) or None). A row neither part saw (both LSEs -inf) gives 0 and LSE -inf."""
    _check_tensor("prefix_out", prefix_out, 3, quant.PLAIN_DTYPES)
    _check_tensor("suffix_out", suffix_out, 3, quant.PLAIN_DTYPES)
    _check_tensor("prefix_lse", prefix_lse, 2, (torch.float32,))
    _check_tensor("suffix_lse", suffix_lse, 2, (torch.float32,))
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    device = prefix_out.device
    for name, t in (("suffix_out", suffix_out), ("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but prefix_out is on {device}")
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise ValueError(f"prefix_out is on {device}: attnquant runs on CUDA tensors")
    if suffix_out.shape != prefix_out.shape or suffix_out.dtype != prefix_out.dtype:
        raise ValueError(f"suffix_out {tuple(suffix_out.shape)} {suffix_out.dtype} must match prefix_out "
                         f"{tuple(prefix_out.shape)} {prefix_out.dtype}")
    t, h, dv = prefix_out.shape
    for name, x in (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)):
        if tuple(x.shape) != (h, t):
            raise ValueError(f"{name} must have shape (H, T) = {(h, t)}, got {tuple(x.shape)}")
    for name, x in (("prefix_out", prefix_out), ("suffix_out", suffix_out)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if not 1 <= dv <= 256:
        raise ValueError(f"the head dim {dv} of prefix_out is unsupported: expected at most 256")
    fmt = quant.resolve_output_format(prefix_out.dtype, device, out, out_dtype, output_scale, output_block_scale,
                                      ue8m0, (t,), h, dv)
    shape = fmt.out_shape((t, h, dv))
    if out is None:
        out = torch.empty(shape, dtype=fmt.dtype, device=device)
    elif tuple(out.shape) != shape or out.device != device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {shape} tensor on {device}, contiguous in its last dimension")
    lse = torch.empty((h, t), dtype=torch.float32, device=device) if return_lse else None
    if out.numel() == 0:
        return out, lse
    run = torch.ops.attnquant.merge if torch.compiler.is_compiling() else _merge
    run(prefix_out, prefix_lse, suffix_out, suffix_lse, out, lse, fmt.scale, fmt.block_scale,
        [fmt.group_size, int(fmt.ue8m0), *fmt.block_scale_strides])
    return out, lse
