"""merge_attn_states: two partial attentions merged by LSE, then quantized like the forward."""

import pytest
import torch

import attnquant as aq
from attnquant.reference import attention_ref_varlen, merge_ref

from .helpers import DEVICE, DTYPES, FP8, ON_GPU, check_lse, check_output, format_kwargs, make_format, randn

T, H, DV = (300, 8, 128) if ON_GPU else (37, 4, 64)


def partials(dtype):
    o1, o2 = randn(T, H, DV, dtype=dtype), randn(T, H, DV, dtype=dtype)
    l1, l2 = randn(H, T, dtype=torch.float32, scale=3.0), randn(H, T, dtype=torch.float32, scale=3.0)
    l1[:, 0] = float("-inf")  # only the suffix saw keys
    l2[:, 1] = float("-inf")  # only the prefix
    l1[:, 2] = l2[:, 2] = float("-inf")  # neither: 0 and LSE -inf
    l1[:, 3] = float("inf")  # +inf, written by some kernels for empty rows, counts as -inf
    return o1, l1, o2, l2


@pytest.mark.parametrize("kind", ["plain"] + FP8 + ["group", "group_ue8m0", "nvfp4"], ids=str)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
def test_merge(dtype, kind):
    o1, l1, o2, l2 = partials(dtype)
    ref_o, ref_lse = merge_ref(o1, l1, o2, l2)
    eager_o, _ = merge_ref(o1, l1, o2, l2, eager_dtype=dtype)
    fmt = make_format(kind, dtype, ref_o)
    out, lse = aq.merge_attn_states(o1, l1, o2, l2, return_lse=True, **format_kwargs(fmt))
    check_output(out, fmt, ref_o, eager_o, what=f"merge {dtype} {kind}")
    check_lse(lse, ref_lse)
    assert (out[2].float() == 0).all()


def test_merge_of_real_partials_is_full_attention():
    """Attention over each sequence's keys, merged from a prefix and a suffix of them (keys
    [0,17) | [17,40) of sequence 0, [40,41) | [41,63) of sequence 1), equals the one-pass
    attention."""
    dtype = DTYPES[0]
    q = randn(14, H, DV, dtype=dtype)
    k, v = randn(63, 2, DV, dtype=dtype), randn(63, 2, DV, dtype=dtype)
    cq = torch.tensor([0, 5, 14], dtype=torch.int32, device=DEVICE)
    ck = torch.tensor([0, 40, 63], dtype=torch.int32, device=DEVICE)
    pre_k = torch.tensor([0, 17, 18], dtype=torch.int32, device=DEVICE)
    sel_pre = torch.cat([torch.arange(0, 17), torch.arange(40, 41)]).to(DEVICE)
    sel_suf = torch.cat([torch.arange(17, 40), torch.arange(41, 63)]).to(DEVICE)
    suf_k = torch.tensor([0, 23, 45], dtype=torch.int32, device=DEVICE)
    kw = dict(return_lse=True, out_dtype=torch.float32)
    o1, l1 = aq.flash_attn_varlen_func(q, k[sel_pre], v[sel_pre], cq, pre_k, 9, 17, **kw)
    o2, l2 = aq.flash_attn_varlen_func(q, k[sel_suf], v[sel_suf], cq, suf_k, 9, 23, **kw)
    out, lse = aq.merge_attn_states(o1, l1, o2, l2, return_lse=True, out_dtype=torch.float32)
    ref_o, ref_lse = attention_ref_varlen(q, k, v, cq, ck)
    assert (out.double() - ref_o).abs().max() < 2e-2 * ref_o.abs().max()
    check_lse(lse, ref_lse)


@pytest.mark.parametrize("bad,exc,msg", [
    ("suffix shape", ValueError, "suffix_out"),
    ("lse shape", ValueError, "prefix_lse"),
    ("lse dtype", TypeError, "suffix_lse"),
    ("out dtype int", TypeError, "prefix_out"),
    ("fp8 without scale", ValueError, "output_scale"),
    ("out shape", ValueError, "out must be"),
])
def test_merge_rejected(bad, exc, msg):
    o1, l1, o2, l2 = partials(DTYPES[0])
    kw = {}
    if bad == "suffix shape":
        o2 = o2[:, :, :32]
    elif bad == "lse shape":
        l1 = l1.t().contiguous()
    elif bad == "lse dtype":
        l2 = l2.double()
    elif bad == "out dtype int":
        o1 = o1.to(torch.int32)
    elif bad == "fp8 without scale":
        kw = dict(out_dtype=torch.float8_e4m3fn)
    else:
        kw = dict(out=torch.empty(T, H, DV // 2, device=DEVICE, dtype=DTYPES[0]))
    with pytest.raises(exc, match=msg):
        aq.merge_attn_states(o1, l1, o2, l2, **kw)


def test_merge_torch_compile_fullgraph():
    o1, l1, o2, l2 = partials(DTYPES[0])
    scale = torch.tensor(0.05, device=DEVICE)

    def merged(o1, l1, o2, l2, scale):
        out, lse = aq.merge_attn_states(o1, l1, o2, l2, return_lse=True, output_scale=scale)
        return out.float() * scale, lse

    torch._dynamo.reset()
    compiled = torch.compile(merged, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    a, la = compiled(o1, l1, o2, l2, scale)
    b, lb = merged(o1, l1, o2, l2, scale)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert torch.isfinite(a).all() and (a.abs() > 0).float().mean() > 0.5
