"""Host side of the portable kernel: its tile config and split count for a problem, and the
launch (the forward kernel; with split-KV, float32 partials merged by the combine kernel, which
quantizes once)."""

from __future__ import annotations

from typing import Optional

import torch

from ...problem import Attention, Problem, descale_strides, lse_strides, token_strides
from ...quant import PLAIN, OutputFormat
from ..combine import Partials, launch_combine
from ..constants import LOG2E
from ..epilogue import constexprs as epilogue_constexprs
from ..device import num_sms, on_device
from ..launcher import Launches, owned
from .config import FwdConfig, cdiv, forward_config, next_pow2, num_splits_heuristic, split_head_dim
from .forward import attn_fwd_kernel

_FORWARD = Launches(attn_fwd_kernel)


def config_for(p: Problem, interpret: bool) -> FwdConfig:
    """The tile config for this call (config.py)."""
    return forward_config(p.head_dim, p.head_dim_v, p.max_seqlen_q * p.group, interpret,
                          p.page_size if p.paged else 0, p.k.element_size())


def num_splits_for(p: Problem, cfg: FwdConfig, requested: int, interpret: bool) -> int:
    """The key splits: `requested` (0: the heuristic), at most one a key block."""
    key_blocks = cdiv(max(p.max_seqlen_k, 1), cfg.block_n)
    if requested == 0:
        device = p.q.device
        sms = 16 if interpret else num_sms(device.index if device.index is not None else torch.cuda.current_device())
        gather = p.paged and p.page_size < cfg.block_n
        requested = num_splits_heuristic(cdiv(max(p.max_seqlen_q, 1) * p.group, cfg.block_m) * p.batch * p.num_heads_kv,
                                         p.max_seqlen_k, cfg.block_n, sms, min_blocks_per_split=8 if gather else 16)
    return max(1, min(requested, key_blocks))


def launch(p: Problem, attn: Attention, fmt, out: torch.Tensor, lse: Optional[torch.Tensor], cfg: FwdConfig,
           num_splits: int, interpret: bool):
    """Run the portable forward on `p` into `out` (and `lse`); num_splits > 1: over key splits,
    merged (with the sinks) and quantized by the combine kernel."""
    f16_dots = cfg.f16_dots and p.fp8_kv
    pdl = cfg.pdl and num_splits > 1 and not interpret  # (no PDL in the interpreter)
    if interpret and p.q.dtype != torch.float16:
        # Triton 3.6's interpreter computes tl.dot wrongly for bf16 operands (values ~1e8), which
        # the kernel computes bf16 and FP8 inputs in: run it on float32 copies there, which hold
        # their values exactly (with fp16 dots, only a bf16 q's: the kernel scales it into fp16).
        if not f16_dots:
            p = p.with_inputs(p.q.float(), p.k.float(), p.v.float())
        elif p.q.dtype == torch.bfloat16:
            p = p.with_inputs(p.q.float(), p.k, p.v)
    q, k, v = p.q, p.k, p.v
    device = q.device
    block_da, block_db = split_head_dim(p.head_dim)
    block_dv = max(16, next_pow2(p.head_dim_v))
    m_tiles = cdiv(max(p.max_seqlen_q, 1) * p.group, cfg.block_m)
    split = num_splits > 1
    if split:  # float32 partials, token-major so the combine reads rows contiguously
        o_buf = owned(torch.empty((num_splits, p.num_tokens, p.num_heads, p.head_dim_v), dtype=torch.float32,
                                  device=device))
        l_buf = owned(torch.empty((num_splits, p.num_tokens, p.num_heads), dtype=torch.float32, device=device))
        tok_per_b = 0 if p.varlen else p.max_seqlen_q
        o_strides = (o_buf.stride(0), tok_per_b * o_buf.stride(1), o_buf.stride(1), o_buf.stride(2))
        l_strides = (l_buf.stride(0), tok_per_b * l_buf.stride(1), l_buf.stride(2), l_buf.stride(1))
        fwd_fmt = OutputFormat(PLAIN, torch.float32)
    else:
        o_buf, l_buf = out, (lse if lse is not None else out)
        o_strides = (0,) + token_strides(out, p.varlen)
        l_strides = (0,) + lse_strides(lse, p.varlen)
        fwd_fmt = fmt

    dummy = q  # stands in for pointer arguments a variant does not read
    opt = lambda t: t if t is not None else dummy  # noqa: E731
    args = (q, k, v, o_buf, l_buf, opt(fmt.scale), opt(fmt.block_scale), opt(p.block_table), opt(p.cu_seqlens_q),
            opt(p.cu_seqlens_k), opt(p.seqused_k), opt(p.sinks), opt(p.q_descale), opt(p.k_descale),
            opt(p.v_descale),
            *p.q_strides, *p.k_strides, *p.v_strides,
            *o_strides, *l_strides, *fwd_fmt.block_scale_strides,
            p.block_table.stride(0) if p.paged else 0, p.sinks.stride(0) if p.sinks is not None else 0,
            *descale_strides(p.q_descale), *descale_strides(p.k_descale), *descale_strides(p.v_descale),
            p.max_seqlen_q, p.max_seqlen_k, p.num_heads_kv, num_splits,
            attn.softmax_scale * LOG2E, attn.softmax_scale / attn.softcap if attn.softcap > 0 else 0.0,
            attn.softcap * LOG2E, max(attn.window_left, 0), max(attn.window_right, 0))
    constexprs = dict(
        GROUP=p.group, DV=p.head_dim_v,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_DA=block_da, BLOCK_DB=block_db, BLOCK_DV=block_dv,
        VARLEN_Q=p.cu_seqlens_q is not None, VARLEN_K=p.cu_seqlens_k is not None,
        HAS_SEQUSED=p.seqused_k is not None,
        PAGED=p.paged, PAGE_SIZE=p.page_size, BLOCK_PTR=cfg.block_ptr, F16_DOTS=f16_dots, LAUNCH_DEPENDENTS=pdl,
        WINDOW_LEFT=attn.window_left >= 0, WINDOW_RIGHT=attn.window_right >= 0, HAS_SOFTCAP=attn.softcap > 0,
        HAS_SINKS=p.sinks is not None and not split,
        HAS_Q_DESCALE=p.q_descale is not None, HAS_K_DESCALE=p.k_descale is not None,
        HAS_V_DESCALE=p.v_descale is not None,
        STORE_LSE=split or lse is not None,
        **epilogue_constexprs(fwd_fmt, interpret))
    with on_device(device):
        _FORWARD.launch(device.index, (m_tiles, p.batch * p.num_heads_kv, num_splits), args, constexprs,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if split:
            lb, lh, ls = lse_strides(lse, p.varlen)
            launch_combine(Partials(o_buf, (o_buf.stride(0), o_buf.stride(1), o_buf.stride(2)), l_buf,
                                    (l_buf.stride(0), l_buf.stride(1), l_buf.stride(2)), num_splits), None,
                           out, token_strides(out, p.varlen), lse, (lb, ls, lh), p.num_tokens, p.num_heads,
                           p.num_tokens if p.varlen else p.max_seqlen_q, p.head_dim_v, fmt, p.sinks, interpret, pdl)
