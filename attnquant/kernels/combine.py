"""Merge of partial attentions by their LSEs, then the output epilogue, once.

Used after a split-KV forward (num_splits partials in one float32 workspace) and by
merge_attn_states (a prefix and a suffix partial in two tensors of any float dtype:
HAS_SUFFIX adds the second one). Each partial is an output normalized by its own
softmax denominator, with that denominator's LSE. For one output row,
    O = sum_s exp(lse_s - M) * O_s / sum_s exp(lse_s - M),   LSE = M + log(sum_s ...)
with M = max_s lse_s. A split that saw no key has lse -inf and weight 0 (+inf, which
some kernels write for empty rows, counts as -inf too); a row no split saw writes 0 and
LSE -inf; a NaN LSE or a NaN in a partial output makes the row NaN (SPEC: non-finite values
are never hidden). The quantization happens here, after the merge,
through the same epilogue as the forward kernel.
"""

import triton
import triton.language as tl

from .epilogue import nan_max, store_output


@triton.jit
def _load_lse(ptrs, row_ok):
    lse = tl.load(ptrs, mask=row_ok, other=float("-inf"))
    return tl.where(lse == float("inf"), float("-inf"), lse)


@triton.jit(do_not_specialize=["num_rows", "tokens_per_batch", "num_splits"])
def combine_kernel(
    OPart, LsePart, OSuffix, LseSuffix, Out, Lse, OutScale, BlockScale,
    num_rows, num_heads, tokens_per_batch, num_splits,
    stride_op_split, stride_op_tok, stride_op_head,
    stride_lp_split, stride_lp_tok, stride_lp_head,
    stride_osf_tok, stride_osf_head, stride_lsf_tok, stride_lsf_head,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_ls, stride_lh,
    stride_bsb, stride_bss, stride_bsh, stride_bsg,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SUFFIX: tl.constexpr, STORE_LSE: tl.constexpr,
    OUT_KIND: tl.constexpr, FP8_MAX: tl.constexpr, ROUND_MANT: tl.constexpr, ROUND_EMIN: tl.constexpr,
    EMULATE_ROUNDING: tl.constexpr, GROUP_SIZE: tl.constexpr, UE8M0: tl.constexpr,
):
    # Rows are (token, head) pairs; tokens run over batch * seqlen (or total_q).
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
