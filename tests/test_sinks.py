"""Learnable attention sinks (gpt-oss): one logit per query head joins every row's softmax
denominator with no value, and the LSE; with windows, softcap, GQA, varlen, paged caches,
split-KV (counted once, in the merge) and every output format, on both backends."""

import pytest
import torch

import attnquant as aq
from attnquant.reference import attention_ref_batched, attention_ref_kvcache, attention_ref_varlen

from .helpers import (BACKENDS, DEVICE, DTYPES, ON_GPU, check_lse, check_output, format_kwargs, gluon_takes,
                      make_format, randn)
from .test_kvcache import to_paged

KINDS = ["plain", torch.float8_e4m3fn, "group", "nvfp4"]


def sinks_for(h, dtype=torch.float32, spread=2.0):
    """Logits on the scale of the scores: some heads' sinks dominate, some barely count."""
    return (torch.randn(h, device=DEVICE) * spread + 1.0).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("window", [(-1, -1), (16, -1)], ids=["full", "window16"])
@pytest.mark.parametrize("causal", [False, True])
def test_sinks_prefill(causal, window, kind, backend):
    """gpt-oss's layer mix: full and sliding-window layers, GQA, d=64 (the Gluon kernel takes the
    full ones; windows run on the portable kernel)."""
    dtype = DTYPES[0]
    b, sq, sk, h, hkv, d = 2, 150 if ON_GPU else 21, 230 if ON_GPU else 37, 8, 2, 64
    q, k, v = randn(b, sq, h, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    sinks = sinks_for(h)
    ref_kw = dict(causal=causal, window_size=window, sinks=sinks)
    ref_o, ref_lse = attention_ref_batched(q, k, v, **ref_kw)
    eager_o, _ = attention_ref_batched(q, k, v, eager_dtype=dtype, **ref_kw)
    fmt = make_format(kind, dtype, ref_o)
    call = lambda: aq.flash_attn_func(q, k, v, causal=causal, window_size=window, sinks=sinks, return_lse=True,  # noqa
                                      backend=backend, **format_kwargs(fmt))
    if backend == "gluon" and window != (-1, -1):
        with pytest.raises(ValueError, match="sliding windows"):
            call()
        return
    out, lse = call()
    what = f"sinks causal={causal} window={window} {kind} {backend}"
    check_output(out, fmt, ref_o, eager_o, what=what)
    check_lse(lse, ref_lse, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [(128, 128), (192, 128)], ids=str)
def test_sinks_head_dims_bf16_logits(dims, backend):
    """bf16 sink logits; MLA's 192-128 and d=128; Sk < Sq causal: the first rows see no key, so
    their output is 0 and their LSE the sink's logit."""
    if backend == "gluon" and not gluon_takes(*dims):
        return
    dtype = DTYPES[0]
    (d, dv), h = dims, 4
    q, k, v = randn(1, 60, h, d, dtype=dtype), randn(1, 40, 1, d, dtype=dtype), randn(1, 40, 1, dv, dtype=dtype)
    sinks = sinks_for(h, torch.bfloat16)
    ref_o, ref_lse = attention_ref_batched(q, k, v, causal=True, sinks=sinks)
    eager_o, _ = attention_ref_batched(q, k, v, causal=True, sinks=sinks, eager_dtype=dtype)
    fmt = make_format(torch.float8_e4m3fn, dtype, ref_o)
    out, lse = aq.flash_attn_func(q, k, v, causal=True, sinks=sinks, return_lse=True, backend=backend,
                                  **format_kwargs(fmt))
    check_output(out, fmt, ref_o, eager_o, what=f"sinks {dims} {backend}")
    check_lse(lse, ref_lse)
    assert (out[0, :20].float() == 0).all()
    assert torch.allclose(lse[0, :, :20], sinks.float()[:, None].expand(h, 20), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_sinks_decode_split(paged, num_splits, kind):
    """Decode with split-KV: each split's partial leaves the sink out, the merge counts it once."""
    dtype = DTYPES[0]
    bsz, sk_max, h, hkv, d = 3, 1000 if ON_GPU else 70, 8, 2, 64
    lens = torch.tensor([sk_max, 0, sk_max // 2], dtype=torch.int32, device=DEVICE)
    q = randn(bsz, 1, h, d, dtype=dtype)
    kc, vc = randn(bsz, sk_max, hkv, d, dtype=dtype), randn(bsz, sk_max, hkv, d, dtype=dtype)
    sinks = sinks_for(h)
    ref_o, ref_lse = attention_ref_kvcache(q, kc, vc, lens, sinks=sinks)
    eager_o, _ = attention_ref_kvcache(q, kc, vc, lens, sinks=sinks, eager_dtype=dtype)
    fmt = make_format(kind, dtype, ref_o)
    kw = dict(num_splits=num_splits, return_lse=True, sinks=sinks, window_size=(128, -1) if paged else (-1, -1),
              **format_kwargs(fmt))
    if paged:  # (a gpt-oss sliding-window layer against a paged cache)
        ref_o, ref_lse = attention_ref_kvcache(q, kc, vc, lens, sinks=sinks, window_size=(128, -1))
        eager_o, _ = attention_ref_kvcache(q, kc, vc, lens, sinks=sinks, window_size=(128, -1), eager_dtype=dtype)
        fmt = make_format(kind, dtype, ref_o)
        kw.update(format_kwargs(fmt))
        kp, bt = to_paged(kc, 16, torch.Generator().manual_seed(3))
        vp, _ = to_paged(vc, 16, torch.Generator().manual_seed(3))
        out, lse = aq.flash_attn_with_kvcache(q, kp, vp, lens, block_table=bt, **kw)
    else:
        out, lse = aq.flash_attn_with_kvcache(q, kc, vc, lens, **kw)
    what = f"sinks decode paged={paged} splits={num_splits} {kind}"
    check_output(out, fmt, ref_o, eager_o, what=what)
    check_lse(lse, ref_lse, what)
    assert torch.allclose(lse[1, :, 0], sinks.float(), atol=1e-5)  # the empty sequence: LSE = the sink


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_varlen(backend):
    dtype = DTYPES[0]
    lens_q, lens_k = [70, 0, 130], [90, 5, 130]
    if not ON_GPU:
        lens_q, lens_k = [7, 0, 13], [9, 5, 13]
    h, hkv, d = 8, 2, 64
    cq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEVICE)
    ck = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEVICE)
    q, k, v = randn(sum(lens_q), h, d, dtype=dtype), randn(sum(lens_k), hkv, d, dtype=dtype), \
        randn(sum(lens_k), hkv, d, dtype=dtype)
    sinks = sinks_for(h)
    ref_o, ref_lse = attention_ref_varlen(q, k, v, cq, ck, causal=True, sinks=sinks)
    eager_o, _ = attention_ref_varlen(q, k, v, cq, ck, causal=True, sinks=sinks, eager_dtype=dtype)
    fmt = make_format("nvfp4", dtype, ref_o)
    out, lse = aq.flash_attn_varlen_func(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=True, sinks=sinks,
                                         return_lse=True, backend=backend, **format_kwargs(fmt))
    check_output(out, fmt, ref_o, eager_o, what=f"sinks varlen {backend}")
    check_lse(lse, ref_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_extremes(backend):
    """A sink of -inf changes nothing (bit for bit); a huge sink sends every output to ~0 (the
    values' weights vanish) with LSE = the sink; a NaN sink makes its head's rows NaN."""
    dtype = DTYPES[0]
    h = 4
    q, k, v = randn(2, 130, h, 64, dtype=dtype), randn(2, 130, 2, 64, dtype=dtype), randn(2, 130, 2, 64, dtype=dtype)
    plain, lse_plain = aq.flash_attn_func(q, k, v, causal=True, return_lse=True, backend=backend)
    none, lse_none = aq.flash_attn_func(q, k, v, causal=True, return_lse=True, backend=backend,
                                        sinks=torch.full((h,), float("-inf"), device=DEVICE))
    assert torch.equal(plain, none) and torch.equal(lse_plain, lse_none)
    big = torch.tensor([60.0, 0.0, 0.0, 0.0], device=DEVICE)
    out, lse = aq.flash_attn_func(q, k, v, causal=True, return_lse=True, backend=backend, sinks=big)
    assert out[:, :, 0].float().abs().max() < 1e-10 and torch.allclose(lse[:, 0], torch.full_like(lse[:, 0], 60.0))
    bad = torch.tensor([0.0, float("nan"), 0.0, 0.0], device=DEVICE)
    out, lse = aq.flash_attn_func(q, k, v, causal=True, return_lse=True, backend=backend, sinks=bad)
    assert out[:, :, 1].isnan().all() and lse[:, 1].isnan().all()
    assert out[:, :, [0, 2, 3]].isfinite().all()
