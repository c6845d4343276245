"""The attention block: attention whose output leaves the kernel in FP8, then the output
projection as an FP8 GEMM (torch._scaled_mm) that reads those bytes and scales as they are.

    w = quantize_weight_fp8(w_o)                          # once, at load: (hidden, H * Dv)
    y = attention_oproj(q, k, v, w, output_scale=s)       # static per-tensor FP8 activations
    wb = quantize_weight_fp8(w_o, block=True)
    y = attention_oproj(q, k, v, wb)                      # 1x128 per-token-group activations

Two recipes, the two that torch._scaled_mm pairs on Hopper:
- static: the kernel writes sat(O / s) with the caller's calibrated scale s; the GEMM takes s
  and the weight's one scale (TensorWise x TensorWise).
- per-token group (DeepSeek-V3's recipe): the kernel writes one scale per 128 output columns
  of each token in the layout cuBLAS's blockwise GEMM reads (column-major: token stride 1,
  column stride = tokens, DeepGEMM's), and the weight carries one scale per 128 x 128 block
  (BlockWise1x128 x BlockWise128x128; needs CUDA 12.9's cuBLAS, sm_90).
Any other attnquant call (varlen, KV cache, split-KV, sinks) feeds `oproj_fp8` the same way:
allocate the group scales with `group_scale_buffer`, pass them as output_block_scale.
Scales are dequant scales throughout (real = stored x scale), attnquant's convention and
torch._scaled_mm's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import quant
from .api import flash_attn_func

GEMM_BLOCK = 128  # cuBLAS's blockwise FP8 GEMM: 1 x 128 activation groups, 128 x 128 weight blocks
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class FP8Weight:
    """An output projection's weight in FP8: data (N, K) e4m3fn row-major (N the hidden size,
    K = H * Dv, nn.Linear's layout), and its dequant scale: one element (per tensor) or one
    per 128 x 128 block, (ceil(N / 128), ceil(K / 128)) row-major."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def blockwise(self) -> bool:
        return self.scale.dim() == 2

    def dequantize(self) -> torch.Tensor:
        """Float64 values (data x scale)."""
        w = self.data.double()
        if not self.blockwise:
            return w * self.scale.double()
        n, k = w.shape
        s = self.scale.double().repeat_interleave(GEMM_BLOCK, 0)[:n].repeat_interleave(GEMM_BLOCK, 1)[:, :k]
        return w * s


def quantize_weight_fp8(w: torch.Tensor, block: bool = False) -> FP8Weight:
    """An FP8 (e4m3fn) copy of the (N, K) weight w with dequant scales amax / 448: one for the
    whole tensor, or (block=True) one per 128 x 128 block (a block of zeros gets scale 1)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D float tensor (N, K), got {getattr(w, 'shape', type(w))}")
    m = quant.fp8_max(FP8)
    w64 = w.double()
    if not block:
        scale = (w64.abs().amax() / m).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return FP8Weight((w64 / scale.double()).clamp(-m, m).float().to(FP8), scale)
    n, k = w.shape
    nb, kb = -(-n // GEMM_BLOCK), -(-k // GEMM_BLOCK)
    padded = torch.zeros(nb * GEMM_BLOCK, kb * GEMM_BLOCK, dtype=torch.float64, device=w.device)
    padded[:n, :k] = w64
    tiles = padded.view(nb, GEMM_BLOCK, kb, GEMM_BLOCK)
    scale = (tiles.abs().amax(dim=(1, 3)) / m).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    data = (tiles / scale.double()[:, None, :, None]).clamp(-m, m).view_as(padded)[:n, :k]
    return FP8Weight(data.float().to(FP8).contiguous(), scale.contiguous())


def group_scale_buffer(num_tokens: int, num_heads: int, head_dim_v: int, device) -> torch.Tensor:
    """Per-token-group scales (num_tokens, H * Dv / 128), float32, in the layout the blockwise
    GEMM reads (token stride 1, column stride num_tokens): pass it as output_block_scale (with
    the tokens reshaped as the call's output has them) and then to oproj_fp8."""
    if head_dim_v % GEMM_BLOCK:
        raise ValueError(f"per-token-group FP8 for the GEMM needs groups of {GEMM_BLOCK} within a head: head_dim_v "
                         f"must be a multiple of {GEMM_BLOCK}, got {head_dim_v} (use a static output_scale)")
    cols = num_heads * head_dim_v // GEMM_BLOCK
    return torch.empty(cols, num_tokens, device=device, dtype=torch.float32).t()


def oproj_fp8(o: torch.Tensor, weight: FP8Weight, act_scale: torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y = O W^T as an FP8 GEMM: o (..., H, Dv) e4m3fn as attnquant wrote it, act_scale its
    dequant scale (one element: static) or its per-token-group scales (..., H * Dv / 128) from
    group_scale_buffer; weight from quantize_weight_fp8 (blockwise for group scales). Returns
    (..., N) in out_dtype."""
    if not isinstance(weight, FP8Weight):
        raise TypeError(f"weight must be an FP8Weight (quantize_weight_fp8), got {type(weight).__name__}")
    if o.dtype != FP8:
        raise ValueError(f"o must be float8_e4m3fn (attnquant's FP8 output), got {o.dtype}")
    if o.dim() < 3:
        raise ValueError(f"o must be (..., H, Dv), got shape {tuple(o.shape)}")
    *tokens, h, dv = o.shape
    k = h * dv
    n = weight.data.shape[0]
    if weight.data.shape[1] != k:
        raise ValueError(f"weight must have K = H * Dv = {k} columns, got {tuple(weight.data.shape)}")
    a = o.reshape(-1, k)
    m = a.shape[0]
    if act_scale.dim() <= 1:  # static: one element (the group scales are (..., K / 128), two dims at least)
        if weight.blockwise:
            raise ValueError("a static (per-tensor) activation scale pairs with a per-tensor weight: "
                             "quantize_weight_fp8(w) without block=True")
        scale_a = act_scale.reshape(()).float()
        scale_b = weight.scale.reshape(()).float()
    else:
        if not weight.blockwise:
            raise ValueError("per-token-group activation scales pair with a 128 x 128 block weight: "
                             "quantize_weight_fp8(w, block=True)")
        if act_scale.dtype != torch.float32 or tuple(act_scale.shape) != (*tokens, k // GEMM_BLOCK):
            raise ValueError(f"act_scale must be float32 of shape {(*tokens, k // GEMM_BLOCK)} (groups of "
                             f"{GEMM_BLOCK}), got {act_scale.dtype} {tuple(act_scale.shape)}")
        scale_a = act_scale.reshape(m, k // GEMM_BLOCK)
        if m == 1:  # one token: any layout is both; give cuBLAS the canonical strides
            scale_a = scale_a.t().contiguous().t()
        elif scale_a.stride() != (1, m):
            raise ValueError(f"act_scale must be column-major over the tokens (strides (1, {m}) as "
                             f"group_scale_buffer makes it, what cuBLAS's blockwise GEMM reads), got "
                             f"{tuple(scale_a.stride())}")
        scale_b = weight.scale.t()
    if m == 0:
        return torch.empty(*tokens, n, dtype=out_dtype, device=o.device)
    y = torch._scaled_mm(a, weight.data.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return y.reshape(*tokens, n)


def attention_oproj(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: FP8Weight, *,
                    output_scale: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.bfloat16,
                    **attn_kwargs) -> torch.Tensor:
    """The attention block on batched inputs: flash_attn_func with its output in FP8, then
    oproj_fp8. output_scale given: static FP8 (weight per-tensor); else per-token-group FP8
    with 128-column groups (weight blockwise). attn_kwargs go to flash_attn_func (causal,
    softmax_scale, window_size, softcap, sinks, descales, backend). Returns (B, Sq, N)."""
    if not isinstance(weight, FP8Weight):
        raise TypeError(f"weight must be an FP8Weight (quantize_weight_fp8), got {type(weight).__name__}")
    for name in ("out", "out_dtype", "output_block_scale", "ue8m0", "return_lse"):
        if name in attn_kwargs:
            raise ValueError(f"attention_oproj chooses the attention's output format itself: {name} is not taken")
    b, sq, h = q.shape[:3]
    dv = v.shape[-1]
    if output_scale is not None:
        o, _ = flash_attn_func(q, k, v, output_scale=output_scale, out_dtype=FP8, **attn_kwargs)
        return oproj_fp8(o, weight, output_scale, out_dtype)
    if not weight.blockwise:
        raise ValueError("without output_scale the block runs per-token-group FP8, which pairs with a 128 x 128 "
                         "block weight: quantize_weight_fp8(w, block=True), or pass a static output_scale")
    scales = group_scale_buffer(b * sq, h, dv, q.device)
    o, _ = flash_attn_func(q, k, v, out_dtype=FP8, output_block_scale=scales.view(b, sq, -1), **attn_kwargs)
    return oproj_fp8(o, weight, scales.view(b, sq, -1), out_dtype)
