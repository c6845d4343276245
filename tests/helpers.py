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


def randn(*shape, dtype=torch.float16, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype)


def make_format(kind, in_dtype, ref_o):
    """kind: 'plain' | fp8 dtype. The static scale puts max|O| near the middle of the FP8 range."""
    if kind == "plain":
        return quant.OutputFormat(quant.PLAIN, in_dtype)
    amax = ref_o.abs().max().clamp_min(1e-6)
    scale = (amax / (quant.fp8_max(kind) / 4)).float().reshape(())
    return quant.OutputFormat(quant.FP8_STATIC, kind, scale=scale)


def format_kwargs(fmt):
    if fmt.kind == quant.PLAIN:
        return dict(out_dtype=fmt.dtype)
    return dict(out_dtype=fmt.dtype, output_scale=fmt.scale)


def _top_step(fmt, ref):
    """One step of the output format at the largest magnitudes (in dequantized units)."""
    amax = ref.abs().max().item()
    if fmt.kind == quant.PLAIN:
        return torch.finfo(fmt.dtype).eps * 2.0 ** math.floor(math.log2(max(amax, 1e-30)))
    s = fmt.scale.item()
    a = min(amax / s, quant.fp8_max(fmt.dtype))
    mant = 3 if fmt.dtype == torch.float8_e4m3fn else 2
    return 2.0 ** (math.floor(math.log2(max(a, 1e-30))) - mant) * s


def check_output(out, fmt, ref_o, eager_o, softcap=0.0, what=""):
    """SPEC.md: after dequantization the kernel's error is at most a small multiple (2x, 3x
    with softcap) of an eager implementation's error quantized the same way, plus one step
    of the format at the largest magnitudes."""
    assert out.dtype == fmt.dtype, (out.dtype, fmt.dtype)
    assert out.shape == ref_o.shape, (out.shape, ref_o.shape)
    deq = quant.dequantize(out, fmt)
    assert torch.isfinite(deq).all(), f"{what}: non-finite output"
    eager = quant.dequantize(quant.quantize(eager_o.float(), fmt), fmt)
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
