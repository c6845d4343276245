"""Pure-torch attention: the oracle the tests compare the kernels with.

`attention_ref` computes one sequence's attention in float64 (or, with
`eager_dtype`, the way an eager bf16/fp16 implementation rounds: scores in float32,
P and the output rounded to the input dtype), following SPEC.md's conventions:
bottom-right aligned causal mask and window, softcap before masking, a row that sees
no key gives output 0 and LSE -inf; optional per-head sink logits (gpt-oss) join each row's
softmax denominator without a value, and the LSE. The batched / varlen / paged wrappers cut their
inputs into sequences and call it; nothing here shares code with the kernels.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def visible_mask(sq: int, sk: int, causal: bool, window_size=(-1, -1), device=None) -> torch.Tensor:
    """(sq, sk) bool: may query i see key j. Diagonal is bottom-right aligned."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    diag = i + sk - sq
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= j <= diag + right
    if left >= 0:
        ok &= j >= diag - left
    return ok


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    eager_dtype: Optional[torch.dtype] = None,
    sinks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q (Sq, H, D), k (Sk, Hkv, D), v (Sk, Hkv, Dv) -> O (Sq, H, Dv), LSE (H, Sq).

    Float64 throughout, unless `eager_dtype` is given: then scores and softmax are
    float32 and P and O are rounded to `eager_dtype`, like an eager implementation.
    O is returned in float64 (float32 values in the eager case). sinks (H,): the sink logit
    of each query head, a score column of its own (after the softmax scale and softcap) whose
    value is 0: O = sum_j e^(s_j - m) v_j / (e^(sink - m) + sum_j e^(s_j - m)), and the LSE
    counts it.
    """
    sq, h, d = q.shape
    sk, hkv, dv = v.shape
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    work = torch.float32 if eager_dtype is not None else torch.float64
    group = h // hkv
    if sq == 0 or sk == 0:  # nothing to see: output 0, LSE -inf (or the sink's logit)
        lse = torch.full((h, sq), float("-inf"), dtype=torch.float64, device=q.device)
        if sinks is not None:
            lse = lse.maximum(sinks.double()[:, None])
        return torch.zeros(sq, h, dv, dtype=torch.float64, device=q.device), lse
    qf = q.to(work).permute(1, 0, 2)  # (H, Sq, D)
    kf = k.to(work).repeat_interleave(group, dim=1).permute(1, 0, 2)  # (H, Sk, D)
    vf = v.to(work).repeat_interleave(group, dim=1).permute(1, 0, 2)
    s = torch.matmul(qf, kf.transpose(1, 2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    ok = visible_mask(sq, sk, causal, window_size, device=q.device)
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    if sinks is not None:
        sink = sinks.to(work)[:, None, None]  # (H, 1, 1)
        m = torch.maximum(m, sink)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m_safe)
    l = p.sum(dim=-1, keepdim=True)
    if sinks is not None:
        l = l + torch.exp(sink - m_safe)
    if eager_dtype is not None:
        p = p.to(eager_dtype).to(work)
    o = torch.matmul(p, vf) / torch.where(l == 0, torch.ones_like(l), l)
    lse = torch.where(l == 0, torch.full_like(l, float("-inf")), m_safe + torch.log(l)).squeeze(-1)
    o = o.permute(1, 0, 2)  # (Sq, H, Dv)
    if eager_dtype is not None:
        o = o.to(eager_dtype)
    return o.double(), lse.double()


def attention_ref_batched(q, k, v, **kw):
    """q (B, Sq, H, D), k/v (B, Sk, Hkv, *) -> O (B, Sq, H, Dv), LSE (B, H, Sq)."""
    outs, lses = zip(*(attention_ref(q[b], k[b], v[b], **kw) for b in range(q.shape[0])))
    return torch.stack(outs), torch.stack(lses)


def attention_ref_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k=None, **kw):
    """Packed q (total_q, H, D), k/v (total_k, Hkv, *) -> O (total_q, H, Dv), LSE (H, total_q)."""
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    used = None if seqused_k is None else seqused_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        kend = ck[b + 1] if used is None else ck[b] + used[b]
        o, lse = attention_ref(q[cq[b]:cq[b + 1]], k[ck[b]:kend], v[ck[b]:kend], **kw)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """The first n tokens of sequence b from a paged cache (num_blocks, page, Hkv, D)."""
    page = cache.shape[1]
    pages = block_table[b, : math.ceil(n / page)].long()
    return cache[pages].reshape(-1, *cache.shape[2:])[:n]


def attention_ref_kvcache(q, k_cache, v_cache, cache_seqlens, block_table=None, **kw):
    """q (B, Sq, H, D) against the first cache_seqlens[b] keys of a contiguous or paged cache."""
    outs, lses = [], []
    for b, n in enumerate(cache_seqlens.tolist()):
        if block_table is None:
            kb, vb = k_cache[b, :n], v_cache[b, :n]
        else:
            kb, vb = gather_paged(k_cache, block_table, b, n), gather_paged(v_cache, block_table, b, n)
        o, lse = attention_ref(q[b], kb, vb, **kw)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def merge_ref(o1, l1, o2, l2, eager_dtype=None):
    """The float64 merge of two partial attentions (o: (T, H, Dv), lse: (H, T)) by their LSEs
    (+inf counts as -inf; a row neither part saw gives 0 and -inf), or, with eager_dtype,
    float32 math rounded to it like an eager merge."""
    work = torch.float64 if eager_dtype is None else torch.float32
    l1, l2 = (torch.where(x == float("inf"), float("-inf"), x).to(work).t()[..., None] for x in (l1, l2))
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    den = w1 + w2
    o = (w1 * o1.to(work) + w2 * o2.to(work)) / torch.where(den == 0, torch.ones_like(den), den)
    lse = torch.where(den == 0, torch.full_like(den, float("-inf")), m + torch.log(den))[..., 0].t()
    if eager_dtype is not None:
        o = o.to(eager_dtype)
    return o.double(), lse.double()


def fa3_distribution(*shape, device=None) -> torch.Tensor:
    """FA3's test distribution for FP8 attention's accuracy: standard normal, with 0.1 % of the
    entries drawn with standard deviation 10 instead (outliers, as activations have), float32."""
    x = torch.randn(*shape, device=device)
    outlier = torch.rand(*shape, device=device) < 0.001
    return torch.where(outlier, torch.randn(*shape, device=device) * 10, x)


def rmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Root-mean-square error, absolute (FA3's accuracy measure for FP8 attention)."""
    return (out.double() - ref.double()).pow(2).mean().sqrt().item()
