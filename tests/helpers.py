"""Shared test helpers: inputs, output formats and the SPEC.md tolerance check."""

import math

import torch

from attnquant import quant

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Triton 3.6's interpreter computes tl.dot wrongly for bf16 operands: fp16 on the CPU.
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16]
HEAD_DIMS = [(64, 64), (96, 96), (128, 128), (192, 128), (256, 256)]
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
# The Hopper Gluon fast path exists on sm_90 only; elsewhere every test runs the portable kernel.
GLUON = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
BACKENDS = ["triton", "gluon"] if GLUON else ["triton"]


def gluon_takes(d, dv):
    """Head dims the Gluon kernel runs (others make backend='gluon' raise)."""
    from attnquant.kernels.hopper.launch import head_dims_supported
    return head_dims_supported(d, dv)


def randn(*shape, dtype=torch.float16, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype)


def make_format(kind, in_dtype, ref_o):
    """kind: 'plain' | fp8 dtype (static scale) | 'group' | 'group_ue8m0'. The static scale puts max|O| near the middle of the FP8 range."""
    if kind == "plain":
        return quant.OutputFormat(quant.PLAIN, in_dtype)
    if kind in ("group", "group_ue8m0"):  # per-token-group FP8 with DeepGEMM-style column-major scales
        *tokens, h, dv = ref_o.shape
        return group_format(torch.float8_e4m3fn, tuple(tokens), h, dv, 64 if dv % 64 == 0 else 16,
                            ue8m0=kind == "group_ue8m0", layout="colmajor_tma" if kind == "group" else "flat")
    amax = ref_o.abs().max().clamp_min(1e-6)
    scale = (amax / (quant.fp8_max(kind) / 4)).float().reshape(())
    return quant.OutputFormat(quant.FP8_STATIC, kind, scale=scale)


def group_format(dtype, token_shape, h, dv, group, ue8m0=False, layout="flat"):
    """A per-group FP8 format whose scale tensor (filled with NaN: every used entry must be
    written) has one of the layouts users pass: 'flat' (..., H*Dv/G) row-major, 'heads'
    (..., H, Dv/G), 'colmajor' (DeepGEMM: token stride 1), 'colmajor_tma' (token stride
    padded to a multiple of 4)."""
    cols = h * dv // group
    t = math.prod(token_shape)
    if layout == "flat":
        bs = torch.empty(*token_shape, cols, device=DEVICE)
    elif layout == "heads":
        bs = torch.empty(*token_shape, h, dv // group, device=DEVICE)
    else:
        pad = -(-t // 4) * 4 if layout == "colmajor_tma" else t
        bs = torch.empty(cols, pad, device=DEVICE)[:, :t].t().reshape(*token_shape, cols)
        assert bs.stride(-1) == pad or t == 1
    bs.fill_(float("nan"))
    return quant.OutputFormat(quant.FP8_GROUP, dtype, block_scale=bs, group_size=group, ue8m0=ue8m0)


def format_kwargs(fmt):
    if fmt.kind == quant.PLAIN:
        return dict(out_dtype=fmt.dtype)
    if fmt.kind == quant.FP8_GROUP:
        return dict(out_dtype=fmt.dtype, output_block_scale=fmt.block_scale, ue8m0=fmt.ue8m0)
    return dict(out_dtype=fmt.dtype, output_scale=fmt.scale)


def _top_step(fmt, ref):
    """One step of the output format at the largest magnitudes (in dequantized units)."""
    amax = ref.abs().max().item()
    if fmt.kind == quant.PLAIN:
        return torch.finfo(fmt.dtype).eps * 2.0 ** math.floor(math.log2(max(amax, 1e-30)))
    if fmt.kind == quant.FP8_GROUP:  # the largest group's scale: amax / fp8_max (x2 at most with ue8m0)
        s = 2 * amax / quant.fp8_max(fmt.dtype)
    else:
        s = fmt.scale.item()
    a = min(amax / s, quant.fp8_max(fmt.dtype))
    mant = 3 if fmt.dtype == torch.float8_e4m3fn else 2
    return 2.0 ** (math.floor(math.log2(max(a, 1e-30))) - mant) * s


def logical_block_scale(fmt, out):
    """The kernel-written per-group scales viewed as (..., H, Dv // G)."""
    bs = fmt.block_scale
    return bs if bs.dim() == out.dim() else bs.unflatten(-1, (out.shape[-2], -1))


def check_output(out, fmt, ref_o, eager_o, softcap=0.0, what=""):
    """SPEC.md: after dequantization the kernel's error is at most a small multiple (2x, 3x
    with softcap) of an eager implementation's error quantized the same way, plus one step
    of the format at the largest magnitudes. Per-group scales: within 1% of the reference
    quantizer's (exact powers of two with ue8m0, but for amax on a power-of-two boundary)."""
    assert out.dtype == fmt.dtype, (out.dtype, fmt.dtype)
    assert out.shape == ref_o.shape, (out.shape, ref_o.shape)
    kernel_scales = logical_block_scale(fmt, out) if fmt.kind == quant.FP8_GROUP else None
    deq = quant.dequantize(out, fmt, kernel_scales)
    assert torch.isfinite(deq).all(), f"{what}: non-finite output"
    eager_q, eager_scales = quant.quantize(eager_o.float(), fmt)
    eager = quant.dequantize(eager_q, fmt, eager_scales)
    if fmt.kind == quant.FP8_GROUP:
        _, ref_scales = quant.quantize(ref_o.float(), fmt)
        rel = (kernel_scales.double() / ref_scales.double() - 1).abs()
        if fmt.ue8m0:  # powers of two, equal unless amax sits within rounding of a boundary
            k = kernel_scales.double()
            assert torch.equal(k, torch.exp2(torch.round(torch.log2(k)))), f"{what}: ue8m0 scale not a power of 2"
            raw = ref_o.unflatten(-1, (-1, fmt.group_size)).abs().amax(-1).clamp_min(1e-10) / quant.fp8_max(fmt.dtype)
            on_boundary = (torch.log2(raw) - torch.round(torch.log2(raw))).abs() < 0.01
            differ = rel > 0
            assert (on_boundary | ~differ).all(), f"{what}: ue8m0 scales differ away from a power-of-two boundary"
        else:
            assert rel.max() < 0.01, f"{what}: group scales off by {rel.max().item():.3e}"
    err = (deq - ref_o).abs()
    err_eager = (eager - ref_o).abs()
    mult = 3.0 if softcap > 0 else 2.0
    bound = mult * err_eager.max().item() + _top_step(fmt, ref_o)
    assert err.max().item() <= bound, f"{what}: max error {err.max().item():.3e} > bound {bound:.3e}"
    rel = err.norm().item() / max(ref_o.norm().item(), 1e-30)
    rel_eager = err_eager.norm().item() / max(ref_o.norm().item(), 1e-30)
    assert rel <= mult * rel_eager + 1e-6, f"{what}: relative error {rel:.3e} > {mult} x eager {rel_eager:.3e}"


def check_lse(lse, ref_lse, what=""):
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape, (lse.dtype, lse.shape, ref_lse.shape)
    inf_ref = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), inf_ref), f"{what}: -inf rows differ"
    assert (lse[inf_ref] < 0).all()
    d = (lse.double() - ref_lse)[~inf_ref].abs()
    assert d.numel() == 0 or d.max().item() < 2e-3, f"{what}: LSE error {d.max().item():.3e}"
