"""Output formats: which one a call asks for, and pure-torch quantizers for each.

The output format is inferred from the arguments exactly as ../shared/SPEC.md says:
`out.dtype` when `out` is given, else `out_dtype`, else FP8 e4m3fn when a scale is
given, else the input dtype. `resolve_output_format` turns the arguments into an
`OutputFormat` (or raises ValueError/TypeError naming the argument); the kernels
receive `OutputFormat.kind` as a constexpr and pick their epilogue from it.

The quantizers below are the numerical definition of each format. The tests use
them (on a float64 attention) as the oracle; the kernels never call them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Epilogue variants; the integer is what the kernels see as the OUT_KIND constexpr.
PLAIN = 0  # bf16 / fp16 / fp32 output
FP8_STATIC = 1  # out = sat(O / output_scale), per-tensor dequant scale read on device

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
PLAIN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INPUT_DTYPES = (torch.bfloat16, torch.float16)


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


@dataclass(frozen=True)
class OutputFormat:
    """What the epilogue writes. `kind` is PLAIN or FP8_STATIC; `dtype` is out's dtype."""

    kind: int
    dtype: torch.dtype
    scale: Optional[torch.Tensor] = None  # FP8_STATIC: 1-element float32 dequant scale

    @property
    def quantized(self) -> bool:
        return self.kind != PLAIN


def _check_scale_tensor(name: str, t, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (float32, one element), got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    if t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"{name} must hold one element (0-d or shape (1,)), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the inputs' device {device}, got {t.device}")


def resolve_output_format(
    in_dtype: torch.dtype,
    device: torch.device,
    out: Optional[torch.Tensor],
    out_dtype,
    output_scale: Optional[torch.Tensor],
    output_block_scale: Optional[torch.Tensor],
    ue8m0: bool,
) -> OutputFormat:
    """Infer the output format from the arguments, rejecting every inconsistent mix."""
    if out_dtype is not None and not isinstance(out_dtype, (torch.dtype, str)):
        raise TypeError(f"out_dtype must be a torch.dtype or 'nvfp4', got {type(out_dtype).__name__}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out_dtype is not None and out_dtype != out.dtype:
            raise ValueError(f"out_dtype={out_dtype} disagrees with out.dtype={out.dtype}")
        dtype = out.dtype
    elif out_dtype is not None:
        dtype = out_dtype
    elif output_scale is not None or output_block_scale is not None:
        dtype = torch.float8_e4m3fn
    else:
        dtype = in_dtype
    if not isinstance(ue8m0, bool):
        raise TypeError(f"ue8m0 must be a bool, got {type(ue8m0).__name__}")

    if dtype == "nvfp4" or dtype in (torch.uint8, getattr(torch, "float4_e2m1fn_x2", None)):
        raise NotImplementedError("NVFP4 output is not implemented yet (out_dtype='nvfp4')")
    if isinstance(dtype, str):
        raise ValueError(f"out_dtype must be a torch dtype or 'nvfp4', got {dtype!r}")

    if dtype in PLAIN_DTYPES:
        if output_scale is not None:
            raise ValueError(f"output_scale is only for FP8/FP4 outputs; the output dtype is {dtype}")
        if output_block_scale is not None:
            raise ValueError(f"output_block_scale is only for FP8/FP4 outputs; the output dtype is {dtype}")
        if ue8m0:
            raise ValueError(f"ue8m0=True is only for per-group FP8 outputs; the output dtype is {dtype}")
        return OutputFormat(PLAIN, dtype)

    if dtype in FP8_DTYPES:
        if output_scale is not None and output_block_scale is not None:
            raise ValueError(
                "output_scale and output_block_scale are exclusive for FP8 outputs: pass output_scale "
                "for a static per-tensor scale or output_block_scale for per-token-group scales"
            )
        if output_block_scale is not None:
            raise NotImplementedError("per-token-group FP8 output (output_block_scale) is not implemented yet")
        if output_scale is None:
            raise ValueError(f"an FP8 output ({dtype}) needs output_scale (a 1-element float32 device tensor)")
        if ue8m0:
            raise ValueError("ue8m0=True is only for per-group FP8 outputs (output_block_scale)")
        _check_scale_tensor("output_scale", output_scale, device)
        return OutputFormat(FP8_STATIC, dtype, scale=output_scale)

    raise TypeError(
        f"unsupported output dtype {dtype}: expected bfloat16, float16, float32, float8_e4m3fn or float8_e5m2"
    )


# ----------------------------------------------------------------------------------
# Pure-torch quantizers (the SPEC's formulas), used as the tests' oracle.
# ----------------------------------------------------------------------------------


def quantize_fp8_static(o: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sat(O / scale) in `dtype`: round to nearest even, clamp to the finite range."""
    m = fp8_max(dtype)
    return (o.double() / scale.double()).clamp(-m, m).to(torch.float32).to(dtype)


def dequantize(out: torch.Tensor, fmt: OutputFormat) -> torch.Tensor:
    """Float64 view of what the next GEMM would see: out * scale for FP8, out for plain."""
    if fmt.kind == PLAIN:
        return out.double()
    if fmt.kind == FP8_STATIC:
        return out.double() * fmt.scale.double()
    raise ValueError(f"unknown output kind {fmt.kind}")


def quantize(o: torch.Tensor, fmt: OutputFormat) -> torch.Tensor:
    """Quantize a float attention output `o` (..., Dv) into `fmt` with the SPEC's formulas."""
    if fmt.kind == PLAIN:
        return o.to(fmt.dtype)
    if fmt.kind == FP8_STATIC:
        return quantize_fp8_static(o, fmt.scale, fmt.dtype)
    raise ValueError(f"unknown output kind {fmt.kind}")
