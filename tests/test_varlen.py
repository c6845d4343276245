"""flash_attn_varlen_func: packed sequences of uneven lengths (one of length 0)."""

import pytest
import torch

import attnquant as aq
from attnquant.reference import attention_ref_varlen

from .helpers import BACKENDS, DEVICE, DTYPES, FP8, ON_GPU, check_lse, check_output, format_kwargs, make_format, randn

LENS_Q = [70, 0, 131, 5, 256] if ON_GPU else [9, 0, 21, 3]
LENS_K = [90, 0, 131, 300, 17] if ON_GPU else [12, 0, 21, 30]


def cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)


def run_varlen(dtype, causal, dims, heads, kind, window=(-1, -1), softcap=0.0, seqused=None, **kw):
    (d, dv), (h, hkv) = dims, heads
    tq, tk = sum(LENS_Q), sum(LENS_K)
    q, k, v = randn(tq, h, d, dtype=dtype), randn(tk, hkv, d, dtype=dtype), randn(tk, hkv, dv, dtype=dtype)
    cq, ck = cu(LENS_Q), cu(LENS_K)
    used = None if seqused is None else torch.tensor(seqused, dtype=torch.int32, device=DEVICE)
    ref_kw = dict(causal=causal, window_size=window, softcap=softcap)
    ref_o, ref_lse = attention_ref_varlen(q, k, v, cq, ck, used, **ref_kw)
    eager_o, _ = attention_ref_varlen(q, k, v, cq, ck, used, eager_dtype=dtype, **ref_kw)
    fmt = make_format(kind, dtype, ref_o)
    out, lse = aq.flash_attn_varlen_func(q, k, v, cq, ck, max(LENS_Q), max(LENS_K), seqused_k=used,
                                         return_lse=True, **ref_kw, **format_kwargs(fmt), **kw)
    what = f"varlen {dtype} causal={causal} dims={dims} heads={heads} {fmt.dtype}"
    check_output(out, fmt, ref_o, eager_o, softcap=softcap, what=what)
    check_lse(lse, ref_lse, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["plain"] + FP8 + ["group", "group_ue8m0", "nvfp4"], ids=str)
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (192, 128)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen(dtype, causal, dims, kind, backend):
    run_varlen(dtype, causal, dims, (4, 2), kind, backend=backend)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_seqused_k(causal):
    used = [min(n, m) for n, m in zip(LENS_K, [7, 0, 10, 25, 3])]
    run_varlen(DTYPES[0], causal, (128, 128), (4, 1), torch.float8_e4m3fn, seqused=used)


def test_varlen_window_softcap():
    run_varlen(DTYPES[0], True, (64, 64), (4, 4), torch.float8_e4m3fn, window=(6, -1), softcap=4.0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_varlen_splits(num_splits):
    run_varlen(DTYPES[0], True, (128, 128), (4, 2), torch.float8_e5m2, num_splits=num_splits)
