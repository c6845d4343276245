"""Host side of the Hopper fast path: which calls it takes, the descriptors, the launch.

The Gluon kernel (kernel.py) reads Q/K/V through TMA descriptors over 2-D views
(tokens, heads * head_dim), so it needs heads packed next to each other in memory and
(batched inputs) batches that follow each other. Everything it does not take goes to
the portable kernel: decode-sized query tiles, paged / seqused caches, windows,
softcap, forced splits, FP8 inputs, other GPUs and the CPU interpreter. Its configuration
and schedule arithmetic are in config.py.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ...problem import Attention, Problem, lse_strides, token_strides
from ..constants import LOG2E, WG_ROWS
from ..device import is_sm90, num_sms
from ..epilogue import constexprs as epilogue_constexprs
from ..launcher import RECORDERS, Launches, owned
from ..portable.config import split_head_dim
from .config import SMEM_LIMIT, WsConfig, _smem_bytes, head_dims_supported, schedule, staging_fits, ws_config

def _views_ok(t: torch.Tensor, varlen: bool) -> bool:
    """t (B, S, Hx, Dx) or (T, Hx, Dx) reads as a 2-D (tokens, Hx * Dx) matrix for TMA."""
    shape, stride = t.shape, t.stride()  # (one call each: this runs on every eager call)
    tok_stride = stride[-3]
    if stride[-1] != 1 or stride[-2] != shape[-1] or (tok_stride * t.dtype.itemsize) % 16:
        return False
    if tok_stride < shape[-2] * shape[-1]:
        return False
    # The 16-byte aligned base is checked where pointers exist: here eagerly, and in the op
    # (aligned_for_tma) under torch.compile, whose tensors are fake while it traces.
    if not torch.compiler.is_compiling() and t.data_ptr() % 16:
        return False
    return varlen or shape[0] == 1 or stride[0] == shape[1] * tok_stride


def aligned_for_tma(*tensors) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def unsupported_reason(p: Problem, attn: Attention, num_splits: int, interpret: bool) -> Optional[str]:
    """Why the Gluon path cannot run this call (None: it can)."""
    q = p.q
    if interpret or q.device.type != "cuda":
        return "it needs a CUDA device (not the interpreter)"
    if not is_sm90(q.device.index if q.device.index is not None else torch.cuda.current_device()):
        return "it needs an sm_90 (Hopper) GPU"
    if q.dtype not in (torch.float16, torch.bfloat16) or p.fp8_kv:
        return f"inputs are {q.dtype} / {p.k.dtype}, not fp16/bf16 (FP8 inputs run on the portable kernel)"
    if p.paged or p.seqused_k is not None:
        return "paged or seqused_k key lengths are not supported"
    if attn.windowed or attn.softcap > 0:
        return "sliding windows and softcap are not supported"
    if num_splits > 1:
        return "split-KV is not supported"
    if p.max_seqlen_k == 0 or p.k.numel() == 0:
        return "there are no keys (a TMA descriptor needs at least one row)"
    dv = p.head_dim_v
    if not head_dims_supported(p.head_dim, dv):
        return f"head dims {p.head_dim}/{dv} are not supported (need D = 2^a [+ 2^b] >= 32, Dv = 2^c, <= 256)"
    cfg = ws_config(p.head_dim, dv)
    if _smem_bytes(p.head_dim, dv, cfg.block_n, cfg.num_stages, block_m=cfg.block_m) > SMEM_LIMIT:
        return "the tiles do not fit in shared memory"
    for name, t in (("q", p.q), ("k", p.k), ("v", p.v)):
        if not _views_ok(t, p.varlen):
            return f"{name}'s layout cannot be read through a 2-D TMA view (heads must be contiguous)"
    return None


def tma_store_applies(p, cfg: WsConfig, out: torch.Tensor) -> bool:
    """The TMA-store epilogue: wanted, room for it, and `out` readable as a 2-D
    (tokens, heads * Dv) view."""
    return (cfg.tma_store and out.dtype in _GL_DTYPES and staging_fits(p.head_dim, p.head_dim_v, cfg, out_row_bytes(out, p))
            and _views_ok(out, p.varlen))


def out_row_bytes(out: torch.Tensor, p) -> int:
    """Bytes of one output row of one head: Dv elements, or NVFP4's Dv / 2 code bytes (uint8)."""
    return p.head_dim_v // 2 if out.dtype == torch.uint8 else p.head_dim_v * out.element_size()


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float8_e4m3fn: "float8e4nv",
              torch.float8_e5m2: "float8e5", torch.uint8: "uint8"}  # (uint8: NVFP4's packed codes)


@functools.lru_cache(maxsize=None)
def _smem_layout(block_shape, dtype):
    from triton.experimental.gluon import language as gl
    return gl.NVMMASharedLayout.get_default_for(list(block_shape), getattr(gl, _GL_DTYPES[dtype]))


class _Address:
    """What a cached TMA descriptor keeps of its tensor: the address and the dtype (the
    launcher reads base.data_ptr()), so the cache holds no tensor alive."""
    __slots__ = ("ptr", "dtype")

    def __init__(self, ptr, dtype):
        self.ptr, self.dtype = ptr, dtype

    def data_ptr(self):
        return self.ptr


def _descriptor(t: torch.Tensor, block_rows: int, cols: int, col_block: int, cached: bool = False):
    """TMA descriptor over t as a (tokens, cols = heads * head_dim) matrix; `cached`: from a
    cache keyed on everything the descriptor encodes (address, dtype, shape, row stride, block),
    for the direct launch path (Triton's JIT binder gets descriptors of the tensor itself)."""
    shape = t.shape
    rows = shape[0] * shape[1] if len(shape) == 4 else shape[0]
    if cached:
        return _cached_descriptor(t.data_ptr(), t.dtype, rows, cols, t.stride(-3), block_rows, col_block)
    return _make_descriptor(t, rows, cols, t.stride(-3), block_rows, col_block)


def _make_descriptor(base, rows, cols, row_stride, block_rows, col_block):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    block = (block_rows, col_block)
    return TensorDescriptor(base, [rows, cols], [row_stride, 1], list(block), _smem_layout(block, base.dtype))


@functools.lru_cache(maxsize=256)
def _cached_descriptor(ptr, dtype, rows, cols, row_stride, block_rows, col_block):
    return _make_descriptor(_Address(ptr, dtype), rows, cols, row_stride, block_rows, col_block)


def descriptor_params(desc) -> tuple:
    """What a descriptor encodes besides its address: its dtype, (rows, cols), row stride and
    block, as rebased() takes them (a plan keeps these, not the tensor)."""
    (rows, cols), (row_stride, _), (block_rows, col_block) = desc.shape, desc.strides, desc.block_shape
    return desc.base.dtype, rows, cols, row_stride, block_rows, col_block


def rebased(params: tuple, ptr: int):
    """The descriptor of descriptor_params `params` over the tensor at `ptr` (a plan's replay:
    attnquant/replay.py)."""
    dtype, rows, cols, row_stride, block_rows, col_block = params
    return _cached_descriptor(ptr, dtype, rows, cols, row_stride, block_rows, col_block)


def launch(p: Problem, attn: Attention, fmt, out: torch.Tensor, lse: Optional[torch.Tensor],
           cfg: Optional[WsConfig] = None):
    """Run the Gluon kernel on `p`: with `cfg`, or the config the problem gets (config.schedule),
    one CTA per SM (persistent) or per tile."""
    dev = p.q.device.index if p.q.device.index is not None else torch.cuda.current_device()
    sched = schedule(p, cfg or ws_config(p.head_dim, p.head_dim_v), attn.causal, num_sms(dev))
    cfg = sched.cfg
    da, db = split_head_dim(p.head_dim)
    tma_store = tma_store_applies(p, cfg, out)
    maxnreg, consumer_regs = cfg.registers()
    slots = sched.partial_slots
    epilogue = epilogue_constexprs(fmt, False)
    dummy = out
    stream = torch.cuda.current_stream(dev)
    pointers = (out, lse if lse is not None else dummy, fmt.scale if fmt.scale is not None else dummy,
                fmt.block_scale if fmt.block_scale is not None else dummy,
                p.cu_seqlens_q if p.varlen else dummy, p.cu_seqlens_k if p.varlen else dummy,
                owned(workspace(p.q.device, stream, 1 + slots)),
                owned(torch.empty(slots * WG_ROWS * (p.head_dim_v + 2), dtype=torch.float32, device=p.q.device))
                if slots else dummy, p.sinks if p.sinks is not None else dummy)
    lb, lh, ls = lse_strides(lse, p.varlen)
    ints = (*token_strides(out, p.varlen), lb, lh, ls, *fmt.block_scale_strides,
            p.sinks.stride(0) if p.sinks is not None else 0,
            p.max_seqlen_q, p.max_seqlen_k, p.batch, p.num_heads, sched.section, sched.split_from, sched.parts)
    constexprs = dict(
        GROUP=p.group, DA=da, DB=db, DV=p.head_dim_v,
        BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages, NUM_CONSUMERS=cfg.consumers, VARLEN=p.varlen,
        CAUSAL=attn.causal, PINGPONG=cfg.pingpong, STORE_LSE=lse is not None, HAS_SINKS=p.sinks is not None,
        OUT_KIND=epilogue["OUT_KIND"], FP8_MAX=epilogue["FP8_MAX"], GROUP_SIZE=epilogue["GROUP_SIZE"],
        UE8M0=epilogue["UE8M0"], TMA_STORE=tma_store, CONSUMER_REGS=consumer_regs,
        PRODUCER_REGS=cfg.producer_regs, LAZY_RESCALE=cfg.lazy_rescale,
        INTRA_OVERLAP=cfg.intra_overlap, SPLIT_TAIL=sched.parts > 1)
    # the key covers q's dtype (the descriptors': their blocks follow from the constexprs), the
    # pointers and the ints; on a hit the descriptors come from the cache (launcher.py)
    options = dict(num_warps=4, maxnreg=maxnreg)
    launches = _launches()
    key = launches.key(dev, (p.q, *pointers, *ints), constexprs, options)
    hit = key in launches
    hd, hkv_d, hkv_dv = p.num_heads * p.head_dim, p.num_heads_kv * p.head_dim, p.num_heads_kv * p.head_dim_v
    q_desc = _descriptor(p.q, WG_ROWS, hd, da, hit)
    k_desc = _descriptor(p.k, cfg.block_n, hkv_d, da, hit)
    qb_desc = _descriptor(p.q, WG_ROWS, hd, db, hit) if db else q_desc
    kb_desc = _descriptor(p.k, cfg.block_n, hkv_d, db, hit) if db else k_desc
    v_desc = _descriptor(p.v, cfg.block_n, hkv_dv, p.head_dim_v, hit)
    o_cols = out_row_bytes(out, p) // out.element_size()  # (NVFP4: two codes a byte)
    o_desc = _descriptor(out, WG_ROWS, p.num_heads * o_cols, o_cols, hit) if tma_store else v_desc
    args = (q_desc, qb_desc, k_desc, kb_desc, v_desc, o_desc, *pointers, *ints, attn.softmax_scale * LOG2E)
    launches.run(key, (sched.grid,), args, constexprs, options)


def workspace(device, stream, size: int):
    """int32 zeros for the unit counter (pipeline.producer) and the partial results' flags
    ([1 + slot]), which the kernel leaves zero again: one buffer per (device, stream), grown as
    needed, so that a call launches no fill kernel ahead of the attention kernel (~2 µs of GPU
    time each). Calls on one stream run in order; during a CUDA graph capture each call gets a
    buffer of its own (a memset in the graph, as the allocator keeps it for the graph), and so
    does a plan being made (attnquant.plan: its replays may run on another stream than the one
    this buffer serves)."""
    if RECORDERS or torch.cuda.is_current_stream_capturing():
        return torch.zeros(size, dtype=torch.int32, device=device)
    key = (device, stream.cuda_stream)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < size:
        buf = _WORKSPACES[key] = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    return buf


_WORKSPACES = {}

# The compiled kernels by launch key. Triton's JIT dispatch (binding ~50 arguments, computing
# their specialization, looking up its cache) and building six TMA descriptors cost ~150 us
# of host time per call, the whole call ~370 us: more than the GPU time of a 4k-token
# prefill, so the eager call was launch-bound. A call whose key was seen launches the
# CompiledKernel directly, with cached descriptors.
_LAUNCHES = []


def _launches() -> Launches:
    if not _LAUNCHES:  # (the Gluon kernel is imported on the first launch, not with the package)
        from .kernel import attn_fwd_ws_kernel
        _LAUNCHES.append(Launches(attn_fwd_ws_kernel))
    return _LAUNCHES[0]
