"""Which kernel runs a forward call and how (a typed `Plan`), and the run itself.

On an sm_90 GPU prefill-sized calls take the Hopper Gluon kernel (kernels/hopper), the rest
the portable Triton kernel (kernels/portable); `backend=` or $ATTNQUANT_BACKEND forces one.
Both launchers read the same `Problem` and `Attention` (problem.py). The runs sit behind
registered torch ops (attnquant::fwd, attnquant::merge) so that torch.compile(fullgraph=True)
sees opaque calls; eager calls skip the op dispatcher (~150 us of host time a call). The plan
crosses the op boundary as one int list (Plan.encode / Plan.decode). Nothing here reads a
device value: no host sync, so every call can be captured in a CUDA graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import List, Optional, Union

import torch

from . import quant
from .kernels import launcher
from .kernels.combine import Partials, launch_combine
from .kernels.device import on_device
from .kernels.hopper import launch as hopper
from .kernels.hopper.config import WsConfig
from .kernels.portable import launch as portable
from .kernels.portable.config import FwdConfig
from .problem import Attention, Problem, make_problem
from .validation import interpreting

BACKENDS = ("auto", "gluon", "triton")
BACKEND_ENV = "ATTNQUANT_BACKEND"
# Query rows a (batch, KV head) must have for the Gluon kernel: fewer (decode, short speculative
# steps) fill one of its 64-row warpgroup tiles poorly and stay on the portable kernel.
GLUON_MIN_ROWS = 65


def requested_backend(backend: Optional[str]) -> str:
    """The `backend` argument, else $ATTNQUANT_BACKEND, else 'auto'."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        src = "backend" if backend is not None else BACKEND_ENV
        raise ValueError(f"{src} must be one of {BACKENDS}, got {choice!r}")
    return choice


# (field names and bool-ness of the configs a Plan carries, read once: torch.compile does not trace
# dataclasses.fields)
_FIELDS = {cls: tuple((f.name, f.type in (bool, "bool")) for f in fields(cls)) for cls in (FwdConfig, WsConfig)}


def _encode(cfg) -> List[int]:
    return [int(getattr(cfg, name)) for name, _ in _FIELDS[type(cfg)]]


def _decode(cls, ints):
    return cls(*[bool(i) if is_bool else i for (_, is_bool), i in zip(_FIELDS[cls], ints)])


@dataclass(frozen=True)
class Plan:
    """How a forward runs: the Gluon kernel (with `ws`, a config a caller fixed, or its own per
    problem) or the portable one (tile config `tile`, `num_splits` key splits). A Gluon plan keeps
    a portable tile too, for a call whose pointers turn out not to be 16-byte aligned (seen only
    at run time under torch.compile)."""

    gluon: bool
    num_splits: int
    tile: FwdConfig
    ws: Optional[WsConfig] = None

    def encode(self) -> List[int]:
        """One int list for the torch op's schema."""
        ws = [1] + _encode(self.ws) if self.ws is not None else [0] * (1 + len(_FIELDS[WsConfig]))
        return [int(self.gluon), self.num_splits] + _encode(self.tile) + ws

    @classmethod
    def decode(cls, ints: List[int]) -> "Plan":
        n = len(_FIELDS[FwdConfig])
        tile = _decode(FwdConfig, ints[2:2 + n])
        ws = _decode(WsConfig, ints[3 + n:]) if ints[2 + n] else None
        return cls(bool(ints[0]), ints[1], tile, ws)


def plan(p: Problem, attn: Attention, num_splits: int, backend: Optional[str],
         config: Union[FwdConfig, WsConfig, None] = None) -> Plan:
    """The kernel, tiles and splits for this call. backend: 'auto' (the Gluon kernel where it
    applies, else the portable one), 'gluon' (it, or a ValueError saying why not), 'triton' (the
    portable kernel); None reads $ATTNQUANT_BACKEND (default 'auto'). `config` fixes the tiles
    (tests and measurements): a FwdConfig runs the portable kernel, a WsConfig the Gluon one."""
    choice = requested_backend(backend)
    interpret = interpreting()
    tile = config if isinstance(config, FwdConfig) else portable.config_for(p, interpret)
    if isinstance(config, WsConfig) and choice != "gluon":
        raise ValueError("a WsConfig is the Gluon kernel's: pass backend='gluon' with it")
    if choice == "gluon":
        why_not = hopper.unsupported_reason(p, attn, num_splits, interpret)
        if why_not is not None:
            raise ValueError(f"backend='gluon' cannot run this call: {why_not}")
        return Plan(True, 1, tile, config if isinstance(config, WsConfig) else None)
    splits = portable.num_splits_for(p, tile, num_splits, interpret)
    # decode-sized tiles and calls the split heuristic splits stay portable, unchecked (the
    # decode path's host time is what eager decode pays for)
    gluon = (choice == "auto" and config is None and p.max_seqlen_q * p.group >= GLUON_MIN_ROWS and splits == 1
             and hopper.unsupported_reason(p, attn, num_splits, interpret) is None)
    return Plan(gluon, splits, tile)


def forward(p: Problem, attn: Attention, fmt: quant.OutputFormat, out: torch.Tensor, lse: Optional[torch.Tensor],
            plan_: Plan) -> None:
    """Run the planned forward, eagerly or (under torch.compile) through the registered op."""
    if torch.compiler.is_compiling():
        torch.ops.attnquant.fwd(p.q, p.k, p.v, out, lse, fmt.scale, fmt.block_scale, p.block_table, p.cu_seqlens_q,
                                p.cu_seqlens_k, p.seqused_k, p.sinks, p.q_descale, p.k_descale, p.v_descale,
                                p.max_seqlen_q, p.max_seqlen_k, attn.softmax_scale, attn.softcap, attn.causal,
                                list(attn.window), plan_.encode(), fmt.encode())
    else:
        run(p, attn, fmt, out, lse, plan_)


def run(p: Problem, attn: Attention, fmt: quant.OutputFormat, out: torch.Tensor, lse: Optional[torch.Tensor],
        plan_: Plan) -> None:
    out = _nvfp4_prologue(fmt, out, p.num_tokens, p.num_heads, p.head_dim_v)
    if plan_.gluon and hopper.aligned_for_tma(p.q, p.k, p.v):
        with on_device(p.q.device):
            hopper.launch(p, attn, fmt, out, lse, plan_.ws)
        return
    portable.launch(p, attn, fmt, out, lse, plan_.tile, plan_.num_splits, interpreting())


def _nvfp4_prologue(fmt: quant.OutputFormat, out: torch.Tensor, num_tokens: int, num_heads: int,
                    head_dim_v: int) -> torch.Tensor:
    """NVFP4 only: the block scales' padding zeroed, and out's bytes for the kernels (a
    float4_e2m1fn_x2 tensor viewed as uint8)."""
    if fmt.kind != quant.NVFP4:
        return out
    zero_nvfp4_padding(fmt.block_scale, num_tokens, num_heads, head_dim_v)
    return out.view(torch.uint8)


def zero_nvfp4_padding(block_scale: torch.Tensor, num_tokens: int, num_heads: int, head_dim_v: int) -> None:
    """Zero the NVFP4 block-scale padding the kernels do not reach (SPEC: padding rows and
    columns read 0; rows past T exist when T % 128 != 0, columns when H * Dv / 16 % 4 != 0)."""
    if launcher.RECORDERS:  # (a plan being made: attnquant/replay.py)
        launcher.RECORDERS[-1].nvfp4_padding(block_scale, num_tokens, num_heads, head_dim_v)
    bs = block_scale.view(torch.uint8)
    if (num_heads * head_dim_v // quant.NVFP4_BLOCK) % 4:
        bs.zero_()
    elif num_tokens % 128:
        bs[num_tokens // 128 * 128:].zero_()  # the last 128-row tile: one contiguous piece


@torch.library.custom_op("attnquant::fwd", mutates_args=("out", "lse", "output_block_scale"))
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: Optional[torch.Tensor],
            output_scale: Optional[torch.Tensor], output_block_scale: Optional[torch.Tensor],
            block_table: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
            cu_seqlens_k: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
            q_descale: Optional[torch.Tensor], k_descale: Optional[torch.Tensor], v_descale: Optional[torch.Tensor],
            max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, softcap: float, causal: bool,
            window: List[int], plan_: List[int], fmt: List[int]) -> None:
    """The forward as a torch op: the problem, options, plan and format rebuilt from tensor and
    number arguments, then run."""
    p = make_problem(q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, sinks,
                     q_descale, k_descale, v_descale)
    run(p, Attention(softmax_scale, causal, tuple(window), softcap), quant.OutputFormat.decode(
        out, output_scale, output_block_scale, fmt), out, lse, Plan.decode(plan_))


@_fwd_op.register_fake
def _(q, k, v, out, lse, output_scale, output_block_scale, block_table, cu_seqlens_q, cu_seqlens_k, seqused_k, sinks,
      q_descale, k_descale, v_descale, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, causal, window, plan_,
      fmt):
    return None


def merge(prefix_out, prefix_lse, suffix_out, suffix_lse, out, lse, fmt: quant.OutputFormat) -> None:
    """merge_attn_states' run, eagerly or through the registered op."""
    if torch.compiler.is_compiling():
        torch.ops.attnquant.merge(prefix_out, prefix_lse, suffix_out, suffix_lse, out, lse, fmt.scale,
                                  fmt.block_scale, fmt.encode())
    else:
        _merge(prefix_out, prefix_lse, suffix_out, suffix_lse, out, lse, fmt)


def _merge(prefix_out, prefix_lse, suffix_out, suffix_lse, out, lse, fmt):
    t, h, dv = prefix_out.shape
    out = _nvfp4_prologue(fmt, out, t, h, dv)
    # vLLM's layout: outputs (T, H, Dv), LSEs (H, T); as partials: (partial, token, head) strides
    parts = Partials(prefix_out, (0, prefix_out.stride(0), prefix_out.stride(1)), prefix_lse,
                     (0, prefix_lse.stride(1), prefix_lse.stride(0)))
    suffix = Partials(suffix_out, (0, suffix_out.stride(0), suffix_out.stride(1)), suffix_lse,
                      (0, suffix_lse.stride(1), suffix_lse.stride(0)))
    lse_strides = (0, lse.stride(1), lse.stride(0)) if lse is not None else (0, 0, 0)
    with on_device(out.device):
        launch_combine(parts, suffix, out, (0, out.stride(0), out.stride(1)), lse, lse_strides, t, h, max(t, 1), dv,
                       fmt, None, interpreting())


@torch.library.custom_op("attnquant::merge", mutates_args=("out", "lse", "output_block_scale"))
def _merge_op(prefix_out: torch.Tensor, prefix_lse: torch.Tensor, suffix_out: torch.Tensor, suffix_lse: torch.Tensor,
              out: torch.Tensor, lse: Optional[torch.Tensor], output_scale: Optional[torch.Tensor],
              output_block_scale: Optional[torch.Tensor], fmt: List[int]) -> None:
    _merge(prefix_out, prefix_lse, suffix_out, suffix_lse, out, lse,
           quant.OutputFormat.decode(out, output_scale, output_block_scale, fmt))


@_merge_op.register_fake
def _(prefix_out, prefix_lse, suffix_out, suffix_lse, out, lse, output_scale, output_block_scale, fmt):
    return None
