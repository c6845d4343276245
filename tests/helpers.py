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
    from attnquant.kernels.hopper.config import head_dims_supported
    return head_dims_supported(d, dv)


def randn(*shape, dtype=torch.float16, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype)


def make_format(kind, in_dtype, ref_o):
    """kind: 'plain' | fp8 dtype (static scale) | 'group' | 'group_ue8m0' | 'nvfp4'. The static
    scale puts max|O| near the middle of the FP8 range."""
    if kind == "plain":
        return quant.OutputFormat(quant.PLAIN, in_dtype)
    if kind == "nvfp4":  # vLLM's usual global scale, 448 * 6 / amax
        *tokens, h, dv = ref_o.shape
        return nvfp4_format(math.prod(tokens), h, dv, (448 * 6 / _amax(ref_o)).float())
    if kind in ("group", "group_ue8m0"):  # per-token-group FP8 with DeepGEMM-style column-major scales
        *tokens, h, dv = ref_o.shape
        return group_format(torch.float8_e4m3fn, tuple(tokens), h, dv, 64 if dv % 64 == 0 else 16,
                            ue8m0=kind == "group_ue8m0", layout="colmajor_tma" if kind == "group" else "flat")
    amax = _amax(ref_o)
    scale = (amax / (quant.fp8_max(kind) / 4)).float().reshape(())
    return quant.OutputFormat(quant.FP8_STATIC, kind, scale=scale)


def _amax(ref_o):
    """max |O| (at least 1e-6; 1 for an empty output: a call with no tokens still takes a format)."""
    return ref_o.abs().amax().clamp_min(1e-6) if ref_o.numel() else torch.tensor(1.0, device=ref_o.device)


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
        assert bs.stride(-1) == pad or t <= 1
    bs.fill_(float("nan"))
    return quant.OutputFormat(quant.FP8_GROUP, dtype, block_scale=bs, group_size=group, ue8m0=ue8m0)


def nvfp4_format(num_tokens, h, dv, global_scale, out_dtype=torch.uint8):
    """An NVFP4 format whose swizzled block-scale tensor is filled with NaN (0xFF): the kernel must
    write every entry, the padding as 0."""
    shape = quant.nvfp4_scale_shape(num_tokens, h, dv)
    bs = torch.full(shape, 0xFF, dtype=torch.uint8, device=DEVICE).view(torch.float8_e4m3fn)
    return quant.OutputFormat(quant.NVFP4, out_dtype, scale=global_scale.reshape(()).to(DEVICE), block_scale=bs,
                              group_size=quant.NVFP4_BLOCK)


def format_kwargs(fmt):
    if fmt.kind == quant.PLAIN:
        return dict(out_dtype=fmt.dtype)
    if fmt.kind == quant.NVFP4:
        return dict(out_dtype="nvfp4", output_scale=fmt.scale, output_block_scale=fmt.block_scale)
    if fmt.kind == quant.FP8_GROUP:
        return dict(out_dtype=fmt.dtype, output_block_scale=fmt.block_scale, ue8m0=fmt.ue8m0)
    return dict(out_dtype=fmt.dtype, output_scale=fmt.scale)


def _top_step(fmt, ref):
    """One step of the output format at the largest magnitudes (in dequantized units)."""
    amax = ref.abs().max().item()
    if fmt.kind == quant.PLAIN:
        return torch.finfo(fmt.dtype).eps * 2.0 ** math.floor(math.log2(max(amax, 1e-30)))
    if fmt.kind == quant.NVFP4:  # the top e2m1 step (4 -> 6) of the largest block, SF up to amax * gs / 6
        return 2.0 * (amax * 1.07 / 6)
    if fmt.kind == quant.FP8_GROUP:  # the largest group's scale: amax / fp8_max (x2 at most with ue8m0)
        s = 2 * amax / quant.fp8_max(fmt.dtype)
    else:
        s = fmt.scale.item()
    a = min(amax / s, quant.fp8_max(fmt.dtype))
    mant = 3 if fmt.dtype == torch.float8_e4m3fn else 2
    return 2.0 ** (math.floor(math.log2(max(a, 1e-30))) - mant) * s


def logical_block_scale(fmt, out):
    """The kernel-written per-group scales viewed as (..., H, Dv // G); NVFP4's read out of their
    swizzled layout."""
    bs = fmt.block_scale
    if fmt.kind == quant.NVFP4:
        *tokens, h, half_dv = out.shape
        nb = 2 * half_dv // quant.NVFP4_BLOCK
        return quant.unswizzle_block_scale(bs, math.prod(tokens), h * nb).reshape(*tokens, h, nb)
    return bs if bs.dim() == out.dim() else bs.unflatten(-1, (out.shape[-2], -1))


def check_output(out, fmt, ref_o, eager_o, softcap=0.0, what=""):
    """SPEC.md: after dequantization the kernel's error is at most a small multiple (2x, 3x
    with softcap) of an eager implementation's error quantized the same way, plus one step
    of the format at the largest magnitudes. Per-group scales: within 1% of the reference
    quantizer's (exact powers of two with ue8m0, but for amax on a power-of-two boundary)."""
    assert out.dtype == fmt.dtype, (out.dtype, fmt.dtype)
    assert out.shape == fmt.out_shape(ref_o.shape), (out.shape, ref_o.shape)
    kernel_scales = logical_block_scale(fmt, out) if fmt.kind in (quant.FP8_GROUP, quant.NVFP4) else None
    if fmt.kind == quant.NVFP4:
        check_nvfp4_scales(fmt, kernel_scales, ref_o, what)
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


def check_nvfp4_scales(fmt, kernel_scales, ref_o, what=""):
    """NVFP4 block scales: each within one e4m3 step (2**-3 relative, or one subnormal step) of
    the reference quantizer's SF, 0 exactly where the reference block is all zeros, and the
    swizzled tensor's padding entries 0."""
    _, ref_sf = quant.quantize(ref_o.float(), fmt)
    k, r = kernel_scales.double(), ref_sf.double()
    assert torch.isfinite(k).all(), f"{what}: NVFP4 block scale not written (NaN left)"
    assert torch.equal(k == 0, r == 0) or (torch.maximum(k, r)[(k == 0) != (r == 0)] <= 2 ** -9).all(), \
        f"{what}: NVFP4 zero scales differ"
    assert ((k - r).abs() <= torch.maximum(0.126 * r, torch.full_like(r, 2 ** -9))).all(), \
        f"{what}: NVFP4 block scales off by more than one e4m3 step"
    *tokens, h, nb = kernel_scales.shape
    t = math.prod(tokens)
    rows, cols = fmt.block_scale.shape
    used = torch.zeros(rows * cols, dtype=torch.bool, device=k.device)
    used[quant.nvfp4_swizzle_offsets(rows, cols, k.device)[:t, :h * nb].reshape(-1)] = True
    pad = fmt.block_scale.reshape(-1).view(torch.uint8)[~used]
    assert (pad == 0).all(), f"{what}: NVFP4 block-scale padding not zeroed"


def check_lse(lse, ref_lse, what=""):
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape, (lse.dtype, lse.shape, ref_lse.shape)
    inf_ref = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), inf_ref), f"{what}: -inf rows differ"
    assert (lse[inf_ref] < 0).all()
    d = (lse.double() - ref_lse)[~inf_ref].abs()
    assert d.numel() == 0 or d.max().item() < 2e-3, f"{what}: LSE error {d.max().item():.3e}"
