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

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch

from .kernels.constants import NVFP4_BLOCK, OutKind

# The epilogue variants (OutputFormat.kind; the kernels' OUT_KIND constexpr)
PLAIN, FP8_STATIC, FP8_GROUP, NVFP4 = OutKind.PLAIN, OutKind.FP8_STATIC, OutKind.FP8_GROUP, OutKind.NVFP4
E2M1_MAX = 6.0
# e2m1 magnitudes by code (the low three bits; bit 3 is the sign)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
PLAIN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NVFP4_DTYPES = (torch.uint8,) + ((torch.float4_e2m1fn_x2,) if hasattr(torch, "float4_e2m1fn_x2") else ())
INPUT_DTYPES = (torch.bfloat16, torch.float16)


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


@dataclass(frozen=True)
class OutputFormat:
    """What the epilogue writes. `kind` is PLAIN, FP8_STATIC, FP8_GROUP or NVFP4; `dtype` is out's dtype."""

    kind: int
    dtype: torch.dtype
    # FP8_STATIC: 1-element float32 dequant scale; NVFP4: the global scale gs (out ~ O * gs / SF)
    scale: Optional[torch.Tensor] = None
    # FP8_GROUP: the float32 scale tensor the kernel writes; NVFP4: the e4m3 swizzled block scales
    block_scale: Optional[torch.Tensor] = None
    group_size: int = 0  # FP8_GROUP: channels per scale (G); NVFP4: 16
    ue8m0: bool = False  # FP8_GROUP: scales rounded up to powers of two
    # FP8_GROUP: strides of block_scale per (batch, token, head, group); batch stride 0 for varlen.
    # NVFP4: (tokens per batch, 1, 0, column groups of 4): the kernels form the flat token index
    # b * Sq + t (t alone for varlen) as with strides, and the swizzle needs the column count.
    block_scale_strides: Tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def quantized(self) -> bool:
        return self.kind != PLAIN

    def out_shape(self, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        """The output tensor's shape for an attention output of `shape` (..., H, Dv): NVFP4
        packs two channels a byte."""
        return tuple(shape[:-1]) + (shape[-1] // 2,) if self.kind == NVFP4 else tuple(shape)

    def encode(self) -> List[int]:
        """What a torch op needs besides out and the scale tensors: (kind, G, ue8m0, strides)."""
        return [int(self.kind), self.group_size, int(self.ue8m0), *self.block_scale_strides]

    @classmethod
    def decode(cls, out: torch.Tensor, scale: Optional[torch.Tensor], block_scale: Optional[torch.Tensor],
               ints: List[int]) -> "OutputFormat":
        """The format `encode` described, for `out` and its scale tensors."""
        return cls(OutKind(ints[0]), out.dtype, scale=scale, block_scale=block_scale, group_size=ints[1],
                   ue8m0=bool(ints[2]), block_scale_strides=tuple(ints[3:7]))


def nvfp4_scale_shape(num_tokens: int, num_heads: int, head_dim_v: int) -> Tuple[int, int]:
    """Shape of NVFP4's swizzled block-scale tensor: (round_up(T, 128), round_up(H * Dv / 16, 4))."""
    cols = num_heads * head_dim_v // NVFP4_BLOCK
    return -(-num_tokens // 128) * 128, -(-cols // 4) * 4


def _check_scale_tensor(name: str, t, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (float32, one element), got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype}")
    if t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"{name} must hold one element (0-d or shape (1,)), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the inputs' device {device}, got {t.device}")


def _check_block_scale_tensor(block_scale, dtype: torch.dtype, what: str, device: torch.device) -> None:
    if not isinstance(block_scale, torch.Tensor):
        raise TypeError(f"output_block_scale must be a torch.Tensor, got {type(block_scale).__name__}")
    if block_scale.dtype != dtype:
        name = str(dtype).replace("torch.", "")
        raise ValueError(f"output_block_scale must be {name} for {what} outputs, got {block_scale.dtype}")
    if block_scale.device != device:
        raise ValueError(f"output_block_scale must be on the inputs' device {device}, got {block_scale.device}")


def _group_format(dtype, block_scale, device, token_shape, num_heads, head_dim_v, ue8m0) -> OutputFormat:
    """Per-token-group FP8: infer G from output_block_scale's logical shape, (..., H * Dv // G)
    or (..., H, Dv // G) with ... the token dims, and take its strides as they are."""
    _check_block_scale_tensor(block_scale, torch.float32, "FP8", device)
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


def _nvfp4_format(dtype, global_scale, block_scale, device, token_shape, num_heads, head_dim_v, ue8m0):
    """NVFP4: output_scale is the global scale gs, output_block_scale the e4m3fn tensor the
    kernel fills in the 128x4 swizzled layout (both required: the caller needs the scales)."""
    if ue8m0:
        raise ValueError("ue8m0=True is only for per-group FP8 outputs, not NVFP4")
    if global_scale is None:
        raise ValueError("an NVFP4 output needs output_scale: the global scale gs (a 1-element float32 tensor)")
    _check_scale_tensor("output_scale", global_scale, device)
    if head_dim_v % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 output needs a head dim Dv divisible by {NVFP4_BLOCK}, got {head_dim_v}")
    shape = nvfp4_scale_shape(math.prod(token_shape), num_heads, head_dim_v)
    if block_scale is None:
        raise ValueError(f"an NVFP4 output needs output_block_scale: a float8_e4m3fn tensor of shape {shape} "
                         "that the kernel fills (128x4 swizzled layout)")
    _check_block_scale_tensor(block_scale, torch.float8_e4m3fn, "NVFP4", device)
    if tuple(block_scale.shape) != shape or not block_scale.is_contiguous():
        raise ValueError(f"output_block_scale must be a contiguous {shape} tensor for NVFP4 "
                         f"(round_up(T, 128), round_up(H * Dv / 16, 4)), got {tuple(block_scale.shape)}")
    batch_tokens = token_shape[1] if len(token_shape) == 2 else 0
    return OutputFormat(NVFP4, dtype, scale=global_scale, block_scale=block_scale, group_size=NVFP4_BLOCK,
                        block_scale_strides=(batch_tokens, 1, 0, shape[1] // 4))


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
        if out_dtype is not None and out_dtype != out.dtype and not (out_dtype == "nvfp4" and out.dtype in NVFP4_DTYPES):
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

    if dtype == "nvfp4" or dtype in NVFP4_DTYPES:
        if output_block_scale is not None and output_scale is None:
            raise ValueError("an NVFP4 output needs output_scale (the global scale gs) next to output_block_scale")
        return _nvfp4_format(torch.uint8 if dtype == "nvfp4" else dtype, output_scale, output_block_scale, device,
                             tuple(token_shape), num_heads, head_dim_v, ue8m0)
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
        f"unsupported output dtype {dtype}: expected bfloat16, float16, float32, float8_e4m3fn, float8_e5m2 "
        "or NVFP4 ('nvfp4', uint8, float4_e2m1fn_x2)"
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


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (sign in bit 3) of float64 x: the nearest of E2M1_VALUES after clamping to
    +-6, ties to the even code, chosen by distance to every grid point."""
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64, device=x.device)
    dist = (x.abs().clamp(max=E2M1_MAX)[..., None] - grid).abs()
    nearest = dist == dist.min(-1, keepdim=True).values
    odd = torch.arange(8, device=x.device) % 2 == 1
    code = torch.where(nearest & ~odd, 0, 1).argmin(-1)  # an even nearest code if there is one
    code = torch.where((nearest & ~odd).any(-1), code, nearest.int().argmax(-1))
    return code.to(torch.uint8) | torch.where(x < 0, 8, 0).to(torch.uint8)


def quantize_nvfp4(o: torch.Tensor, global_scale: torch.Tensor):
    """NVFP4 of o (..., Dv): returns (packed uint8 (..., Dv // 2), block scales e4m3fn (..., Dv // 16)).
    Per block of 16: SF = e4m3(gs * amax / 6) (saturated); q = e2m1(O * gs / SF), 0 where SF == 0;
    two codes a byte, the even channel in the low nibble."""
    gs = global_scale.double().reshape(())
    g = o.double().unflatten(-1, (-1, NVFP4_BLOCK))
    sf = (gs * g.abs().amax(-1) / E2M1_MAX).clamp(max=fp8_max(torch.float8_e4m3fn)).float()
    sf = sf.to(torch.float8_e4m3fn)
    sf_d = sf.double()[..., None]
    scaled = torch.where(sf_d > 0, g * gs / torch.where(sf_d > 0, sf_d, 1.0), 0.0)
    codes = round_e2m1(scaled).flatten(-2)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), sf


def nvfp4_swizzle_offsets(rows: int, cols: int, device=None) -> torch.Tensor:
    """(rows, cols) int64: flat byte offset of block scale (token m, column k) in the 128x4
    swizzled layout (SPEC.md), cols = the padded column count (a multiple of 4)."""
    m = torch.arange(rows, device=device)[:, None]
    k = torch.arange(cols, device=device)[None, :]
    return ((m // 128) * (cols // 4) + k // 4) * 512 + (m % 32) * 16 + ((m // 32) % 4) * 4 + k % 4


def unswizzle_block_scale(block_scale: torch.Tensor, num_tokens: int, num_cols: int) -> torch.Tensor:
    """The (num_tokens, num_cols) logical scales of a swizzled NVFP4 block-scale tensor."""
    rows, cols = block_scale.shape
    offs = nvfp4_swizzle_offsets(rows, cols, block_scale.device)[:num_tokens, :num_cols]
    return block_scale.reshape(-1)[offs.reshape(-1)].reshape(num_tokens, num_cols)


def dequantize_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Float64 values of packed e2m1 pairs (..., Dv // 2) -> (..., Dv)."""
    b = packed.view(torch.uint8)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2).long()
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64, device=b.device)
    return torch.where(codes >= 8, -1.0, 1.0).double() * grid[codes & 7]


def dequantize(out: torch.Tensor, fmt: OutputFormat, block_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float64 view of what the next GEMM would see: out * scale for FP8, out for plain.
    FP8_GROUP and NVFP4 take the block scales in their logical shape (..., H, Dv // G)."""
    if fmt.kind == PLAIN:
        return out.double()
    if fmt.kind == FP8_STATIC:
        return out.double() * fmt.scale.double()
    if fmt.kind == FP8_GROUP:
        return out.double() * block_scale.double().repeat_interleave(fmt.group_size, dim=-1)
    if fmt.kind == NVFP4:
        sf = block_scale.double().repeat_interleave(NVFP4_BLOCK, dim=-1)
        return dequantize_e2m1(out) * sf / fmt.scale.double().reshape(())
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
    if fmt.kind == NVFP4:
        return quantize_nvfp4(o, fmt.scale)
    raise ValueError(f"unknown output kind {fmt.kind}")


# ----------------------------------------------------------------------------------
# FP8 inputs: a bf16/fp16 K or V (or cache) in e4m3 with its descales (SPEC "FP8 inputs").
# ----------------------------------------------------------------------------------

FP8_INPUT = torch.float8_e4m3fn


def quantize_kv_fp8(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, num_seqs: Optional[int] = None,
                    per_tensor: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """An FP8 (e4m3fn) copy of K or V and the float32 descales attnquant takes as k_descale /
    v_descale (x ~ x_fp8.float() * descale), each scale amax / 448 of the values it covers:

    - batched x (B, S, Hkv, D): descales (B, Hkv), one per sequence and KV head;
    - packed x (total, Hkv, D) with cu_seqlens (B + 1,): (B, Hkv), over each sequence's tokens;
    - a paged cache (num_blocks, page, Hkv, D) with num_seqs: one scale per KV head over the
      whole cache (pages may be shared between sequences), repeated to (num_seqs, Hkv);
    - per_tensor=True: one scale, shape (), for any of them.
    Reads the lengths on the host (not for the hot path: a cache is quantized as it is written).
    """
    m = fp8_max(FP8_INPUT)
    a = x.float().abs()
    if per_tensor:
        amax = a.amax()
    elif x.dim() == 4 and num_seqs is not None:  # paged cache
        amax = a.amax(dim=(0, 1, 3))[None].expand(num_seqs, -1)
    elif x.dim() == 4:
        amax = a.amax(dim=(1, 3))
    elif cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        amax = torch.stack([a[lo:hi].amax(dim=(0, 2)) if hi > lo else a.new_zeros(x.shape[1])
                            for lo, hi in zip(bounds, bounds[1:])]) if len(bounds) > 1 else a.new_zeros(0, x.shape[1])
    else:
        raise ValueError("quantize_kv_fp8 needs x (B, S, Hkv, D), a packed x with cu_seqlens, a paged cache with "
                         "num_seqs, or per_tensor=True")
    descale = (amax.clamp_min(1e-12) / m).float().contiguous()
    if per_tensor:
        scale = descale
    elif x.dim() == 4 and num_seqs is not None:
        scale = descale[0][None, None, :, None]
    elif x.dim() == 4:
        scale = descale[:, None, :, None]
    else:
        seq_of_token = torch.repeat_interleave(torch.arange(len(descale), device=x.device),
                                               torch.diff(cu_seqlens.long()), output_size=x.shape[0])
        scale = descale[seq_of_token][:, :, None]
    q = (x.float() / scale).clamp(-m, m).to(FP8_INPUT)
    return q, descale


def dequantize_kv_fp8(x_fp8: torch.Tensor, descale: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                      paged: bool = False) -> torch.Tensor:
    """Float64 values of an FP8 K/V under its descales (the layouts of quantize_kv_fp8)."""
    d = descale.double()
    if d.dim() == 0:
        return x_fp8.double() * d
    if paged:
        return x_fp8.double() * d[0][None, None, :, None]
    if x_fp8.dim() == 4:
        return x_fp8.double() * d[:, None, :, None]
    seq_of_token = torch.repeat_interleave(torch.arange(len(d), device=x_fp8.device), torch.diff(cu_seqlens.long()),
                                           output_size=x_fp8.shape[0])
    return x_fp8.double() * d[seq_of_token][:, :, None]


def hadamard_rotation(d: int, generator: Optional[torch.Generator] = None,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """A random orthogonal float32 (d, d) matrix R = H diag(s) / sqrt(d): Sylvester's Hadamard
    matrix H with random signs s on its columns (d a power of two). (q R) (k R)^T = q k^T, so
    rotating q and k alike leaves the scores as they are, while an outlier element is spread
    over all d of its row: FP8 then rounds the row at a finer scale (FA3's incoherent
    processing). Folded into the q and k projection weights (W_q R, W_k R), it costs nothing at
    run time."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"hadamard_rotation needs a power-of-two size, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (d,), generator=generator).double() * 2 - 1
    return (h * signs / math.sqrt(d)).float().to(device)


class FP8Inputs(NamedTuple):
    """q, k, v in e4m3 with the descales the forward functions take (`kwargs()` gives them as
    keyword arguments), and the rotation applied to q and k (None: none)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_descale: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor
    rotation: Optional[torch.Tensor]

    def kwargs(self) -> dict:
        return dict(q_descale=self.q_descale, k_descale=self.k_descale, v_descale=self.v_descale)

    def dequantized(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The float64 values q, k, v stand for (rotated, if they were): each stored value times
        its descale, q's (B, Hkv) descale shared by the query heads of its KV head."""
        def deq(x, d, heads):
            d = d.double()
            return x.double() * (d if d.dim() == 0 else d.repeat_interleave(heads, 1)[:, None, :, None])
        group = self.q.shape[2] // self.k.shape[2]
        return deq(self.q, self.q_descale, group), deq(self.k, self.k_descale, 1), deq(self.v, self.v_descale, 1)


def quantize_qkv_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, per_tensor: bool = False,
                     rotate_qk: bool = False, generator: Optional[torch.Generator] = None) -> FP8Inputs:
    """Batched q (B, Sq, H, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) as FP8 attention inputs:
    each e4m3 with descales per (batch, KV head) (q's over the query heads that share a KV head,
    as q_descale is defined) or, with per_tensor, one each. rotate_qk: q and k multiplied by one
    hadamard_rotation(D) first, which leaves the scores unchanged and measured FP8 attention's
    error on FA3's test distribution at 0.5-0.75x of the unrotated (tools/fp8_accuracy.py)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, S, heads, dim) tensor")
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    if h % max(hkv, 1) or k.shape[-1] != d:
        raise ValueError(f"q (B, Sq, H={h}, D={d}) and k (B, Sk, Hkv={hkv}, {k.shape[-1]}) do not match")
    rotation = hadamard_rotation(d, generator, q.device) if rotate_qk else None
    if rotation is not None:
        q, k = q.float() @ rotation, k.float() @ rotation
    # q's heads grouped by KV head: one descale a (batch, KV head), as the kernels read it
    qq, qd = quantize_kv_fp8(q.reshape(b, sq, hkv, h // hkv * d), per_tensor=per_tensor)
    kq, kd = quantize_kv_fp8(k, per_tensor=per_tensor)
    vq, vd = quantize_kv_fp8(v, per_tensor=per_tensor)
    return FP8Inputs(qq.reshape(b, sq, h, d), kq, vq, qd, kd, vd, rotation)
