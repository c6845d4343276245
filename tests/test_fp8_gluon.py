"""FP8 attention on the Hopper Gluon kernel (q, k, v all e4m3: FP8 wgmmas, P in e4m3, V read as
V^T): every output format, d 64/128, causal or not, MHA/GQA, descales per (B, Hkv), per tensor or
none, against float64 attention of the dequantized inputs; the calls it does not take; and (on
any machine) the host's V^T copy, whose key order must match the kernel's reordered P."""

from dataclasses import replace

import pytest
import torch

import attnquant as aq
from attnquant import dispatch, quant
from attnquant.kernels.hopper import config as hcfg, launch as hopper
from attnquant.problem import Attention, make_problem
from attnquant.reference import attention_ref_batched, visible_mask

from .helpers import DEVICE, GLUON, check_lse, check_output, format_kwargs, make_format, randn

needs_gluon = pytest.mark.skipif(not GLUON, reason="the Gluon kernel runs on sm_90 GPUs only")
FP8 = torch.float8_e4m3fn
KINDS = ["plain", FP8, "group", "group_ue8m0", "nvfp4"]


def fp8_inputs(b, sq, sk, h, hkv, d, descales):
    """Random q, k, v in e4m3 with their descales ('per_head': (B, Hkv); 'per_tensor': one
    element; 'none': the values themselves e4m3, no descale), and the float64 values they stand
    for. Heads and batches get different ranges, so a descale read for the wrong (b, head) shows."""
    group = h // hkv
    spread = torch.tensor([0.5, 2.0, 1.0, 1.5], device=DEVICE)[:hkv]  # (hkv <= 4)
    q = randn(b, sq, hkv, group * d, dtype=torch.float32) * spread[None, None, :, None]
    k = randn(b, sk, hkv, d, dtype=torch.float32) * spread[None, None, :, None]
    v = randn(b, sk, hkv, d, dtype=torch.float32) * torch.linspace(0.25, 3.0, b, device=DEVICE)[:, None, None, None]
    out, kw = [], {}
    for name, x in (("q", q), ("k", k), ("v", v)):
        if descales == "none":
            xq = x.to(FP8)
            x64 = xq.double()
        else:  # q's (B, Hkv) descales: each KV head's group of query heads shares one (SPEC)
            xq, ds = quant.quantize_kv_fp8(x, per_tensor=descales == "per_tensor")
            x64 = quant.dequantize_kv_fp8(xq, ds)
            kw[f"{name}_descale"] = ds
        out += [xq, x64]
    qq, q64, kq, k64, vq, v64 = out
    return (qq.reshape(b, sq, h, d), kq, vq, kw), (q64.reshape(b, sq, h, d), k64, v64)


def fp8_attention_eager(q, k, v, causal):
    """What an eager FP8-attention implementation computes: float64, except that P = exp(s - max)
    is rounded to e4m3 for the PV product (the row sum stays unrounded), like the kernel's P.
    q (B, Sq, H, D), k/v (B, Sk, Hkv, *) float64 -> (B, Sq, H, Dv)."""
    group = q.shape[2] // k.shape[2]
    qf = q.permute(0, 2, 1, 3)
    kf = k.repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    vf = v.repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    s = qf @ kf.transpose(-1, -2) * q.shape[-1] ** -0.5
    s = s.masked_fill(~visible_mask(q.shape[1], k.shape[1], causal, device=q.device), float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    l = p.sum(-1, keepdim=True)
    o = p.to(FP8).double() @ vf / torch.where(l == 0, torch.ones_like(l), l)
    return o.permute(0, 2, 1, 3)


def run_and_check(inputs, refs, causal, kind, config=None):
    (qq, kq, vq, kw), (q64, k64, v64) = inputs, refs
    ref_o, ref_lse = attention_ref_batched(q64, k64, v64, causal=causal)
    eager_o = fp8_attention_eager(q64, k64, v64, causal)
    fmt = make_format(kind, torch.bfloat16, ref_o)
    out, lse = aq.flash_attn_func(qq, kq, vq, causal=causal, return_lse=True, backend="gluon", _config=config,
                                  **kw, **format_kwargs(fmt))
    what = f"gluon fp8 {tuple(qq.shape)} {tuple(kq.shape)} causal={causal} {kind} {sorted(kw)}"
    check_output(out, fmt, ref_o, eager_o, what=what, scales_from=eager_o)
    check_lse(lse, ref_lse, what, tol=2e-3 + FP8_MMA_PRECISION * score_magnitude(q64, k64))


# Hopper's FP8 wgmma adds its products with about 13 bits of precision (not fp32's 24: FA3 and
# DeepSeek-V3 report the same), so a score is off by up to ~2^-13 of sum_d |q_d k_d| (x scale);
# the LSE, a soft maximum of the scores, inherits it. 2^-12: a factor of two of margin.
FP8_MMA_PRECISION = 2.0 ** -12


def score_magnitude(q, k):
    """max over (batch, head, query, key) of scale x sum_d |q_d k_d| (float64 inputs)."""
    group = q.shape[2] // k.shape[2]
    qa = q.abs().permute(0, 2, 1, 3)
    ka = k.abs().repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    return (qa @ ka.transpose(-1, -2)).max().item() * q.shape[-1] ** -0.5


@needs_gluon
@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("descales", ["per_head", "per_tensor", "none"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_fp8_attention_gluon(heads, d, causal, descales, kind):
    """Sk = 300 (not a multiple of 16: the V^T copy's padded last group), Sq = 200 < Sk."""
    h, hkv = heads
    inputs, refs = fp8_inputs(2, 200, 300, h, hkv, d, descales)
    run_and_check(inputs, refs, causal, kind)


@needs_gluon
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_fp8_attention_gluon_long(d, causal):
    """Many key blocks (the K/V ring wraps) on 13 persistent CTAs, each walking ~11 of the 144
    tiles; non-causal, the last wave's tile is split in 8 along the keys (merged in the kernel);
    Sq > Sk leaves causal rows with no key."""
    inputs, refs = fp8_inputs(2, 1100, 900, 8, 2, d, "per_head")
    cfg = replace(hcfg.ws_config(d, d, in_bytes=1), ctas=13)
    if not causal:
        p = make_problem(*inputs[:3], 1100, 900)
        assert hcfg.schedule(p, cfg, causal, 132).parts == 8
    run_and_check(inputs, refs, causal, FP8, config=cfg)


@needs_gluon
def test_fp8_attention_auto_takes_gluon():
    """backend='auto' runs batched FP8 attention on the Gluon kernel (the plan says so)."""
    (qq, kq, vq, kw), _ = fp8_inputs(1, 256, 256, 4, 2, 128, "per_head")
    p = make_problem(qq, kq, vq, 256, 256, q_descale=kw["q_descale"], k_descale=kw["k_descale"],
                     v_descale=kw["v_descale"])
    assert dispatch.plan(p, Attention(128 ** -0.5, True), 0, None).gluon


FP8_REFUSED = [
    # (name, q dtype, k/v dtype, head dim, varlen, reason)
    ("fp8 kv with bf16 q", torch.bfloat16, FP8, 128, False, "k/v are torch.float8_e4m3fn with a torch.bfloat16 q: FP8 inputs run on the portable kernel unless"),
    ("fp8 attention d256", FP8, FP8, 256, False, "FP8 inputs with head dims 256/256"),
    ("fp8 attention varlen", FP8, FP8, 128, True, "FP8 inputs of a varlen or paged call"),
]


@pytest.mark.parametrize("name,q_dtype,kv_dtype,d,varlen,reason", FP8_REFUSED, ids=[c[0] for c in FP8_REFUSED])
def test_fp8_gluon_refuses_with_reason(name, q_dtype, kv_dtype, d, varlen, reason):
    """backend='gluon' never falls back silently: FP8 calls its FP8 path does not take raise a
    ValueError saying why (on a machine without an sm_90 GPU: that it needs one); 'auto' runs
    them on the portable kernel."""
    q = randn(2, 80, 4, d, dtype=torch.float32).to(q_dtype)
    k = randn(2, 80, 2, d, dtype=torch.float32).to(kv_dtype)
    v = randn(2, 80, 2, d, dtype=torch.float32).to(kv_dtype)
    kw = {}
    if varlen:
        cu = torch.tensor([0, 70, 160], dtype=torch.int32, device=DEVICE)
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        call = lambda **more: aq.flash_attn_varlen_func(q, k, v, cu, cu, 90, 90, causal=True, **kw, **more)  # noqa
    else:
        call = lambda **more: aq.flash_attn_func(q, k, v, causal=True, **kw, **more)  # noqa
    expected = "backend='gluon' cannot run this call: " + (reason if GLUON else "it needs")
    with pytest.raises(ValueError, match=expected):
        call(backend="gluon")
    if GLUON:
        out, _ = call()  # 'auto': the portable kernel
        assert out.isfinite().all()


@pytest.mark.parametrize("sk", [1, 16, 37, 300])
def test_transposed_v_key_order(sk):
    """The host's V^T (launch.transposed_v) against its definition: (B, Hkv, Dv, Sk rounded up to 16),
    stored column 16c + 4t + 2h + e holding key 16c + 8h + 2t + e, zeros past Sk; and the PV product
    of the kernel's reordered P (softmax.fp8_key_order's reshape and swap, restated in torch)
    with it is P V."""
    b, hkv, dv = 2, 3, 32
    v = randn(b, sk, hkv, dv, dtype=torch.float32).to(FP8)
    vt = hopper.transposed_v(v)
    pad = -(-sk // 16) * 16
    assert vt.dtype == FP8 and vt.shape == (b, hkv, dv, pad) and vt.is_contiguous()
    col = torch.arange(pad, device=DEVICE)
    c, t, h, e = col // 16, col % 16 // 4, col % 4 // 2, col % 2
    key = 16 * c + 8 * h + 2 * t + e
    assert sorted(key.tolist()) == list(range(pad))  # a permutation of the padded keys
    real = key < sk
    expect = v.double().permute(0, 2, 3, 1)[..., key.clamp(max=sk - 1)]
    got = vt.double()
    assert torch.equal(got[..., real], expect[..., real])
    assert (got[..., ~real] == 0).all()
    # P V with the kernel's reorder of P's keys, against the plain product
    rows = 8
    p = torch.rand(b, hkv, rows, sk, dtype=torch.float64, device=DEVICE)
    p_pad = torch.nn.functional.pad(p, (0, pad - sk))
    p_kernel = p_pad.unflatten(-1, (-1, 2, 4, 2)).permute(0, 1, 2, 3, 5, 4, 6).flatten(-4)
    assert torch.allclose(p_kernel @ got.transpose(-1, -2), p @ v.double().permute(0, 2, 1, 3))


@needs_gluon
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_fp8_attention_accuracy_fa3_distribution(causal):
    """FP8 attention on FA3's distribution (standard normal with 0.1 % outliers of standard deviation
    10), e4m3 q/k/v with (B, Hkv) descales from the bf16 tensors: relative RMSE against float64
    attention of the bf16 tensors within FA3's baseline FP8 figure (2.4e-2), loosely (3e-2); the
    bf16 inputs' own error (< 1e-2) shows the reference is the right one. The benchmark's
    accuracy table prints the numbers (python -m attnquant.bench --fp8-attention)."""
    from attnquant.bench import fa3_inputs, fp8_inputs, rel_rmse
    q, k, v = fa3_inputs(1, 1024, 8, 2, 128, seed=int(torch.randint(0, 2**31, ())))
    ref, _ = attention_ref_batched(q.double(), k.double(), v.double(), causal=causal)
    qq, kq, vq, descales = fp8_inputs(q, k, v)
    err_fp8 = rel_rmse(aq.flash_attn_func(qq, kq, vq, causal=causal, backend="gluon", **descales)[0], ref)
    err_bf16 = rel_rmse(aq.flash_attn_func(q, k, v, causal=causal, backend="gluon")[0], ref)
    assert err_fp8 < 3e-2, err_fp8
    assert err_bf16 < 1e-2, err_bf16
