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
from typing import Optional, Tuple

import torch

# Epilogue variants; the integer is what the kernels see as the OUT_KIND constexpr.
PLAIN = 0  # bf16 / fp16 / fp32 output
FP8_STATIC = 1  # out = sat(O / output_scale), per-tensor dequant scale read on device
FP8_GROUP = 2  # per (token, head, group of G channels) scale written by the kernel

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
PLAIN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INPUT_DTYPES = (torch.bfloat16, torch.float16)


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


@dataclass(frozen=True)
class OutputFormat:
    """What the epilogue writes. `kind` is PLAIN, FP8_STATIC or FP8_GROUP; `dtype` is out's dtype."""

    kind: int
    dtype: torch.dtype
    scale: Optional[torch.Tensor] = None  # FP8_STATIC: 1-element float32 dequant scale
    block_scale: Optional[torch.Tensor] = None  # FP8_GROUP: the float32 scale tensor the kernel writes
    group_size: int = 0  # FP8_GROUP: channels per scale (G)
    ue8m0: bool = False  # FP8_GROUP: scales rounded up to powers of two
    # FP8_GROUP: strides of block_scale per (batch, token, head, group); batch stride 0 for varlen
    block_scale_strides: Tuple[int, int, int, int] = (0, 0, 0, 0)

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


def _group_format(dtype, block_scale, device, token_shape, num_heads, head_dim_v, ue8m0) -> OutputFormat:
    """Per-token-group FP8: infer G from output_block_scale's logical shape, (..., H * Dv // G)
    or (..., H, Dv // G) with ... the token dims, and take its strides as they are."""
    if not isinstance(block_scale, torch.Tensor):
        raise TypeError(f"output_block_scale must be a torch.Tensor, got {type(block_scale).__name__}")
    if block_scale.dtype != torch.float32:
        raise ValueError(f"output_block_scale must be float32 for FP8 outputs, got {block_scale.dtype}")
    if block_scale.device != device:
        raise ValueError(f"output_block_scale must be on the inputs' device {device}, got {block_scale.device}")
    nt = len(token_shape)
    shape = tuple(block_scale.shape)
    expect = f"{token_shape + ('H * Dv // G',)} or {token_shape + (num_heads, 'Dv // G')}"
    if shape[:nt] != tuple(token_shape) or block_scale.dim() not in (nt + 1, nt + 2):
        raise ValueError(f"output_block_scale must have shape {expect}, got {shape}")
    if block_scale.dim() == nt + 2:
        if shape[-2] != num_heads or shape[-1] == 0 or head_dim_v % shape[-1]:
            raise ValueError(f"output_block_scale must have shape {expect}, got {shape}")
        group = head_dim_v // shape[-1]
        sh, sg = block_scale.stride(-2), block_scale.stride(-1)
    else:
        cols = shape[-1]
        if cols == 0 or (num_heads * head_dim_v) % cols or head_dim_v % ((num_heads * head_dim_v) // cols):
            raise ValueError(f"output_block_scale's last dim {cols} must be H * Dv // G with G dividing Dv={head_dim_v}")
        group = (num_heads * head_dim_v) // cols
        sg = block_scale.stride(-1)
        sh = (head_dim_v // group) * sg
    if group < 16 or group & (group - 1):
        raise ValueError(f"output_block_scale implies a group size G={group}: it must be a power of two >= 16")
    tok = tuple(block_scale.stride()[:nt])
    strides = (0,) + tok + (sh, sg) if nt == 1 else tok + (sh, sg)
    return OutputFormat(FP8_GROUP, dtype, block_scale=block_scale, group_size=group, ue8m0=ue8m0,
                        block_scale_strides=strides)


def resolve_output_format(
    in_dtype: torch.dtype,
    device: torch.device,
    out: Optional[torch.Tensor],
    out_dtype,
    output_scale: Optional[torch.Tensor],
    output_block_scale: Optional[torch.Tensor],
    ue8m0: bool,
    token_shape: Tuple[int, ...] = (),
    num_heads: int = 0,
    head_dim_v: int = 0,
) -> OutputFormat:
    """Infer the output format from the arguments, rejecting every inconsistent mix.
    token_shape ((B, Sq) or (total_q,)), num_heads and head_dim_v describe the output, for
    checking a per-group scale tensor's shape."""
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
            return _group_format(dtype, output_block_scale, device, tuple(token_shape), num_heads, head_dim_v, ue8m0)
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


def quantize_fp8_group(o: torch.Tensor, group: int, dtype: torch.dtype, ue8m0: bool = False):
    """Per-token-group FP8 of o (..., Dv): returns (q (..., Dv), scales (..., Dv // group)).
    amax = max(max|O_g|, 1e-10); s = amax / fp8_max (2 ** ceil(log2 s) with ue8m0); q = sat(O_g / s)."""
    m = fp8_max(dtype)
    g = o.double().unflatten(-1, (-1, group))
    s = (g.abs().amax(-1).clamp_min(1e-10) / m).float()
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (g / s.double()[..., None]).clamp(-m, m).to(torch.float32).to(dtype).flatten(-2)
    return q, s


def dequantize(out: torch.Tensor, fmt: OutputFormat, block_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float64 view of what the next GEMM would see: out * scale for FP8, out for plain.
    FP8_GROUP takes the per-group scales in their logical shape (..., H, Dv // G)."""
    if fmt.kind == PLAIN:
        return out.double()
    if fmt.kind == FP8_STATIC:
        return out.double() * fmt.scale.double()
    if fmt.kind == FP8_GROUP:
        return out.double() * block_scale.double().repeat_interleave(fmt.group_size, dim=-1)
    raise ValueError(f"unknown output kind {fmt.kind}")


def quantize(o: torch.Tensor, fmt: OutputFormat):
    """Quantize a float attention output `o` (..., H, Dv) into `fmt` with the SPEC's formulas.
    Returns (out, block_scale or None)."""
    if fmt.kind == PLAIN:
        return o.to(fmt.dtype), None
    if fmt.kind == FP8_STATIC:
        return quantize_fp8_static(o, fmt.scale, fmt.dtype), None
    if fmt.kind == FP8_GROUP:
        return quantize_fp8_group(o, fmt.group_size, fmt.dtype, fmt.ue8m0)
    raise ValueError(f"unknown output kind {fmt.kind}")
