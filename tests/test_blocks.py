"""The attention block (attnquant.blocks): attnquant's FP8 output read by a real FP8 GEMM
(torch._scaled_mm), against float64 attention followed by the float64 projection.

The bound is derived from the FP8 rounding of both GEMM operands: each of O and W is within
2**-4 of itself (e4m3, 3 mantissa bits, round to nearest; subnormals an absolute 2**-10 of
the scale), so |y - O W^T| <= (2 * 2**-4 + 2**-8) (|O| |W|^T) plus the attention kernel's own
error and the output's rounding (bf16: 2**-8 |y|). A wrong scale convention, a scale read
for the wrong token or group, or a transposed operand is off by O(|y|) and fails.
Second, tighter: the GEMM's result against float64 arithmetic on the very bytes and scales it
was given (attnquant's output dequantized, the FP8 weight dequantized), within float32
accumulation and the bf16 output's rounding: this one fails on a scale 1 % off.
The static recipe runs on the CPU too (torch._scaled_mm has a per-tensor CPU path); the
blockwise one (cuBLAS, CUDA 12.9+, sm_90) only on the GPU.
"""

import pytest
import torch

from attnquant import blocks, quant
from attnquant.reference import attention_ref_batched

from .helpers import DEVICE, DTYPES, ON_GPU, randn

FP8 = torch.float8_e4m3fn
U = 2.0 ** -4  # e4m3's relative rounding bound
GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="blockwise torch._scaled_mm runs on CUDA only")
SIZES = (2, 160, 200) if ON_GPU else (1, 9, 21)


def check_block(y, o_ref, w, what):
    """y (..., N) against o_ref (..., H, Dv) float64 @ w (N, K) float64, within the FP8 bound."""
    o = o_ref.flatten(-2)
    exact = o @ w.double().t()
    size = o.abs() @ w.double().abs().t()
    bound = (2 * U + 2 ** -6) * size + 2 ** -7 * exact.abs() + 1e-6
    err = (y.double() - exact).abs()
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error {worst:.2f}x the FP8 rounding bound"
    return err


def check_gemm_reads(y, o, act_scale, wq, what):
    """y against float64 of o's codes x act_scale (one element, or per 128 columns of each
    token) times the dequantized FP8 weight."""
    a = o.double().flatten(-2)
    if act_scale.dim() <= 1:
        a = a * act_scale.double()
    else:
        a = a * act_scale.double().repeat_interleave(blocks.GEMM_BLOCK, -1)
    exact = a @ wq.dequantize().t()
    bound = 2 ** -8 * exact.abs() + 2 ** -12 * (a.abs() @ wq.dequantize().abs().t()) + 1e-6
    worst = ((y.double() - exact).abs() / bound).max().item()
    assert worst <= 1.0, f"{what}: the GEMM's result is {worst:.2f}x its rounding bound off the bytes it was given"


def inputs(dtype, h, hkv, d, dv, n, sizes=SIZES):
    b, sq, sk = sizes
    q, k, v = randn(b, sq, h, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, dv, dtype=dtype)
    w = randn(n, h * dv, dtype=torch.float32) * (h * dv) ** -0.5
    return q, k, v, w


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (192, 128)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_static_block(dtype, dims, causal):
    """Static per-tensor FP8: the block against float64, and against 'bf16 attention, then a
    separate quantization' (FA4's way) feeding the same GEMM."""
    d, dv = dims
    q, k, v, w = inputs(dtype, 4, 2, d, dv, 256)
    o_ref, _ = attention_ref_batched(q, k, v, causal=causal)
    scale = (o_ref.abs().max() / 100).float().reshape(())
    wq = blocks.quantize_weight_fp8(w)
    y = blocks.attention_oproj(q, k, v, wq, output_scale=scale, causal=causal)
    assert y.shape == (*q.shape[:2], 256) and y.dtype == torch.bfloat16
    check_block(y, o_ref, w, f"static {dtype} {dims} causal={causal}")
    o, _ = blocks.flash_attn_func(q, k, v, causal=causal, output_scale=scale)
    check_gemm_reads(blocks.oproj_fp8(o, wq, scale), o, scale, wq, "static")
    o16, _ = blocks.flash_attn_func(q, k, v, causal=causal)
    y_sep = blocks.oproj_fp8(quant.quantize_fp8_static(o16.double(), scale, FP8), wq, scale)
    check_block(y_sep, o_ref, w, "separate quantization")


@GPU_ONLY
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (8, 1)], ids=str)
@pytest.mark.parametrize("dims", [(128, 128), (192, 128), (256, 256)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_block(dtype, dims, heads, causal):
    """Per-token-group (1x128) FP8 activations with 128x128 weight blocks through cuBLAS's
    blockwise GEMM, reading the scales the kernel wrote (column-major); and the same GEMM fed
    by bf16 attention then the SPEC's group quantizer."""
    (d, dv), (h, hkv) = dims, heads
    n = 384
    q, k, v, w = inputs(dtype, h, hkv, d, dv, n)
    o_ref, _ = attention_ref_batched(q, k, v, causal=causal)
    wq = blocks.quantize_weight_fp8(w, block=True)
    y = blocks.attention_oproj(q, k, v, wq, causal=causal)
    check_block(y, o_ref, w, f"group {dtype} {dims} {heads} causal={causal}")
    scales = blocks.group_scale_buffer(q.shape[0] * q.shape[1], h, dv, DEVICE).view(*q.shape[:2], -1)
    o, _ = blocks.flash_attn_func(q, k, v, causal=causal, out_dtype=FP8, output_block_scale=scales)
    check_gemm_reads(blocks.oproj_fp8(o, wq, scales), o, scales, wq, "group")
    o16, _ = blocks.flash_attn_func(q, k, v, causal=causal)
    codes, s = quant.quantize_fp8_group(o16.float().flatten(-2), 128, FP8)
    s = s.reshape(-1, s.shape[-1]).t().contiguous().t().view(s.shape)  # the GEMM's column-major layout
    y_sep = blocks.oproj_fp8(codes.unflatten(-1, (h, dv)), wq, s)
    check_block(y_sep, o_ref, w, "separate quantization")


@GPU_ONLY
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_group_scale_layouts(tokens):
    """The activation-scale layouts a user may hold all reach the GEMM with the right values:
    the GEMM's column-major (read in place when tokens % 4 == 0), DeepGEMM's TMA-padded
    column-major and row-major (copied); token counts that are not a multiple of 4 (padded);
    and K / 128 = 2 weight blocks, whose scales cuBLAS reads with a leading dimension padded to 4."""
    h, dv, n = 2, 128, 256
    q, k, v, w = inputs(torch.bfloat16, h, h, 128, dv, n, sizes=(1, tokens, 50))
    o_ref, _ = attention_ref_batched(q, k, v)
    wq = blocks.quantize_weight_fp8(w, block=True)
    cols = h * dv // 128
    pad = -(-tokens // 4) * 4
    layouts = {"gemm": blocks.group_scale_buffer(tokens, h, dv, DEVICE),
               "deepgemm_tma": torch.empty(cols, pad, device=DEVICE)[:, :tokens].t(),
               "row_major": torch.empty(tokens, cols, device=DEVICE)}
    for name, scales in layouts.items():
        o, _ = blocks.flash_attn_func(q, k, v, out_dtype=FP8, output_block_scale=scales.view(1, tokens, cols))
        y = blocks.oproj_fp8(o, wq, scales.view(1, tokens, cols))
        check_block(y, o_ref, w, name)
        check_gemm_reads(y, o, scales.view(1, tokens, cols), wq, name)
    y = blocks.attention_oproj(q, k, v, wq)  # its own buffers, padded to whole groups of 4 rows
    check_block(y, o_ref, w, "attention_oproj")


@pytest.mark.parametrize("tokens", [1, 6, 8])
@pytest.mark.parametrize("layout", ["gemm", "row_major"])
def test_gemm_operands(tokens, layout):
    """What oproj_fp8 hands cuBLAS: tokens padded to a multiple of 4 (zero codes, scale 1) and
    the scales column-major, with the real rows' codes and scales unchanged; an input already
    in that form passes through without a copy."""
    k = 384
    a = randn(tokens, k, dtype=torch.float32).to(FP8)
    s = torch.rand(tokens, k // 128, device=DEVICE) + 0.5
    s = s.t().contiguous().t() if layout == "gemm" else s.contiguous()
    a2, s2, m = blocks.gemm_operands(a, s)
    mp = -(-tokens // 4) * 4
    assert m == tokens and a2.shape == (mp, k) and s2.shape == (mp, k // 128) and s2.stride() == (1, mp)
    assert torch.equal(a2[:m].view(torch.uint8), a.view(torch.uint8)) and torch.equal(s2[:m], s)
    assert (a2[m:].float() == 0).all() and (s2[m:] == 1).all()
    if mp == tokens and layout == "gemm":
        assert a2.data_ptr() == a.data_ptr() and s2.data_ptr() == s.data_ptr()


@pytest.mark.parametrize("k", [128, 256, 640, 1024])
def test_weight_gemm_scale(k):
    """The 128x128 weight scales as cuBLAS reads them: (round_up(K/128, 4), N/128) with strides
    (1, round_up(K/128, 4)), holding scale[nb, kb] at [kb, nb]; a weight built by hand with
    compact scales gets the same from a padded copy."""
    n = 200
    wq = blocks.quantize_weight_fp8(randn(n, k, dtype=torch.float32), block=True)
    nb, kb = wq.scale.shape
    lead = -(-kb // 4) * 4
    for weight in (wq, blocks.FP8Weight(wq.data, wq.scale.contiguous())):
        g = weight.gemm_scale()
        assert g.shape == (lead, nb) and g.stride() == (1, lead)
        assert torch.equal(g[:kb], wq.scale.t())


def test_block_nan():
    """A NaN query row gives a NaN output row through the FP8 activation and the GEMM, and no
    other row changes (SPEC: faults are never hidden)."""
    q, k, v, w = inputs(DTYPES[0], 2, 2, 64, 64, 128)
    q[0, 1, 0, 0] = float("nan")
    y = blocks.attention_oproj(q, k, v, blocks.quantize_weight_fp8(w), output_scale=torch.tensor(0.01, device=DEVICE))
    assert y[0, 1].isnan().all()
    y[0, 1] = 0
    assert y.isfinite().all()


@pytest.mark.parametrize("block", [False, True])
def test_quantize_weight(block):
    n, k = (200, 300) if block else (64, 96)  # not multiples of 128: partial blocks
    w = torch.randn(n, k, device=DEVICE) * torch.rand(n, 1, device=DEVICE) * 10
    wq = blocks.quantize_weight_fp8(w, block=block)
    assert wq.data.dtype == FP8 and wq.data.shape == (n, k) and wq.blockwise == block
    assert wq.scale.shape == ((2, 3) if block else ())
    if block:  # each block's scale is its amax / 448
        tiles = torch.zeros(256, 384, device=DEVICE)
        tiles[:n, :k] = w
        amax = tiles.view(2, 128, 3, 128).abs().amax(dim=(1, 3))
        torch.testing.assert_close(wq.scale, amax / 448)
    else:
        torch.testing.assert_close(wq.scale, w.abs().max() / 448)
    s = wq.dequantize() / wq.data.double()  # the scale of each element
    s = torch.where(wq.data.double() != 0, s, torch.zeros_like(s)).abs().amax()
    err = (wq.dequantize() - w.double()).abs()
    assert (err <= U * w.double().abs() + 2 ** -10 * s).all()
    zero = blocks.quantize_weight_fp8(torch.zeros(8, 8, device=DEVICE), block=block)
    assert (zero.scale == 1).all() and (zero.data.float() == 0).all()


def test_block_errors():
    q, k, v, w = inputs(DTYPES[0], 2, 2, 64, 64, 128, sizes=(1, 4, 6))
    scale = torch.tensor(0.01, device=DEVICE)
    tensor_w, block_w = blocks.quantize_weight_fp8(w), blocks.quantize_weight_fp8(w, block=True)
    with pytest.raises(TypeError, match="weight must be an FP8Weight"):
        blocks.attention_oproj(q, k, v, w, output_scale=scale)
    with pytest.raises(ValueError, match="static .* pairs with a per-tensor weight"):
        blocks.attention_oproj(q, k, v, block_w, output_scale=scale)
    with pytest.raises(ValueError, match="pairs with a 128 x 128 block weight"):
        blocks.attention_oproj(q, k, v, tensor_w)
    with pytest.raises(ValueError, match="head_dim_v must be a multiple of 128"):
        blocks.attention_oproj(q, k, v, block_w)  # Dv = 64: a 128-group would span two heads
    with pytest.raises(ValueError, match="ue8m0 is not taken"):
        blocks.attention_oproj(q, k, v, tensor_w, output_scale=scale, ue8m0=True)
    o = torch.zeros(1, 4, 2, 64, device=DEVICE).to(FP8)
    with pytest.raises(ValueError, match="o must be float8_e4m3fn"):
        blocks.oproj_fp8(o.float(), tensor_w, scale)
    with pytest.raises(ValueError, match="K = H \\* Dv = 256"):
        blocks.oproj_fp8(torch.zeros(1, 4, 2, 128, device=DEVICE).to(FP8), tensor_w, scale)
    with pytest.raises(ValueError, match="act_scale must be float32 of shape"):
        blocks.oproj_fp8(o, block_w, torch.ones(1, 4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="w must be a 2-D float tensor"):
        blocks.quantize_weight_fp8(torch.zeros(2, 3, 4))
    empty = blocks.oproj_fp8(torch.zeros(0, 2, 64, device=DEVICE).to(FP8), tensor_w, scale)
    assert empty.shape == (0, 128)
