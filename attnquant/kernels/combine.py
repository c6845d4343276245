"""Merge of partial attentions by their LSEs, then the output epilogue, once.

Used after a split-KV forward (num_splits partials in one float32 workspace) and by
merge_attn_states (a prefix and a suffix partial in two tensors of any float dtype:
HAS_SUFFIX adds the second one). Each partial is an output normalized by its own
softmax denominator, with that denominator's LSE. For one output row,
    O = sum_s exp(lse_s - M) * O_s / sum_s exp(lse_s - M),   LSE = M + log(sum_s ...)
with M = max_s lse_s. A split that saw no key has lse -inf and weight 0 (+inf, which
some kernels write for empty rows, counts as -inf too); a row no split saw writes 0 and
LSE -inf; with learnable sinks (split-KV of a call that has them) each head's sink logit joins
the denominator once, here; a NaN LSE or a NaN in a partial output makes the row NaN (SPEC: non-finite values
are never hidden). The quantization happens here, after the merge,
through the same epilogue as the forward kernel.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .epilogue import constexprs as epilogue_constexprs, nan_max, store_output
from .launcher import Launches

COMBINE_ROWS = 16  # (token, head) rows a program merges


@triton.jit
def _load_lse(ptrs, row_ok):
    lse = tl.load(ptrs, mask=row_ok, other=float("-inf"))
    return tl.where(lse == float("inf"), float("-inf"), lse)


@triton.jit(do_not_specialize=["num_rows", "tokens_per_batch", "num_splits"])
def combine_kernel(
    OPart, LsePart, OSuffix, LseSuffix, Out, Lse, OutScale, BlockScale, Sinks,
    num_rows, num_heads, tokens_per_batch, num_splits, stride_sink,
    stride_op_split, stride_op_tok, stride_op_head,
    stride_lp_split, stride_lp_tok, stride_lp_head,
    stride_osf_tok, stride_osf_head, stride_lsf_tok, stride_lsf_head,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_ls, stride_lh,
    stride_bsb, stride_bss, stride_bsh, stride_bsg,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SUFFIX: tl.constexpr, HAS_SINKS: tl.constexpr, STORE_LSE: tl.constexpr, WAIT_PRIOR: tl.constexpr,
    OUT_KIND: tl.constexpr, FP8_MAX: tl.constexpr, ROUND_MANT: tl.constexpr, ROUND_EMIN: tl.constexpr,
    EMULATE_ROUNDING: tl.constexpr, GROUP_SIZE: tl.constexpr, UE8M0: tl.constexpr,
):
    # Rows are (token, head) pairs; tokens run over batch * seqlen (or total_q).
    if WAIT_PRIOR:  # launched as a programmatic dependent: the forward's partials are complete after this
        gdc_wait()
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    tok = (rows // num_heads).to(tl.int64)
    head = (rows % num_heads).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_mask = row_ok[:, None] & (offs_dv < DV)[None, :]
    lp = LsePart + tok * stride_lp_tok + head * stride_lp_head
    op = OPart + (tok * stride_op_tok + head * stride_op_head)[:, None] + offs_dv[None, :]
    lsf = LseSuffix + tok * stride_lsf_tok + head * stride_lsf_head
    osf = OSuffix + (tok * stride_osf_tok + head * stride_osf_head)[:, None] + offs_dv[None, :]

    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        m = nan_max(m, _load_lse(lp + s * stride_lp_split, row_ok))
    if HAS_SUFFIX:
        m = nan_max(m, _load_lse(lsf, row_ok))
    if HAS_SINKS:  # the sink's logit, one more part with no value (split-KV: counted here, once)
        sink = tl.load(Sinks + head * stride_sink, mask=row_ok, other=float("-inf")).to(tl.float32)
        m = nan_max(m, sink)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    denom = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(num_splits):
        w = tl.exp(_load_lse(lp + s * stride_lp_split, row_ok) - m_use)
        acc += w[:, None] * tl.load(op + s * stride_op_split, mask=o_mask, other=0.0).to(tl.float32)
        denom += w
    if HAS_SUFFIX:
        w = tl.exp(_load_lse(lsf, row_ok) - m_use)
        acc += w[:, None] * tl.load(osf, mask=o_mask, other=0.0).to(tl.float32)
        denom += w
    if HAS_SINKS:
        denom += tl.exp(sink - m_use)

    seen = denom != 0.0  # (a NaN partial or LSE leaves denom NaN: output and LSE NaN)
    inv = tl.where(seen, 1.0 / tl.where(seen, denom, 1.0), 0.0)
    b = tok // tokens_per_batch
    t = tok % tokens_per_batch
    o_rows = Out + b * stride_ob + t * stride_os + head * stride_oh
    bs_rows = b * stride_bsb + t * stride_bss + head * stride_bsh
    store_output(acc, inv, o_rows, offs_dv, row_ok, OutScale, BlockScale, bs_rows, head, stride_bsg,
                 DV, OUT_KIND, FP8_MAX, ROUND_MANT, ROUND_EMIN, EMULATE_ROUNDING, GROUP_SIZE, UE8M0)
    if STORE_LSE:
        lse = tl.where(seen, m_use + tl.log(tl.where(seen, denom, 1.0)), float("-inf"))
        tl.store(Lse + b * stride_lb + t * stride_ls + head * stride_lh, lse, mask=row_ok)


# ----------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Partials:
    """`count` partial outputs and their LSEs in `out` / `lse`, each addressed by (partial, token,
    head) strides (a token is batch * seqlen flattened, or a varlen token)."""

    out: torch.Tensor
    out_strides: Tuple[int, int, int]
    lse: torch.Tensor
    lse_strides: Tuple[int, int, int]
    count: int = 1


def launch_combine(parts: Partials, suffix: Optional[Partials], out: torch.Tensor, out_strides, lse, lse_strides,
                   num_tokens: int, num_heads: int, tokens_per_batch: int, head_dim_v: int, fmt, sinks=None,
                   interpret: bool = False, pdl: bool = False):
    """Merge `parts` (and `suffix`, one more partial) into `out` in format `fmt`, with each head's
    sink logit (sinks (H,), or None) counted once; out_strides / lse_strides: (batch, token,
    head) with tokens_per_batch tokens a batch. pdl: launched as a programmatic dependent of
    the kernel before it (which triggers it), waiting for its results in the kernel."""
    dummy = parts.out
    rows = num_tokens * num_heads
    sfx = suffix if suffix is not None else Partials(dummy, (0, 0, 0), dummy, (0, 0, 0))
    args = (parts.out, parts.lse, sfx.out, sfx.lse, out, lse if lse is not None else dummy,
            fmt.scale if fmt.scale is not None else dummy, fmt.block_scale if fmt.block_scale is not None else dummy,
            sinks if sinks is not None else dummy,
            rows, num_heads, tokens_per_batch, parts.count, sinks.stride(0) if sinks is not None else 0,
            *parts.out_strides, *parts.lse_strides, *sfx.out_strides[1:], *sfx.lse_strides[1:],
            *out_strides, *lse_strides, *fmt.block_scale_strides)
    constexprs = dict(DV=head_dim_v, BLOCK_R=COMBINE_ROWS, BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
                      HAS_SUFFIX=suffix is not None, HAS_SINKS=sinks is not None, STORE_LSE=lse is not None,
                      WAIT_PRIOR=pdl, **epilogue_constexprs(fmt, interpret))
    _COMBINE.launch(out.device.index, (-(-rows // COMBINE_ROWS),), args, constexprs, num_warps=4,
                    **({"launch_pdl": True} if pdl else {}))


_COMBINE = Launches(combine_kernel)
