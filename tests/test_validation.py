"""Every rejected argument raises ValueError / TypeError naming it, and leaves `out` untouched."""

import pytest
import torch

import attnquant as aq

from .helpers import DEVICE, DTYPES, randn

DT = DTYPES[0]


def qkv(b=2, sq=8, sk=8, h=4, hkv=2, d=64, dv=64, dtype=DT):
    return randn(b, sq, h, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, dv, dtype=dtype)


def scale(x=0.01, shape=()):
    return torch.full(shape, x, dtype=torch.float32, device=DEVICE)


def sentinel_out(dtype, shape=(2, 8, 4, 64)):
    return torch.full(shape, 3.0, device=DEVICE).to(dtype)


# (name, kwargs builder, exception, message fragment)
FORMAT_CASES = [
    ("fp8 out without scale", lambda: dict(out=sentinel_out(torch.float8_e4m3fn)), ValueError, "output_scale"),
    ("scale with bf16 out", lambda: dict(out=sentinel_out(DT), output_scale=scale()), ValueError, "output_scale"),
    ("scale with out_dtype fp16", lambda: dict(out_dtype=torch.float16, output_scale=scale()), ValueError,
     "output_scale"),
    ("both scales", lambda: dict(out=sentinel_out(torch.float8_e4m3fn), output_scale=scale(),
                                 output_block_scale=torch.empty(2, 8, 4, device=DEVICE)), ValueError,
     "output_block_scale"),
    ("float64 scale", lambda: dict(out=sentinel_out(torch.float8_e4m3fn),
                                   output_scale=scale().double()), ValueError, "output_scale"),
    ("2-element scale", lambda: dict(out=sentinel_out(torch.float8_e4m3fn), output_scale=scale(shape=(2,))),
     ValueError, "output_scale"),
    ("(1,1) scale", lambda: dict(out=sentinel_out(torch.float8_e4m3fn), output_scale=scale(shape=(1, 1))),
     ValueError, "output_scale"),
    ("python float scale", lambda: dict(out=sentinel_out(torch.float8_e4m3fn), output_scale=0.5), TypeError,
     "output_scale"),
    ("ue8m0 with static fp8", lambda: dict(out=sentinel_out(torch.float8_e4m3fn), output_scale=scale(),
                                           ue8m0=True), ValueError, "ue8m0"),
    ("ue8m0 with bf16", lambda: dict(out=sentinel_out(DT), ue8m0=True), ValueError, "ue8m0"),
    ("out_dtype disagrees with out", lambda: dict(out=sentinel_out(DT), out_dtype=torch.float8_e4m3fn,
                                                  output_scale=scale()), ValueError, "out_dtype"),
    ("int out", lambda: dict(out=torch.zeros(2, 8, 4, 64, dtype=torch.int32, device=DEVICE)), TypeError,
     "output dtype"),
    ("bad out_dtype string", lambda: dict(out_dtype="fp8"), ValueError, "out_dtype"),
    ("wrong out shape", lambda: dict(out=sentinel_out(DT, (2, 8, 4, 32))), ValueError, "out must have shape"),
    ("non-contiguous out", lambda: dict(out=sentinel_out(DT, (2, 8, 4, 128))[..., ::2]), ValueError, "out"),
]


@pytest.mark.parametrize("name,build,exc,msg", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_output_format_rejected(name, build, exc, msg):
    q, k, v = qkv()
    kw = build()
    out = kw.get("out")
    before = None if out is None else out.clone()
    with pytest.raises(exc, match=msg):
        aq.flash_attn_func(q, k, v, **kw)
    if out is not None:  # nothing written on rejection
        assert torch.equal(out.float(), before.float())


def test_scale_on_other_device():
    if DEVICE.type == "cuda":
        s = torch.tensor(0.01)  # CPU scale, CUDA inputs
    else:
        s = torch.tensor(0.01, device="meta")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="output_scale"):
        aq.flash_attn_func(q, k, v, output_scale=s)


INPUT_CASES = [
    ("q rank", lambda q, k, v: (q[0], k, v), {}, ValueError, "q must have 4"),
    ("q float32", lambda q, k, v: (q.float(), k, v), {}, TypeError, "q must be"),
    ("k dtype", lambda q, k, v: (q, k.float(), v.float()), {}, TypeError, "k must be"),
    ("k/v dtypes mixed", lambda q, k, v: (q, k.to(torch.float8_e4m3fn), v), {}, TypeError, "one dtype"),
    ("fp8 q with bf16 k", lambda q, k, v: (q.to(torch.float8_e4m3fn), k, v), {}, TypeError, "FP8"),
    ("descale without fp8", lambda q, k, v: (q, k, v), dict(k_descale=torch.ones(())), ValueError, "k_descale"),
    ("sinks shape", lambda q, k, v: (q, k, v), dict(sinks=torch.zeros(3)), ValueError, "sinks"),
    ("sinks dtype", lambda q, k, v: (q, k, v), dict(sinks=torch.zeros(4, dtype=torch.int32)), TypeError, "sinks"),
    ("sinks not a tensor", lambda q, k, v: (q, k, v), dict(sinks=[0.0] * 4), TypeError, "sinks"),
    ("H % Hkv", lambda q, k, v: (q[:, :, :3], k, v), {}, ValueError, "multiple"),
    ("k head dim", lambda q, k, v: (q, k[..., :32], v), {}, ValueError, "head dim"),
    ("unsupported head dim", lambda q, k, v: (q[..., :40], k[..., :40], v), {}, ValueError, "head dim 40"),
    ("v head dim", lambda q, k, v: (q, k, v[..., :40]), {}, ValueError, "v's head dim"),
    ("k/v seq mismatch", lambda q, k, v: (q, k, v[:, :5]), {}, ValueError, "k and v"),
    ("batch mismatch", lambda q, k, v: (q, k[:1], v[:1]), {}, ValueError, "batch"),
    ("last dim not contiguous", lambda q, k, v: (q.transpose(2, 3).contiguous().transpose(2, 3), k, v), {},
     ValueError, "q must be contiguous"),
    ("q not a tensor", lambda q, k, v: (q.tolist(), k, v), {}, TypeError, "q must be a torch.Tensor"),
    ("window type", lambda q, k, v: (q, k, v), dict(window_size=5), TypeError, "window_size"),
    ("window value", lambda q, k, v: (q, k, v), dict(window_size=(-2, 0)), ValueError, "window_size"),
    ("softcap negative", lambda q, k, v: (q, k, v), dict(softcap=-1.0), ValueError, "softcap"),
    ("softmax_scale tensor", lambda q, k, v: (q, k, v), dict(softmax_scale=torch.tensor(0.1)), TypeError,
     "softmax_scale"),
    ("softmax_scale zero", lambda q, k, v: (q, k, v), dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    ("num_splits negative", lambda q, k, v: (q, k, v), dict(num_splits=-1), ValueError, "num_splits"),
    ("num_splits float", lambda q, k, v: (q, k, v), dict(num_splits=2.0), TypeError, "num_splits"),
    ("causal not bool", lambda q, k, v: (q, k, v), dict(causal=1), TypeError, "causal"),
]


@pytest.mark.parametrize("name,mutate,kw,exc,msg", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_inputs_rejected(name, mutate, kw, exc, msg):
    q, k, v = mutate(*qkv())
    kw = {key: (val.to(DEVICE) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    out = sentinel_out(DT)
    before = out.clone()
    with pytest.raises(exc, match=msg):
        aq.flash_attn_func(q, k, v, out=out, **kw)
    assert torch.equal(out, before)


def test_cpu_tensors_rejected_on_gpu_path():
    if DEVICE.type == "cuda":
        q, k, v = qkv()
        with pytest.raises(ValueError, match="k is on cpu"):
            aq.flash_attn_func(q, k.cpu(), v)
        with pytest.raises(ValueError, match="CUDA"):
            aq.flash_attn_func(q.cpu(), k.cpu(), v.cpu())
    else:  # without a GPU the interpreter runs CPU tensors; a tensor elsewhere is still rejected
        q, k, v = qkv()
        with pytest.raises(ValueError, match="v is on meta"):
            aq.flash_attn_func(q, k, v.to("meta"))


def cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)


def varlen_inputs():
    q, k, v = randn(10, 4, 64, dtype=DT), randn(12, 2, 64, dtype=DT), randn(12, 2, 64, dtype=DT)
    return q, k, v, cu([4, 6]), cu([5, 7])


VARLEN_CASES = [
    ("cu_seqlens_q int64", lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError, "cu_seqlens_q"),
    ("cu_seqlens_q 2-D", lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][None]), ValueError, "cu_seqlens_q"),
    ("cu_seqlens_k length", lambda a: a.update(cu_seqlens_k=cu([5, 3, 4])), ValueError, "cu_seqlens_k"),
    ("max_seqlen_q float", lambda a: a.update(max_seqlen_q=6.0), TypeError, "max_seqlen_q"),
    ("max_seqlen_q > total", lambda a: a.update(max_seqlen_q=11), ValueError, "max_seqlen_q"),
    ("max_seqlen_k > total", lambda a: a.update(max_seqlen_k=13), ValueError, "max_seqlen_k"),
    ("q rank", lambda a: a.update(q=a["q"][None]), ValueError, "q must have 3"),
    ("seqused_k shape", lambda a: a.update(seqused_k=torch.ones(3, dtype=torch.int32, device=DEVICE)), ValueError,
     "seqused_k"),
    ("cu_seqlens_k None without seqused", lambda a: a.update(cu_seqlens_k=None), ValueError, "cu_seqlens_k"),
]
if DEVICE.type == "cpu":  # values are checked only where reading them costs no device sync
    VARLEN_CASES += [
        ("cu_seqlens_q exceeds max_seqlen_q", lambda a: a.update(max_seqlen_q=5), ValueError, "max_seqlen"),
        ("cu_seqlens_q decreasing", lambda a: a.update(cu_seqlens_q=cu([4, -2])), ValueError, "non-decreasing"),
    ]


@pytest.mark.parametrize("name,edit,exc,msg", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_varlen_rejected(name, edit, exc, msg):
    q, k, v, cq, ck = varlen_inputs()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=6, max_seqlen_k=7)
    edit(args)
    out = torch.full((10, 4, 64), 5.0, device=DEVICE, dtype=DT)
    with pytest.raises(exc, match=msg):
        aq.flash_attn_varlen_func(**args, out=out)
    assert (out == 5).all()


def kvcache_inputs(paged):
    q = randn(2, 1, 4, 64, dtype=DT)
    if paged:
        kc, vc = randn(6, 16, 2, 64, dtype=DT), randn(6, 16, 2, 64, dtype=DT)
        bt = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=DEVICE)
    else:
        kc, vc, bt = randn(2, 40, 2, 64, dtype=DT), randn(2, 40, 2, 64, dtype=DT), None
    return dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=torch.tensor([30, 7], dtype=torch.int32,
                                                                         device=DEVICE), block_table=bt)


KV_CASES = [
    ("block_table int64", True, lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table"),
    ("block_table rows", True, lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "block_table"),
    ("block_table 1-D", True, lambda a: a.update(block_table=a["block_table"][0]), ValueError, "block_table"),
    ("page size 24", True, lambda a: a.update(k_cache=randn(6, 24, 2, 64, dtype=DT),
                                              v_cache=randn(6, 24, 2, 64, dtype=DT)), ValueError, "page size"),
    ("cache heads mismatch", False, lambda a: a.update(v_cache=randn(2, 40, 1, 64, dtype=DT)), ValueError, "k and v"),
    ("cache head dim", False, lambda a: a.update(k_cache=randn(2, 40, 2, 32, dtype=DT)), ValueError, "head dim"),
    ("cache batch", False, lambda a: a.update(k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1]), ValueError,
     "batch"),
    ("cache_seqlens int64", False, lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError,
     "cache_seqlens"),
    ("cache_seqlens shape", False, lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), ValueError,
     "cache_seqlens"),
    ("int cache_seqlens beyond cache", False, lambda a: a.update(cache_seqlens=41), ValueError, "cache_seqlens"),
]
if DEVICE.type == "cpu":
    KV_CASES += [
        ("cache_seqlens beyond cache", False, lambda a: a.update(cache_seqlens=torch.tensor([41, 3],
                                                                                            dtype=torch.int32)),
         ValueError, "cache_seqlens"),
        ("cache_seqlens beyond block table", True, lambda a: a.update(cache_seqlens=torch.tensor([49, 3],
                                                                                                dtype=torch.int32)),
         ValueError, "cache_seqlens"),
        ("block_table entry out of range", True, lambda a: a.update(block_table=torch.tensor(
            [[0, 1, 6], [3, 4, 5]], dtype=torch.int32)), ValueError, "block_table"),
    ]


@pytest.mark.parametrize("name,paged,edit,exc,msg", KV_CASES, ids=[c[0] for c in KV_CASES])
def test_kvcache_rejected(name, paged, edit, exc, msg):
    args = kvcache_inputs(paged)
    edit(args)
    out = torch.full((2, 1, 4, 64), 5.0, device=DEVICE, dtype=DT)
    with pytest.raises(exc, match=msg):
        aq.flash_attn_with_kvcache(**args, out=out)
    assert (out == 5).all()


GROUP_CASES = [  # q is (2, 8, 4, 64): H * Dv = 256
    ("scale dtype", dict(output_block_scale=torch.empty(2, 8, 4, dtype=torch.float16)), ValueError, "float32"),
    ("token dims", dict(output_block_scale=torch.empty(2, 7, 4)), ValueError, "shape"),
    ("G not dividing Dv", dict(output_block_scale=torch.empty(2, 8, 5)), ValueError, "output_block_scale"),
    ("G = 8 < 16", dict(output_block_scale=torch.empty(2, 8, 32)), ValueError, "G=8"),
    ("G = 48 not a power of two", dict(output_block_scale=torch.empty(2, 8, 4, 3)), ValueError, "shape"),
    ("heads dim", dict(output_block_scale=torch.empty(2, 8, 3, 1)), ValueError, "shape"),
    ("rank", dict(output_block_scale=torch.empty(16, 4)), ValueError, "shape"),
    ("bf16 out with block scale", dict(output_block_scale=torch.empty(2, 8, 4), out_dtype=DT), ValueError,
     "output_block_scale"),
    ("python list", dict(output_block_scale=[1.0]), TypeError, "output_block_scale"),
]


@pytest.mark.parametrize("name,kw,exc,msg", GROUP_CASES, ids=[c[0] for c in GROUP_CASES])
def test_group_scale_rejected(name, kw, exc, msg):
    q, k, v = qkv()
    kw = {key: (val.to(DEVICE) if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    out = sentinel_out(torch.float8_e4m3fn)
    before = out.clone()
    with pytest.raises(exc, match=msg):
        aq.flash_attn_func(q, k, v, out=out if "out_dtype" not in kw else None, **kw)
    assert torch.equal(out.float(), before.float())


def nvfp4_scales(rows=128, cols=16):  # (2, 8) tokens x 4 heads x 64 / 16 blocks
    return torch.zeros(rows, cols, device=DEVICE).to(torch.float8_e4m3fn)


NVFP4_CASES = [
    ("no global scale", lambda: dict(out_dtype="nvfp4", output_block_scale=nvfp4_scales()), ValueError,
     "output_scale"),
    ("no block scale", lambda: dict(out_dtype="nvfp4", output_scale=scale(1.0)), ValueError, "output_block_scale"),
    ("block scale dtype", lambda: dict(out_dtype="nvfp4", output_scale=scale(1.0),
                                       output_block_scale=torch.zeros(128, 16, device=DEVICE)), ValueError,
     "float8_e4m3fn"),
    ("block scale rows unpadded", lambda: dict(out_dtype="nvfp4", output_scale=scale(1.0),
                                               output_block_scale=nvfp4_scales(16, 16)), ValueError, r"\(128, 16\)"),
    ("block scale not contiguous", lambda: dict(out_dtype="nvfp4", output_scale=scale(1.0),
                                                output_block_scale=nvfp4_scales(128, 32)[:, ::2]), ValueError,
     "contiguous"),
    ("ue8m0", lambda: dict(out_dtype="nvfp4", output_scale=scale(1.0), output_block_scale=nvfp4_scales(),
                           ue8m0=True), ValueError, "ue8m0"),
    ("global scale 2 elements", lambda: dict(out_dtype="nvfp4", output_scale=scale(1.0, (2,)),
                                             output_block_scale=nvfp4_scales()), ValueError, "output_scale"),
    ("uint8 out unpacked", lambda: dict(out=torch.zeros(2, 8, 4, 64, dtype=torch.uint8, device=DEVICE),
                                        output_scale=scale(1.0), output_block_scale=nvfp4_scales()), ValueError,
     r"out must have shape \(2, 8, 4, 32\)"),
    ("unknown string", lambda: dict(out_dtype="fp4"), ValueError, "nvfp4"),
]


@pytest.mark.parametrize("name,make,exc,msg", NVFP4_CASES, ids=[c[0] for c in NVFP4_CASES])
def test_nvfp4_rejected(name, make, exc, msg):
    """NVFP4 needs both scales in their SPEC forms and a packed (..., H, Dv // 2) out; nothing is
    written on rejection (the block scales keep their contents too)."""
    q, k, v = qkv()
    kw = make()
    bs = kw.get("output_block_scale")
    before = bs.view(torch.uint8).clone() if isinstance(bs, torch.Tensor) and bs.dtype == torch.float8_e4m3fn else None
    with pytest.raises(exc, match=msg):
        aq.flash_attn_func(q, k, v, **kw)
    if before is not None:
        assert torch.equal(bs.view(torch.uint8), before)
