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
SCALE_ALIGN = 4  # float32s in the 16 bytes cuBLAS aligns each scale matrix's leading dimension to
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class FP8Weight:
    """An output projection's weight in FP8: data (N, K) e4m3fn row-major (N the hidden size,
    K = H * Dv, nn.Linear's layout), and its dequant scale: one element (per tensor) or one
    per 128 x 128 block, (ceil(N / 128), ceil(K / 128)) (quantize_weight_fp8 stores the block
    scales in the padded layout the GEMM reads, see gemm_scale)."""

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

    def gemm_scale(self) -> torch.Tensor:
        """The block scales as cuBLAS's 128 x 128 recipe reads them: (round_up(K / 128, 4),
        ceil(N / 128)) with strides (1, round_up(K / 128, 4)). cuBLAS reads the scale matrix
        with a 16-byte aligned leading dimension, so K / 128 is padded to a multiple of 4
        floats; without the padding it reads the wrong scales (seen on the H100 as NaN at
        K = 256). A copy only when the scale is not already stored that way."""
        nb, kb = self.scale.shape
        lead = _aligned(kb)
        s = self.scale
        if s.stride() != (lead, 1) or s.storage_offset() != 0 or s.untyped_storage().nbytes() < nb * lead * 4:
            s = _padded_block_scales(s)
        return s.as_strided((lead, nb), (1, lead))


def _aligned(n: int) -> int:
    """n rounded up to a multiple of 4 float32s: cuBLAS's blockwise GEMM wants the leading
    dimension of each scale matrix 16-byte aligned."""
    return -(-n // SCALE_ALIGN) * SCALE_ALIGN


def _padded_block_scales(scale: torch.Tensor) -> torch.Tensor:
    """scale (nb, kb) as the first kb columns of an (nb, round_up(kb, 4)) row-major buffer whose
    padding is 1 (finite: cuBLAS may read it)."""
    nb, kb = scale.shape
    buf = torch.ones(nb, _aligned(kb), dtype=torch.float32, device=scale.device)
    buf[:, :kb] = scale
    return buf[:, :kb]


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
    return FP8Weight(data.float().to(FP8).contiguous(), _padded_block_scales(scale))


def group_scale_buffer(num_tokens: int, num_heads: int, head_dim_v: int, device) -> torch.Tensor:
    """Per-token-group scales (num_tokens, H * Dv / 128), float32, in the layout the blockwise
    GEMM reads (token stride 1, column stride num_tokens): pass it as output_block_scale (with
    the tokens reshaped as the call's output has them) and then to oproj_fp8. The GEMM reads
    it in place when num_tokens is a multiple of 4 (else oproj_fp8 pads a copy)."""
    cols = _group_columns(num_heads, head_dim_v)
    return torch.empty(cols, num_tokens, device=device, dtype=torch.float32).t()


def _group_columns(num_heads: int, head_dim_v: int) -> int:
    if head_dim_v % GEMM_BLOCK:
        raise ValueError(f"per-token-group FP8 for the GEMM needs groups of {GEMM_BLOCK} within a head: head_dim_v "
                         f"must be a multiple of {GEMM_BLOCK}, got {head_dim_v} (use a static output_scale)")
    return num_heads * head_dim_v // GEMM_BLOCK


def gemm_operands(a: torch.Tensor, act_scale: torch.Tensor):
    """The activation (M, K) e4m3fn and its group scales (M, K / 128) as cuBLAS's 1x128 recipe
    reads them: M a multiple of 4 and the scales column-major (strides (1, M)), because cuBLAS
    wants the scales' leading dimension 16-byte aligned (M = 1 or 7 gives
    CUBLAS_STATUS_NOT_SUPPORTED on the H100). Inputs already in that form pass through
    untouched; otherwise the scales are copied (M x K / 128 floats) and, only when M is not a
    multiple of 4, the activation too, with zero rows (scale 1) appended. Returns
    (a, scales, M) with M the rows that are real."""
    m, k = a.shape
    mp = _aligned(m)
    if mp == m and act_scale.stride() == (1, m):
        return a, act_scale, m
    scales = torch.ones(k // GEMM_BLOCK, mp, dtype=torch.float32, device=a.device).t()
    scales[:m] = act_scale
    if mp != m:
        rows = torch.zeros(mp, k, dtype=a.dtype, device=a.device)
        rows[:m] = a
        a = rows
    return a, scales, m


def _blockwise_mm(a: torch.Tensor, scales: torch.Tensor, weight: FP8Weight, out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) x W^T with 1x128 activation scales and 128x128 weight scales, both already in
    cuBLAS's layout (gemm_operands, FP8Weight.gemm_scale)."""
    F = torch.nn.functional
    if not hasattr(F, "scaled_mm"):
        raise NotImplementedError("the blockwise FP8 GEMM needs torch.nn.functional.scaled_mm (torch >= 2.10) for "
                                  "the padded 128 x 128 weight-scale layout cuBLAS reads")
    return F.scaled_mm(a, weight.data.t(), scales, F.ScalingType.BlockWise1x128,
                       weight.gemm_scale(), F.ScalingType.BlockWise128x128, output_dtype=out_dtype)


def _check_weight(weight: FP8Weight, k: int) -> None:
    if weight.data.shape[1] != k:
        raise ValueError(f"weight must have K = H * Dv = {k} columns, got {tuple(weight.data.shape)}")


def oproj_fp8(o: torch.Tensor, weight: FP8Weight, act_scale: torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y = O W^T as an FP8 GEMM: o (..., H, Dv) e4m3fn as attnquant wrote it, act_scale its
    dequant scale (one element: static) or its per-token-group scales (..., H * Dv / 128) in
    any layout (group_scale_buffer's is read in place); weight from quantize_weight_fp8
    (blockwise for group scales). Returns (..., N) in out_dtype."""
    if not isinstance(weight, FP8Weight):
        raise TypeError(f"weight must be an FP8Weight (quantize_weight_fp8), got {type(weight).__name__}")
    if o.dtype != FP8:
        raise ValueError(f"o must be float8_e4m3fn (attnquant's FP8 output), got {o.dtype}")
    if o.dim() < 3:
        raise ValueError(f"o must be (..., H, Dv), got shape {tuple(o.shape)}")
    *tokens, h, dv = o.shape
    k = h * dv
    n = weight.data.shape[0]
    _check_weight(weight, k)
    a = o.reshape(-1, k)
    m = a.shape[0]
    if act_scale.dim() <= 1:  # static: one element (the group scales are (..., K / 128), two dims at least)
        if weight.blockwise:
            raise ValueError("a static (per-tensor) activation scale pairs with a per-tensor weight: "
                             "quantize_weight_fp8(w) without block=True")
        if m == 0:
            return torch.empty(*tokens, n, dtype=out_dtype, device=o.device)
        y = torch._scaled_mm(a, weight.data.t(), scale_a=act_scale.reshape(()).float(),
                             scale_b=weight.scale.reshape(()).float(), out_dtype=out_dtype)
        return y.reshape(*tokens, n)
    if not weight.blockwise:
        raise ValueError("per-token-group activation scales pair with a 128 x 128 block weight: "
                         "quantize_weight_fp8(w, block=True)")
    if act_scale.dtype != torch.float32 or tuple(act_scale.shape) != (*tokens, k // GEMM_BLOCK):
        raise ValueError(f"act_scale must be float32 of shape {(*tokens, k // GEMM_BLOCK)} (groups of "
                         f"{GEMM_BLOCK}), got {act_scale.dtype} {tuple(act_scale.shape)}")
    if m == 0:
        return torch.empty(*tokens, n, dtype=out_dtype, device=o.device)
    a, scales, m = gemm_operands(a, act_scale.reshape(m, k // GEMM_BLOCK))
    return _blockwise_mm(a, scales, weight, out_dtype)[:m].reshape(*tokens, n)


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
    m = b * sq
    scales = group_scale_buffer(_aligned(m), h, dv, q.device)  # (raises for Dv not in 128-column groups)
    _check_weight(weight, h * dv)
    if m == 0:
        return torch.empty(b, sq, weight.data.shape[0], dtype=out_dtype, device=q.device)
    # the attention writes into buffers already in the GEMM's layout (whole groups of 4 rows,
    # column-major scales), so nothing is copied between the two; padding rows: zero, scale 1
    mp = _aligned(m)
    rows = torch.empty(mp, h, dv, dtype=FP8, device=q.device)
    if mp != m:
        rows[m:].zero_()
        scales[m:] = 1
    flash_attn_func(q, k, v, out=rows[:m].view(b, sq, h, dv), output_block_scale=scales[:m].view(b, sq, -1),
                    **attn_kwargs)
    return _blockwise_mm(rows.view(mp, h * dv), scales, weight, out_dtype)[:m].view(b, sq, -1)
