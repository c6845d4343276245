"""FP8 inputs (SPEC "FP8 inputs"): e4m3 K/V (an FP8 KV cache) with bf16/fp16 q, and all three
FP8, with per-tensor or per-(sequence, KV head) descales, on every path and output format,
against float64 attention of the dequantized inputs."""

import pytest
import torch

import attnquant as aq
from attnquant import quant
from attnquant.kernels.portable.config import FwdConfig
from attnquant.reference import (attention_ref_batched, attention_ref_kvcache, attention_ref_varlen, fa3_distribution,
                                 rmse)

from .helpers import (DEVICE, DTYPES, GLUON, ON_GPU, check_lse, check_output, format_kwargs, make_format,
                      randn)
from .test_kvcache import to_paged

KINDS = ["plain", torch.float8_e4m3fn, "group", "nvfp4"]
FP8 = torch.float8_e4m3fn


def fp8(x, per_tensor, **kw):
    """x in FP8 with its descales, and the float64 values they stand for."""
    xq, d = quant.quantize_kv_fp8(x, per_tensor=per_tensor, **kw)
    return xq, d, quant.dequantize_kv_fp8(xq, d, kw.get("cu_seqlens"), paged="num_seqs" in kw)


def eager(x, dtype):
    """What an eager implementation would compute on: the dequantized values in dtype."""
    return x.to(dtype)


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "per_head"])
@pytest.mark.parametrize("causal", [False, True])
def test_fp8_kv_prefill(causal, per_tensor, kind):
    dtype = DTYPES[0]
    b, sq, sk, h, hkv, d = 2, 19 if not ON_GPU else 150, 37 if not ON_GPU else 230, 4, 2, 64
    q = randn(b, sq, h, d, dtype=dtype)
    # K/V whose heads and sequences have different ranges: per-head descales matter
    k = randn(b, sk, hkv, d, dtype=torch.float32) * torch.tensor([0.5, 3.0], device=DEVICE)[None, None, :, None]
    v = randn(b, sk, hkv, d, dtype=torch.float32) * torch.tensor([[2.0], [0.25]], device=DEVICE)[:, None, :, None]
    kq, kd, k64 = fp8(k, per_tensor)
    vq, vd, v64 = fp8(v, per_tensor)
    ref_o, ref_lse = attention_ref_batched(q, k64, v64, causal=causal)
    eager_o, _ = attention_ref_batched(q, eager(k64, dtype), eager(v64, dtype), causal=causal, eager_dtype=dtype)
    fmt = make_format(kind, dtype, ref_o)
    out, lse = aq.flash_attn_func(q, kq, vq, causal=causal, return_lse=True, k_descale=kd, v_descale=vd,
                                  **format_kwargs(fmt))
    what = f"fp8 kv causal={causal} per_tensor={per_tensor} {kind}"
    check_output(out, fmt, ref_o, eager_o, what=what)
    check_lse(lse, ref_lse, what)


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("num_splits", [1, 3, 0])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_fp8_kv_decode(paged, num_splits, kind):
    """Decode against an FP8 cache (shuffled pages; an empty sequence), split-KV merging the
    float32 partials before the format is applied."""
    dtype = DTYPES[0]
    bsz, sk_max, h, hkv, d = 4, 1000 if ON_GPU else 70, 8, 2, 128
    lens = torch.tensor([sk_max, 0, sk_max // 3, sk_max - 7], dtype=torch.int32, device=DEVICE)
    q = randn(bsz, 1, h, d, dtype=dtype)
    kc, vc = randn(bsz, sk_max, hkv, d, dtype=dtype), randn(bsz, sk_max, hkv, d, dtype=dtype)
    if paged:
        kp, bt = to_paged(kc, 16, torch.Generator().manual_seed(1))
        vp, _ = to_paged(vc, 16, torch.Generator().manual_seed(1))
        kq, kd, k64 = fp8(kp, False, num_seqs=bsz)
        vq, vd, v64 = fp8(vp, False, num_seqs=bsz)
        ref_o, ref_lse = attention_ref_kvcache(q, k64, v64, lens, block_table=bt)
        eager_o, _ = attention_ref_kvcache(q, eager(k64, dtype), eager(v64, dtype), lens, block_table=bt,
                                           eager_dtype=dtype)
    else:
        bt = None
        kq, kd, k64 = fp8(kc, False)
        vq, vd, v64 = fp8(vc, False)
        ref_o, ref_lse = attention_ref_kvcache(q, k64, v64, lens)
        eager_o, _ = attention_ref_kvcache(q, eager(k64, dtype), eager(v64, dtype), lens, eager_dtype=dtype)
    fmt = make_format(kind, dtype, ref_o)
    out, lse = aq.flash_attn_with_kvcache(q, kq, vq, lens, block_table=bt, num_splits=num_splits, return_lse=True,
                                         k_descale=kd, v_descale=vd, **format_kwargs(fmt))
    what = f"fp8 cache paged={paged} splits={num_splits} {kind}"
    check_output(out, fmt, ref_o, eager_o, what=what)
    check_lse(lse, ref_lse, what)


@pytest.mark.parametrize("paged", [False, True], ids=["packed", "paged"])
@pytest.mark.parametrize("kind", [torch.float8_e4m3fn, "nvfp4"], ids=str)
def test_fp8_kv_varlen(kind, paged):
    """Varlen with empty sequences and seqused_k, packed (descales per sequence) or paged."""
    dtype = DTYPES[0]
    lens_q, lens_k = [7, 0, 12, 3], [20, 0, 31, 9]
    h, hkv, d = 4, 2, 64
    cq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEVICE)
    ck = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEVICE)
    q = randn(sum(lens_q), h, d, dtype=dtype)
    k, v = randn(sum(lens_k), hkv, d, dtype=dtype), randn(sum(lens_k), hkv, d, dtype=dtype)
    used = torch.tensor([15, 0, 31, 9], dtype=torch.int32, device=DEVICE)
    kq, kd, k64 = fp8(k, False, cu_seqlens=ck)
    vq, vd, v64 = fp8(v, False, cu_seqlens=ck)
    ref_o, ref_lse = attention_ref_varlen(q, k64, v64, cq, ck, used, causal=True)
    eager_o, _ = attention_ref_varlen(q, eager(k64, dtype), eager(v64, dtype), cq, ck, used, causal=True,
                                      eager_dtype=dtype)
    fmt = make_format(kind, dtype, ref_o)
    kw = dict(causal=True, return_lse=True, k_descale=kd, v_descale=vd, **format_kwargs(fmt))
    if paged:  # the same values in shuffled pages of 8 (each sequence's keys from its first page)
        page, n = 8, 4
        cache_k = torch.zeros(len(lens_k), n * page, hkv, d, device=DEVICE, dtype=torch.float32)
        cache_v = torch.zeros_like(cache_k)
        for i, (lo, hi) in enumerate(zip(ck.tolist(), ck.tolist()[1:])):
            cache_k[i, :hi - lo] = kq[lo:hi].float()
            cache_v[i, :hi - lo] = vq[lo:hi].float()
        kp, bt = to_paged(cache_k, page, torch.Generator().manual_seed(2))
        vp, _ = to_paged(cache_v, page, torch.Generator().manual_seed(2))
        kp, vp = kp.to(FP8), vp.to(FP8)
        out, lse = aq.flash_attn_varlen_func(q, kp, vp, cq, None, max(lens_q), n * page, seqused_k=used,
                                             block_table=bt, **kw)
    else:
        out, lse = aq.flash_attn_varlen_func(q, kq, vq, cq, ck, max(lens_q), max(lens_k), seqused_k=used, **kw)
    check_output(out, fmt, ref_o, eager_o, what=f"fp8 varlen paged={paged} {kind}")
    check_lse(lse, ref_lse)


@pytest.mark.parametrize("kind", ["plain", torch.float8_e4m3fn, "nvfp4"], ids=str)
def test_fp8_attention_all_inputs(kind):
    """q, k, v all FP8 (FP8 attention), each with its descale; with no format asked for, the
    output is bf16."""
    b, s, h, hkv, d = 2, 33, 4, 2, 64
    q32 = randn(b, s, h, d, dtype=torch.float32) * 2
    qq, qd, q64 = fp8(q32, False)  # (B, Hkv) descales: a query head group shares its KV head's
    qq, qd = quant.quantize_kv_fp8(q32, per_tensor=True)
    q64 = qq.double() * qd.double()
    kq, kd, k64 = fp8(randn(b, s, hkv, d, dtype=torch.float32), False)
    vq, vd, v64 = fp8(randn(b, s, hkv, d, dtype=torch.float32), True)
    ref_o, ref_lse = attention_ref_batched(q64, k64, v64, causal=True)
    eager_o, _ = attention_ref_batched(q64.bfloat16(), k64.bfloat16(), v64.bfloat16(), causal=True,
                                       eager_dtype=torch.bfloat16)
    fmt = make_format(kind, torch.bfloat16, ref_o)
    out, lse = aq.flash_attn_func(qq, kq, vq, causal=True, return_lse=True, q_descale=qd, k_descale=kd, v_descale=vd,
                                  **({} if kind == "plain" else format_kwargs(fmt)))
    assert out.dtype == fmt.dtype
    check_output(out, fmt, ref_o, eager_o, what=f"fp8 attention {kind}")
    check_lse(lse, ref_lse)


def test_fp8_kv_without_descales_and_gluon_routing():
    """No descale means 1.0; the Gluon kernel does not take FP8 inputs (yet): backend='gluon'
    says so, 'auto' runs them on the portable kernel."""
    dtype = DTYPES[0]
    q = randn(1, 200, 4, 64, dtype=dtype)
    k = (randn(1, 200, 2, 64, dtype=torch.float32) * 3).to(FP8)
    v = (randn(1, 200, 2, 64, dtype=torch.float32) * 3).to(FP8)
    ref_o, _ = attention_ref_batched(q, k.double(), v.double(), causal=True)
    eager_o, _ = attention_ref_batched(q, k.to(dtype), v.to(dtype), causal=True, eager_dtype=dtype)
    out, _ = aq.flash_attn_func(q, k, v, causal=True)
    check_output(out, make_format("plain", dtype, ref_o), ref_o, eager_o)
    with pytest.raises(ValueError, match="FP8 inputs" if GLUON else "backend='gluon' cannot"):
        aq.flash_attn_func(q, k, v, causal=True, backend="gluon")


DESCALE_CASES = [
    ("descale on bf16 k", dict(k_descale=torch.ones(2, 2)), False, ValueError, "k_descale is only for an FP8"),
    ("descale float64", dict(k_descale=torch.ones(2, 2, dtype=torch.float64)), True, ValueError, "float32"),
    ("descale shape", dict(v_descale=torch.ones(2, 3)), True, ValueError, r"\(B, Hkv\)"),
    ("descale two elements", dict(k_descale=torch.ones(2)), True, ValueError, "one element"),
    ("descale not a tensor", dict(k_descale=1.0), True, TypeError, "k_descale"),
    ("q_descale with bf16 q", dict(q_descale=torch.ones(())), True, ValueError, "q_descale"),
]


@pytest.mark.parametrize("name,kw,fp8_kv,exc,msg", DESCALE_CASES, ids=[c[0] for c in DESCALE_CASES])
def test_descales_rejected(name, kw, fp8_kv, exc, msg):
    """SPEC validation of descales: a clear error naming the argument, nothing written."""
    dtype = DTYPES[0]
    q = randn(2, 8, 4, 64, dtype=dtype)
    k, v = randn(2, 8, 2, 64, dtype=dtype), randn(2, 8, 2, 64, dtype=dtype)
    if fp8_kv:
        k, v = k.to(FP8), v.to(FP8)
    kw = {key: (val.to(DEVICE) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    out = torch.full((2, 8, 4, 64), 5.0, device=DEVICE, dtype=dtype)
    with pytest.raises(exc, match=msg):
        aq.flash_attn_func(q, k, v, out=out, **kw)
    assert (out == 5).all()


@pytest.mark.skipif(not ON_GPU, reason="Triton's CPU interpreter decodes the e4m3 NaN code 0x7F as 480")
def test_fp8_nan_input_gives_nan():
    """A NaN in an FP8 K (the e4m3 NaN code) makes the rows that see it NaN; a NaN descale too."""
    q = randn(1, 40, 4, 64, dtype=DTYPES[0])
    k, v = randn(1, 40, 2, 64, dtype=torch.float32).to(FP8), randn(1, 40, 2, 64, dtype=torch.float32).to(FP8)
    k.view(torch.uint8)[0, 20, 1, 5] = 0x7F
    out, lse = aq.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert out[0, 20:, 2:].isnan().all() and out[0, :20].isfinite().all() and out[0, :, :2].isfinite().all()
    out, _ = aq.flash_attn_func(q, k.view(torch.uint8).clamp(max=0x7E).view(FP8), v, causal=True,
                                v_descale=torch.full((1, 2), float("nan"), device=DEVICE))
    assert out.isnan().all()


def f16_dots_config():
    """The fp16-dot candidate (FwdConfig.f16_dots) on a decode tile of this machine."""
    return FwdConfig(16, 128, 4, 3, True, f16_dots=True) if ON_GPU else FwdConfig(16, 16, 4, 1, True, f16_dots=True)


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("magnitude", [1.0, 3e5, 1e-5], ids=["q~1", "q~3e5", "q~1e-5"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_fp8_kv_f16_dots(paged, magnitude, kind):
    """FP8 K/V with the dots in fp16: a bf16 q scaled into fp16's range by a power of two, from
    magnitudes past fp16's largest (65504) down to where fp16 has no normal numbers; split-KV."""
    bsz, sk_max, h, hkv, d = 3, 600 if ON_GPU else 50, 8, 2, 128
    lens = torch.tensor([sk_max, 1, sk_max - 9], dtype=torch.int32, device=DEVICE)
    q = (randn(bsz, 1, h, d, dtype=torch.float32) * magnitude).bfloat16()
    scale = d ** -0.5 / magnitude  # scores of order 1 whatever q's magnitude
    kc, vc = randn(bsz, sk_max, hkv, d, dtype=torch.float32), randn(bsz, sk_max, hkv, d, dtype=torch.float32)
    bt = None
    if paged:
        kc, bt = to_paged(kc, 16, torch.Generator().manual_seed(3))
        vc, _ = to_paged(vc, 16, torch.Generator().manual_seed(3))
    kw = dict(num_seqs=bsz) if paged else {}
    kq, kd, k64 = fp8(kc, False, **kw)
    vq, vd, v64 = fp8(vc, True, **kw)
    ref_o, ref_lse = attention_ref_kvcache(q, k64, v64, lens, block_table=bt, softmax_scale=scale)
    eager_o, _ = attention_ref_kvcache(q, k64.bfloat16(), v64.bfloat16(), lens, block_table=bt, softmax_scale=scale,
                                       eager_dtype=torch.bfloat16)
    fmt = make_format(kind, torch.bfloat16, ref_o)
    out, lse = aq.flash_attn_with_kvcache(q, kq, vq, lens, block_table=bt, softmax_scale=scale, num_splits=2,
                                         return_lse=True, k_descale=kd, v_descale=vd, _config=f16_dots_config(),
                                         **format_kwargs(fmt))
    what = f"fp16 dots paged={paged} |q|~{magnitude} {kind}"
    check_output(out, fmt, ref_o, eager_o, what=what)
    check_lse(lse, ref_lse, what)


def test_fp8_kv_f16_dots_nonfinite_q_rows():
    """With q scaled into fp16, a NaN or inf in one query row still makes that row NaN, and only
    that row (the scale comes from the finite entries)."""
    bsz, sk, h, hkv, d = 2, 40, 4, 1, 64
    q = randn(bsz, 1, h, d, dtype=torch.float32).bfloat16()
    q[0, 0, 1, 3] = float("nan")
    q[1, 0, 2, 0] = float("inf")
    kq, kd, _ = fp8(randn(bsz, sk, hkv, d, dtype=torch.float32), True)
    vq, vd, _ = fp8(randn(bsz, sk, hkv, d, dtype=torch.float32), True)
    lens = torch.full((bsz,), sk, dtype=torch.int32, device=DEVICE)
    out, lse = aq.flash_attn_with_kvcache(q, kq, vq, lens, k_descale=kd, v_descale=vd, return_lse=True,
                                         _config=f16_dots_config())
    bad = torch.zeros(bsz, 1, h, dtype=torch.bool, device=DEVICE)
    bad[0, 0, 1] = bad[1, 0, 2] = True
    assert out[bad].isnan().all() and out[~bad].isfinite().all()
    assert lse.transpose(1, 2)[bad].isnan().all()


def test_hadamard_rotation_keeps_scores():
    r = aq.hadamard_rotation(64, device=DEVICE)
    assert torch.allclose(r @ r.T, torch.eye(64, device=DEVICE), atol=1e-6)
    q, k = randn(5, 64, dtype=torch.float32), randn(7, 64, dtype=torch.float32)
    assert torch.allclose((q @ r) @ (k @ r).T, q @ k.T, atol=1e-4)
    with pytest.raises(ValueError, match="power-of-two"):
        aq.hadamard_rotation(96)


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per_tensor", "per_head"])
def test_quantize_qkv_fp8(per_tensor):
    """The descales the kernels read: q's per (batch, KV head) over its query group, and every
    value within an e4m3 rounding step of its input."""
    q, k, v = randn(2, 5, 6, 32, dtype=torch.float32), randn(2, 7, 3, 32, dtype=torch.float32), \
        randn(2, 7, 3, 16, dtype=torch.float32)
    q[1, :, 4:] *= 50  # the second batch's last KV group: a larger range, its own descale
    x = aq.quantize_qkv_fp8(q, k, v, per_tensor=per_tensor)
    assert x.rotation is None and all(t.dtype == FP8 for t in (x.q, x.k, x.v))
    shape = () if per_tensor else (2, 3)
    assert x.q_descale.shape == x.k_descale.shape == x.v_descale.shape == shape
    q_deq, k_deq, _ = x.dequantized()
    scale = q.abs().amax() if per_tensor else q.abs().amax(dim=(1, 3)).reshape(2, 3, 2).amax(-1)
    assert torch.allclose(x.q_descale.double(), scale.double() / 448)
    assert ((q_deq - q.double()).abs() <= q.double().abs() / 16 + x.q_descale.double().max() * 2 ** -9).all()
    assert ((k_deq - k.double()).abs() <= k.double().abs() / 16 + x.k_descale.double().max() * 2 ** -9).all()


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotated"])
def test_fp8_attention_accuracy_fa3_distribution(rotate):
    """FP8 attention's error on FA3's test distribution against float64 attention of the
    unquantized inputs (absolute RMSE): FA3 reports 2.4e-2 for its baseline FP8 attention and
    9.1e-3 with block quantization and a Hadamard rotation. Ours, the quantized inputs alone:
    at the GPU's shape 1.5-1.8e-2 and 7.4-8.8e-3 over 12 draws; at the CPU's, 1.6e-2 and
    1.1e-2 at most over 100 draws (median 9.0e-3), and an outlier landing where many rows
    look can push one draw past that: the bounds are loose (the script tools/fp8_accuracy.py
    prints the numbers). The kernel is held tightly to the error of its quantized inputs."""
    b, s, h, d = (1, 2048, 8, 128) if ON_GPU else (2, 256, 4, 128)
    q, k, v = (fa3_distribution(b, s, h, d, device=DEVICE) for _ in range(3))
    ref, _ = attention_ref_batched(q.double(), k.double(), v.double())
    x = aq.quantize_qkv_fp8(q, k, v, rotate_qk=rotate)
    model, _ = attention_ref_batched(*x.dequantized())
    out, _ = aq.flash_attn_func(x.q, x.k, x.v, **x.kwargs())
    err, err_model = rmse(out, ref), rmse(model, ref)
    assert err <= 1.1 * err_model + 2e-4, (err, err_model)
    assert err <= (1.2e-2 if ON_GPU else 1.5e-2) if rotate else err <= 2.4e-2, err
