"""flash_attn_func against the float64 reference, every output format."""

import pytest
import torch

import attnquant as aq
from attnquant import quant
from attnquant.reference import attention_ref_batched

from .helpers import (BACKENDS, DEVICE, DTYPES, FP8, HEAD_DIMS, ON_GPU, check_lse, check_output, format_kwargs,
                      gluon_takes, make_format, randn)

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}
OUT_KINDS = ["plain"] + FP8 + ["nvfp4"]
# (B, Sq, Sk): ragged sizes that cross several tiles, Sq != Sk to exercise bottom-right causal.
SIZES = (2, 197, 260) if ON_GPU else (2, 19, 37)


def run_case(dtype, causal, dims, heads, kind, sizes=SIZES, window=(-1, -1), softcap=0.0, scale=None, **kw):
    b, sq, sk = sizes
    (d, dv), (h, hkv) = dims, heads
    q, k, v = randn(b, sq, h, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, dv, dtype=dtype)
    ref_kw = dict(causal=causal, window_size=window, softcap=softcap, softmax_scale=scale)
    ref_o, ref_lse = attention_ref_batched(q, k, v, **ref_kw)
    eager_o, _ = attention_ref_batched(q, k, v, eager_dtype=dtype, **ref_kw)
    fmt = make_format(kind, dtype, ref_o)
    out, lse = aq.flash_attn_func(q, k, v, return_lse=True, **ref_kw, **format_kwargs(fmt), **kw)
    what = f"{dtype} causal={causal} dims={dims} heads={heads} out={fmt.dtype} window={window} softcap={softcap}"
    check_output(out, fmt, ref_o, eager_o, softcap=softcap, what=what)
    check_lse(lse, ref_lse, what)
    return q, k, v, out, fmt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", OUT_KINDS, ids=str)
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matrix(dtype, causal, dims, heads, kind, backend):
    if backend == "gluon" and not gluon_takes(*dims):
        with pytest.raises(ValueError, match="backend='gluon' cannot run this call: head dims"):
            run_case(dtype, causal, dims, heads, kind, backend=backend)
        return
    run_case(dtype, causal, dims, heads, kind, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [(1, 64, 64), (2, 1, 50), (1, 50, 1), (3, 40, 17), (1, 16, 300)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_sizes(sizes, causal, backend):
    """Sk < Sq with causal leaves the first rows seeing no key: 0 and LSE -inf."""
    run_case(DTYPES[0], causal, (64, 64), (4, 2), torch.float8_e4m3fn, sizes=sizes, backend=backend)


@pytest.mark.parametrize("window,causal", [((8, 0), False), ((8, -1), False), ((-1, 5), False), ((6, 3), False),
                                           ((0, 0), False), ((10, 2), True), ((20, -1), True)], ids=str)
@pytest.mark.parametrize("kind", ["plain", torch.float8_e4m3fn], ids=str)
def test_window(window, causal, kind):
    run_case(DTYPES[-1], causal, (64, 64), (4, 1), kind, window=window)


@pytest.mark.parametrize("kind", OUT_KINDS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(kind, causal):
    run_case(DTYPES[0], causal, (128, 128), (4, 2), kind, softcap=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale(backend):
    run_case(DTYPES[0], True, (128, 128), (4, 4), torch.float8_e4m3fn, scale=0.3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fp8", FP8, ids=str)
@pytest.mark.parametrize("saturating", [True, False], ids=["saturating", "tiny"])
def test_scale_extremes(fp8, saturating, backend):
    """A scale that saturates many values (clamped, never NaN/inf) and one that leaves most near 0.
    On the Gluon kernel the whole 64-row tiles go out as fp8 code pairs (forward._fp8_pairs), the
    ragged last one through _to_fp8: both saturate here."""
    b, sq, sk = SIZES
    dtype = DTYPES[0]
    q, k, v = randn(b, sq, 4, 64, dtype=dtype), randn(b, sk, 2, 64, dtype=dtype), randn(b, sk, 2, 64, dtype=dtype)
    ref_o, _ = attention_ref_batched(q, k, v)
    eager_o, _ = attention_ref_batched(q, k, v, eager_dtype=dtype)
    # saturating: max|O| / scale = 8 x the format's max; tiny: = 4 x its smallest subnormal
    smallest = 2.0 ** (-9 if fp8 == torch.float8_e4m3fn else -16)
    scale = (ref_o.abs().max() / (8 * quant.fp8_max(fp8) if saturating else 4 * smallest)).float().reshape(1)
    fmt = quant.OutputFormat(quant.FP8_STATIC, fp8, scale=scale)
    out, _ = aq.flash_attn_func(q, k, v, out_dtype=fp8, output_scale=scale, backend=backend)
    check_output(out, fmt, ref_o, eager_o, what=f"saturating={saturating} backend={backend}")
    f = out.float()
    if saturating:
        assert (f.abs() == quant.fp8_max(fp8)).float().mean() > 0.05  # many saturate
    else:
        assert (f == 0).float().mean() > 0.3  # most flush to zero


def test_scale_0d_and_1_elem_identical():
    dtype = DTYPES[0]
    q, k, v = randn(2, 33, 4, 64, dtype=dtype), randn(2, 33, 2, 64, dtype=dtype), randn(2, 33, 2, 64, dtype=dtype)
    s0 = torch.tensor(0.01, device=DEVICE)
    a, _ = aq.flash_attn_func(q, k, v, causal=True, output_scale=s0)
    b, _ = aq.flash_attn_func(q, k, v, causal=True, output_scale=s0.reshape(1))
    assert a.dtype == torch.float8_e4m3fn
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("kind", ["plain", torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_preallocated_strided_out(kind):
    """out= is written in place through its strides (a slice of a wider buffer); the rest stays."""
    dtype = DTYPES[0]
    b, sq, sk, h, d = 2, 21, 30, 4, 64
    q, k, v = randn(b, sq, h, d, dtype=dtype), randn(b, sk, 2, d, dtype=dtype), randn(b, sk, 2, d, dtype=dtype)
    ref_o, _ = attention_ref_batched(q, k, v, causal=True)
    eager_o, _ = attention_ref_batched(q, k, v, causal=True, eager_dtype=dtype)
    fmt = make_format(kind, dtype, ref_o)
    wide = torch.full((b, sq, h + 2, d), 7.0, device=DEVICE).to(fmt.dtype)
    out = wide[:, :, 1:h + 1]
    res, lse = aq.flash_attn_func(q, k, v, causal=True, out=out, output_scale=fmt.scale)
    assert res.data_ptr() == out.data_ptr() and lse is None
    check_output(out, fmt, ref_o, eager_o)
    assert (wide[:, :, 0].float() == 7).all() and (wide[:, :, -1].float() == 7).all()


def test_strided_inputs():
    """q/k/v as views with padded head and token strides (only the last dim is contiguous)."""
    dtype = DTYPES[0]
    qkv = randn(2, 40, 3 * 4, 64 + 16, dtype=dtype)[..., :64]
    q, k, v = qkv[:, :, 0:4], qkv[:, :, 4:8:2], qkv[:, :, 8:12:2]
    ref_o, ref_lse = attention_ref_batched(q, k, v, causal=True)
    eager_o, _ = attention_ref_batched(q, k, v, causal=True, eager_dtype=dtype)
    out, lse = aq.flash_attn_func(q, k, v, causal=True, return_lse=True)
    check_output(out, make_format("plain", dtype, ref_o), ref_o, eager_o)
    check_lse(lse, ref_lse)


def test_fp32_out():
    dtype = DTYPES[0]
    q, k, v = randn(1, 30, 2, 64, dtype=dtype), randn(1, 30, 2, 64, dtype=dtype), randn(1, 30, 2, 64, dtype=dtype)
    ref_o, _ = attention_ref_batched(q, k, v)
    eager_o, _ = attention_ref_batched(q, k, v, eager_dtype=dtype)
    out, _ = aq.flash_attn_func(q, k, v, out_dtype=torch.float32)
    check_output(out, quant.OutputFormat(quant.PLAIN, torch.float32), ref_o, eager_o.float())


@pytest.mark.parametrize("block_ptr", [False, True])
@pytest.mark.parametrize("dims", [(64, 64), (192, 128), (96, 96)], ids=str)
def test_kv_load_paths(dims, block_ptr):
    """Both K/V address modes (block pointers, pointer tensors) on the same cases."""
    from attnquant.kernels.portable.config import FwdConfig

    cfg = FwdConfig(16, 16, 4, 1, block_ptr) if not ON_GPU else FwdConfig(128, 64, 8, 3, block_ptr)
    run_case(DTYPES[0], True, dims, (4, 2), torch.float8_e4m3fn, _config=cfg)


def test_torch_compile_fullgraph():
    """The entry points trace into one graph (the kernels are a registered torch op with a fake
    implementation) and the compiled call writes the same bytes as the eager one."""
    dtype = DTYPES[0]
    q, k, v = randn(2, 40, 4, 64, dtype=dtype), randn(2, 40, 2, 64, dtype=dtype), randn(2, 40, 2, 64, dtype=dtype)
    scale = torch.tensor(0.01, device=DEVICE)

    def attn(q, k, v, scale):
        out, lse = aq.flash_attn_func(q, k, v, causal=True, output_scale=scale, return_lse=True)
        return out.float() * scale, lse  # something downstream of the op in the same graph

    torch._dynamo.reset()
    compiled = torch.compile(attn, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    out_c, lse_c = compiled(q, k, v, scale)
    out_e, lse_e = attn(q, k, v, scale)
    assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e)
    ref_o, _ = attention_ref_batched(q, k, v, causal=True)
    assert ((out_c.double() - ref_o).abs().max() < 0.1 * ref_o.abs().max())


GROUP_LAYOUTS = ["flat", "heads", "colmajor", "colmajor_tma"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", GROUP_LAYOUTS)
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_fp8(dtype, causal, ue8m0, layout, backend):
    """Per-token-group FP8 (DeepSeek-style): scales written through any strides, UE8M0 or not."""
    from .helpers import group_format

    b, sq, sk = SIZES
    h, hkv, d = 4, 2, 128
    q, k, v = randn(b, sq, h, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    ref_o, ref_lse = attention_ref_batched(q, k, v, causal=causal)
    eager_o, _ = attention_ref_batched(q, k, v, causal=causal, eager_dtype=dtype)
    fmt = group_format(torch.float8_e4m3fn, (b, sq), h, d, 64, ue8m0, layout)
    out, lse = aq.flash_attn_func(q, k, v, causal=causal, return_lse=True, backend=backend, **format_kwargs(fmt))
    check_output(out, fmt, ref_o, eager_o, what=f"group {layout} ue8m0={ue8m0}")
    check_lse(lse, ref_lse)


@pytest.mark.parametrize("dims,group,backend",
                         [(dims, g, be) for dims, g in [((64, 64), 16), ((96, 96), 32), ((192, 128), 128),
                                                        ((256, 256), 128)]
                          for be in BACKENDS if be == "triton" or gluon_takes(*dims)], ids=str)
@pytest.mark.parametrize("fp8", FP8, ids=str)
def test_group_fp8_head_dims(dims, group, fp8, backend):
    """Group sizes 16..128, e5m2, and Dv = 96 (three real groups in a 128-wide padded tile)."""
    from .helpers import group_format

    b, sq, sk = SIZES
    dtype = DTYPES[0]
    (d, dv), h = dims, 4
    q, k, v = randn(b, sq, h, d, dtype=dtype), randn(b, sk, 1, d, dtype=dtype), randn(b, sk, 1, dv, dtype=dtype)
    ref_o, _ = attention_ref_batched(q, k, v, causal=True)
    eager_o, _ = attention_ref_batched(q, k, v, causal=True, eager_dtype=dtype)
    fmt = group_format(fp8, (b, sq), h, dv, group, layout="heads")
    out, _ = aq.flash_attn_func(q, k, v, causal=True, backend=backend, **format_kwargs(fmt))
    check_output(out, fmt, ref_o, eager_o, what=f"group G={group} {dims} {fp8}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gs", [1.0, 1e6, 1e-9], ids=["ties", "sf_saturates", "sf_underflows"])
def test_nvfp4_exact_bytes(gs, backend):
    """NVFP4 bit for bit against the reference quantizer. Each query sees one key so strongly
    (q_i = 128 e_i, k_j = e_j) that O_i = V_i exactly (128 * log2(e) is exact in fp32, so the
    kernels' scaled score minus the scaled maximum is 0, not a rounding residual, and p = 1;
    the other keys' exp2(-185) is 0); each 16-channel block of V is 2**e times
    values on e2m1's rounding ties (0.25, 0.75, ..., 5) and grid points, with a +-6 setting
    SF = gs * 2**e exactly. gs = 1e6 saturates SF at 448 (codes clamp to +-6), gs = 1e-9 flushes
    SF to 0 (output 0). 96 tokens x 2 heads x 4 blocks: padding rows 96..127 must read 0."""
    from .helpers import nvfp4_format

    b, s, h, d = 2, 48, 2, 64
    eye = torch.eye(s, d, device=DEVICE)
    q = (128 * eye)[None, :, None, :].expand(b, s, h, d).to(DTYPES[-1])
    k = eye[None, :, None, :].expand(b, s, h, d).to(DTYPES[-1])
    vals = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.1, 0.3],
                        device=DEVICE)
    blocks = vals[torch.randint(0, len(vals), (b, s, h, d // 16, 16), device=DEVICE)]
    blocks[..., 0] = 6.0
    blocks = blocks * torch.where(torch.rand_like(blocks) < 0.5, -1.0, 1.0)
    blocks = blocks * torch.exp2(torch.randint(-3, 3, (b, s, h, d // 16, 1), device=DEVICE).float())
    v = blocks.flatten(-2).to(DTYPES[-1])
    fmt = nvfp4_format(b * s, h, d, torch.tensor(gs))
    out = torch.empty(b, s, h, d // 2, dtype=getattr(torch, "float4_e2m1fn_x2", torch.uint8), device=DEVICE)
    res, _ = aq.flash_attn_func(q, k, v, softmax_scale=1.0, out=out, output_scale=fmt.scale,
                                output_block_scale=fmt.block_scale, backend=backend)
    assert res is out
    ref_q, ref_sf = quant.quantize_nvfp4(v.double(), fmt.scale)
    assert torch.equal(out.view(torch.uint8), ref_q), "packed e2m1 bytes differ"
    from .helpers import check_nvfp4_scales, logical_block_scale
    assert torch.equal(logical_block_scale(fmt, out).view(torch.uint8), ref_sf.view(torch.uint8))
    check_nvfp4_scales(fmt, logical_block_scale(fmt, out), v.double(), "exact")
    if gs == 1e6:
        assert ((ref_q & 0x77) == 0x77).all()  # every code saturated at 6
    elif gs == 1e-9:
        assert (ref_q == 0).all() and (ref_sf.float() == 0).all()


@pytest.mark.parametrize("heads,dims", [((3, 1), (96, 96)), ((5, 5), (64, 64))], ids=["cols_padded", "rows_padded"])
def test_nvfp4_scale_padding(heads, dims):
    """The swizzled block-scale tensor's padding reads 0: 3 heads x 96 / 16 = 18 scale columns
    pad to 20 (the whole tensor is zeroed before the kernel), and 2 x 37 = 74 tokens pad to
    128 rows (the last 128-row tile is). check_output's scale check covers every padding byte
    (the tensor starts as NaN)."""
    run_case(DTYPES[0], True, dims, heads, "nvfp4", sizes=(2, 37, 50))
