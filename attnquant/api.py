"""The public functions. Each one: validate (validation.py) -> describe the call (problem.py)
-> output format and allocation (quant.py) -> plan and run (dispatch.py). The contract is
docs/spec.md."""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

from . import dispatch, quant, validation as check
from .kernels.hopper.config import WsConfig
from .kernels.launcher import owned
from .kernels.portable.config import FwdConfig
from .problem import Attention, Problem, make_problem

_Config = Union[FwdConfig, WsConfig, None]

_COMMON = """
    Common keyword arguments (docs/spec.md):
      softmax_scale: the score scale, default D ** -0.5 (a real number in [2**-126, 2**126]).
      causal: bottom-right aligned causal mask (query i of Sq sees keys j <= i + Sk - Sq).
      window_size: (left, right) keys around that diagonal a query sees; -1 = unbounded.
      softcap: > 0 applies s = softcap * tanh(s / softcap) to the scaled scores; 0 = off.
      num_splits: 0 = heuristic, 1 = no split, n > 1 = the keys split in n parts whose float32
        partials are merged, then quantized once.
      return_lse: also return the float32 natural-log LSE.
      out: a tensor to write into (its dtype picks the output format); else one is allocated.
      out_dtype: the output format when `out` is not given: a float dtype, an FP8 dtype, or
        "nvfp4". Default: FP8 e4m3fn when a scale is given, else q's dtype (bf16 for FP8 q).
      output_scale: static FP8 (a 1-element float32 dequant scale: out = sat(O / scale)), or
        NVFP4's global scale gs (vLLM's convention, typically 448 * 6 / amax). Read on the
        device; a scale that is not finite and > 0 makes the whole output NaN.
      output_block_scale: per-token-group FP8 scales the kernel writes, float32 of shape
        (..., H * Dv // G) or (..., H, Dv // G), any strides (DeepGEMM column-major included);
        NVFP4: the e4m3 block scales in the 128x4 swizzled layout, shape
        quant.nvfp4_scale_shape(tokens, H, Dv).
      ue8m0: per-group FP8 scales rounded up to powers of two (DeepGEMM's UE8M0).
      sinks: (H,) float32/bf16/fp16 learnable sink logits (gpt-oss), one per query head: each
        joins its rows' softmax denominator as exp(sink - m) with no value, and the LSE.
      q_descale, k_descale, v_descale: float32 dequant scales of FP8 (float8_e4m3fn) inputs,
        (B, Hkv) or one element; the real value is the stored one times its descale. Only for
        an input that is FP8; None = 1.
      backend: 'auto' (the Hopper Gluon kernel where it applies, else the portable one),
        'gluon' (that kernel, or a ValueError saying why not), 'triton' (the portable kernel);
        None reads $ATTNQUANT_BACKEND (default 'auto').
    """


def _documented(fn):
    fn.__doc__ += _COMMON
    return fn


def _format_and_outputs(p: Problem, return_lse, out, out_dtype, output_scale, output_block_scale, ue8m0):
    """The output format the arguments ask for, `out` (checked or allocated) and the LSE."""
    plain = torch.bfloat16 if p.q.dtype == check.FP8_INPUT else p.q.dtype
    fmt = quant.resolve_output_format(plain, p.q.device, out, out_dtype, output_scale, output_block_scale, ue8m0,
                                      p.out_shape[:-2], p.num_heads, p.head_dim_v)
    shape = fmt.out_shape(p.out_shape)
    if out is None:
        out = torch.empty(shape, dtype=fmt.dtype, device=p.q.device)
    else:
        check.check_out(out, shape, p.q.device)
    lse = torch.empty(p.lse_shape, dtype=torch.float32, device=p.q.device) if return_lse else None
    return fmt, out, lse


def _attend(p: Problem, attn: Attention, num_splits, return_lse, out, out_dtype, output_scale, output_block_scale,
            ue8m0, backend, config: _Config):
    """The rest of every forward entry point: sinks and descales checked, format, outputs, plan, run."""
    check.check_sinks(p.sinks, p.num_heads, p.q.device)
    check.check_descales(p.q, p.k, p.v, p.q_descale, p.k_descale, p.v_descale, p.batch, p.num_heads_kv)
    backend = dispatch.requested_backend(backend)  # (checked before anything is written; $ATTNQUANT_BACKEND read once)
    fmt, out, lse = _format_and_outputs(p, return_lse, out, out_dtype, output_scale, output_block_scale, ue8m0)
    if out.numel():  # (an empty problem: B, Sq, H or total_q 0 launches nothing)
        dispatch.forward(p, attn, fmt, out, lse, dispatch.plan(p, attn, num_splits, backend, config))
    return out, lse


@_documented
def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    num_splits=0, return_lse=False, out=None, out_dtype=None, output_scale=None,
                    output_block_scale=None, ue8m0=False, *, sinks=None, q_descale=None, k_descale=None,
                    v_descale=None, backend: Optional[str] = None, _config: _Config = None):
    """Attention of q (B, Sq, H, D) over k (B, Sk, Hkv, D) and v (B, Sk, Hkv, Dv).

    q, k, v: bf16/fp16 (or FP8 e4m3fn k/v, or all three FP8), last dim contiguous, any other
    strides; H a multiple of Hkv (MHA, GQA, MQA).
    Returns (out, lse): out (B, Sq, H, Dv) in the format the arguments ask for (NVFP4:
    (B, Sq, H, Dv // 2) bytes), lse (B, H, Sq) float32 or None.
    """
    check.check_qkv(q, k, v, 4, 4)
    scale, window, cap, splits = check.check_options(softmax_scale, causal, window_size, softcap, num_splits,
                                                     return_lse, q.shape[-1])
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k/v batch {k.shape[0]} must equal q's batch {q.shape[0]}")
    p = make_problem(q, k, v, q.shape[1], k.shape[1], sinks=sinks, q_descale=q_descale, k_descale=k_descale,
                     v_descale=v_descale)
    return _attend(p, Attention(scale, causal, window, cap), splits, return_lse, out, out_dtype, output_scale,
                   output_block_scale, ue8m0, backend, _config)


@_documented
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k=None,
                           block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, num_splits=0, return_lse=False, out=None, out_dtype=None,
                           output_scale=None, output_block_scale=None, ue8m0=False, *, sinks=None, q_descale=None,
                           k_descale=None, v_descale=None, backend: Optional[str] = None, _config: _Config = None):
    """Attention over packed sequences: q (total_q, H, D); k, v (total_k, Hkv, *), or paged
    caches (num_blocks, page_size, Hkv, *) with `block_table`.

    cu_seqlens_q: int32 (B + 1,): sequence b's queries are q[cu_seqlens_q[b]:cu_seqlens_q[b+1]].
    cu_seqlens_k: int32 (B + 1,): its keys likewise (None with a paged cache and seqused_k).
    max_seqlen_q, max_seqlen_k: the longest sequences (Python ints: no device read).
    seqused_k: int32 (B,): sequence b uses only its first seqused_k[b] keys.
    block_table: int32 (B, max_blocks): sequence b's i-th page of the paged caches (page sizes:
      powers of two up to 1024).
    Returns (out (total_q, H, Dv), lse (H, total_q) or None).
    """
    paged = block_table is not None
    check.check_qkv(q, k, v, 3, 4 if paged else 3)
    scale, window, cap, splits = check.check_options(softmax_scale, causal, window_size, softcap, num_splits,
                                                     return_lse, q.shape[-1])
    max_seqlen_q = check.as_int("max_seqlen_q", max_seqlen_q, 0)
    max_seqlen_k = check.as_int("max_seqlen_k", max_seqlen_k, 0)
    total_q = q.shape[0]
    check.check_tensor("cu_seqlens_q", cu_seqlens_q, 1, (torch.int32,))
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 0:
        raise ValueError("cu_seqlens_q must hold batch + 1 >= 1 entries, got none")
    if max_seqlen_q > total_q:
        raise ValueError(f"max_seqlen_q={max_seqlen_q} exceeds the {total_q} query tokens in q")
    check.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, batch + 1, total_q, max_seqlen_q)
    if paged:
        num_blocks, page_size = k.shape[0], k.shape[1]
        check.check_block_table(block_table, q.device, batch, num_blocks, page_size)
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
        check.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, batch + 1,
                               capacity if not paged else batch * capacity, max_seqlen_k)
    if seqused_k is not None:
        check.check_index_tensor("seqused_k", seqused_k, q.device, 1, batch)
        check.check_lengths_on_host("seqused_k", seqused_k, max_seqlen_k)
    p = make_problem(q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q,
                     None if paged and seqused_k is not None else cu_seqlens_k, seqused_k, block_table, sinks,
                     q_descale, k_descale, v_descale)
    return _attend(p, Attention(scale, causal, window, cap), splits, return_lse, out, out_dtype, output_scale,
                   output_block_scale, ue8m0, backend, _config)


@_documented
def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table=None, softmax_scale=None,
                            causal=True, window_size=(-1, -1), softcap=0.0, num_splits=0, return_lse=False,
                            out=None, out_dtype=None, output_scale=None, output_block_scale=None, ue8m0=False,
                            *, sinks=None, q_descale=None, k_descale=None, v_descale=None,
                            backend: Optional[str] = None, _config: _Config = None):
    """Decode / chunked prefill against a KV cache: q (B, Sq, H, D); caches (B, Sk_max, Hkv, *)
    or paged (num_blocks, page_size, Hkv, *) with `block_table` (B, max_blocks) int32.

    cache_seqlens: int32 (B,) tensor or an int: sequence b attends to its first
      cache_seqlens[b] keys (bottom-right causal by default: the Sq queries are its last ones).
    Returns (out (B, Sq, H, Dv), lse (B, H, Sq) or None).
    """
    paged = block_table is not None
    check.check_qkv(q, k_cache, v_cache, 4, 4)
    scale, window, cap, splits = check.check_options(softmax_scale, causal, window_size, softcap, num_splits,
                                                     return_lse, q.shape[-1])
    b, sq = q.shape[:2]
    if paged:
        num_blocks, page_size = k_cache.shape[0], k_cache.shape[1]
        check.check_block_table(block_table, q.device, b, num_blocks, page_size)
        capacity = block_table.shape[1] * page_size
    else:
        if k_cache.shape[0] != b:
            raise ValueError(f"k_cache batch {k_cache.shape[0]} must equal q's batch {b} (or pass block_table)")
        capacity = k_cache.shape[1]
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        cache_seqlens = int(cache_seqlens)
        if not 0 <= cache_seqlens <= capacity:
            raise ValueError(f"cache_seqlens={cache_seqlens} must lie in [0, {capacity}]")
        cache_seqlens = owned(torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device))
    check.check_index_tensor("cache_seqlens", cache_seqlens, q.device, 1, b)
    check.check_lengths_on_host("cache_seqlens", cache_seqlens, capacity)
    p = make_problem(q, k_cache, v_cache, sq, capacity, seqused_k=cache_seqlens, block_table=block_table, sinks=sinks,
                     q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    return _attend(p, Attention(scale, causal, window, cap), splits, return_lse, out, out_dtype, output_scale,
                   output_block_scale, ue8m0, backend, _config)


def merge_attn_states(prefix_out, prefix_lse, suffix_out, suffix_lse, return_lse=False, out=None, out_dtype=None,
                      output_scale=None, output_block_scale=None, ue8m0=False):
    """Merge two partial attentions over disjoint key sets by their LSEs (vLLM's layout), and
    quantize the result like the forward does.

    prefix_out, suffix_out: (T, H, Dv) bf16/fp16/fp32, each normalized by its own softmax
      denominator; prefix_lse, suffix_lse: (H, T) float32 natural-log LSEs (+inf, like -inf,
      means that part saw no key).
    out, out_dtype, output_scale, output_block_scale, ue8m0: the output format, as for the
      forward functions.
    Returns (out (T, H, Dv), lse (H, T) or None). A row neither part saw gives 0 and LSE
    -inf; a NaN in a part's LSE or output gives NaN.
    """
    check.check_tensor("prefix_out", prefix_out, 3, quant.PLAIN_DTYPES)
    check.check_tensor("suffix_out", suffix_out, 3, quant.PLAIN_DTYPES)
    check.check_tensor("prefix_lse", prefix_lse, 2, (torch.float32,))
    check.check_tensor("suffix_lse", suffix_lse, 2, (torch.float32,))
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    device = prefix_out.device
    for name, t in (("suffix_out", suffix_out), ("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but prefix_out is on {device}")
    check.check_runs_here("prefix_out", device)
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
    if out.numel():
        dispatch.merge(prefix_out, prefix_lse, suffix_out, suffix_lse, out, lse, fmt)
    return out, lse
