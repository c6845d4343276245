"""What a forward call computes, as typed values the planner and both backends read.

`Problem`: the validated input tensors with their shapes and strides (batched, varlen or
paged; FP8 inputs with their descales; learnable sinks). `Attention`: the math options
(scale, causal, window, softcap). Built once per call by attnquant.api; nothing here reads a
device value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class Attention:
    """The attention's options, normalized by validation."""

    softmax_scale: float
    causal: bool
    window: Tuple[int, int] = (-1, -1)  # (left, right) around the bottom-right diagonal; -1 unbounded
    softcap: float = 0.0  # 0: off

    @property
    def window_left(self) -> int:
        return self.window[0]

    @property
    def window_right(self) -> int:
        """The right bound the kernels apply: 0 when causal (causal is that bound)."""
        return 0 if self.causal else self.window[1]

    @property
    def windowed(self) -> bool:
        """A left bound, or a right bound other than causal's."""
        return self.window[0] >= 0 or (self.window[1] >= 0 and not self.causal)


@dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    batch: int
    num_heads: int
    num_heads_kv: int
    head_dim: int
    head_dim_v: int
    max_seqlen_q: int
    max_seqlen_k: int
    q_strides: Tuple[int, int, int]  # (batch, token, head)
    k_strides: Tuple[int, int, int]  # (batch or page, token, head)
    v_strides: Tuple[int, int, int]
    out_shape: Tuple[int, ...]  # (B, Sq, H, Dv) or (total_q, H, Dv)
    lse_shape: Tuple[int, ...]  # (B, H, Sq) or (H, total_q)
    varlen: bool
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    seqused_k: Optional[torch.Tensor] = None
    block_table: Optional[torch.Tensor] = None
    page_size: int = 1
    sinks: Optional[torch.Tensor] = None  # (H,) logits (natural log), one per query head
    # FP8 inputs: float32 descales, (B, Hkv) or one element (strides (0, 0)); None = 1
    q_descale: Optional[torch.Tensor] = None
    k_descale: Optional[torch.Tensor] = None
    v_descale: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        """Rows of the output, batch and sequence flattened."""
        return self.out_shape[0] if self.varlen else self.batch * self.max_seqlen_q

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_heads_kv

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def fp8_kv(self) -> bool:
        return self.k.element_size() == 1

    @property
    def has_descale(self) -> bool:
        return self.q_descale is not None or self.k_descale is not None or self.v_descale is not None

    def with_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> "Problem":
        """The same problem over other tensors of q/k/v's shapes (strides read anew)."""
        return make_problem(q, k, v, self.max_seqlen_q, self.max_seqlen_k, self.cu_seqlens_q, self.cu_seqlens_k,
                            self.seqused_k, self.block_table, self.sinks, self.q_descale, self.k_descale,
                            self.v_descale)


def make_problem(q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
                 block_table=None, sinks=None, q_descale=None, k_descale=None, v_descale=None) -> Problem:
    """Describe validated inputs: q (B, Sq, H, D) or packed (total_q, H, D); k/v batched,
    packed, or paged (num_blocks, page_size, Hkv, *) when block_table is given."""
    varlen = q.dim() == 3
    paged = block_table is not None
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    h, d = q.shape[-2], q.shape[-1]
    hkv, dv = v.shape[-2], v.shape[-1]
    if paged or not varlen:
        k_strides, v_strides = tuple(k.stride()[:3]), tuple(v.stride()[:3])
    else:
        k_strides, v_strides = (0,) + tuple(k.stride()[:2]), (0,) + tuple(v.stride()[:2])
    if varlen:
        q_strides, out_shape, lse_shape = (0,) + tuple(q.stride()[:2]), (q.shape[0], h, dv), (h, q.shape[0])
    else:
        q_strides, out_shape, lse_shape = tuple(q.stride()[:3]), (batch, max_seqlen_q, h, dv), (batch, h, max_seqlen_q)
    return Problem(q, k, v, batch, h, hkv, d, dv, max_seqlen_q, max_seqlen_k, q_strides, k_strides, v_strides,
                   out_shape, lse_shape, varlen, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table,
                   k.shape[1] if paged else 1, sinks, q_descale, k_descale, v_descale)


def token_strides(t: torch.Tensor, varlen: bool) -> Tuple[int, int, int]:
    """(batch, token, head) strides of an output-like tensor; batch stride 0 for varlen."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def lse_strides(lse: Optional[torch.Tensor], varlen: bool) -> Tuple[int, int, int]:
    """(batch, head, token) strides of an LSE tensor: (B, H, Sq) or (H, total_q); zeros for none."""
    if lse is None:
        return 0, 0, 0
    if varlen:
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)


def descale_strides(t: Optional[torch.Tensor]) -> Tuple[int, int]:
    """(batch, kv-head) strides of a descale: (B, Hkv), or (0, 0) for one element (or none)."""
    if t is None or t.dim() < 2:
        return 0, 0
    return t.stride(0), t.stride(1)
