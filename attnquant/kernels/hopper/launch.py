"""Host side of the Hopper fast path: which calls it takes, the descriptors, the launch.

The Gluon kernel (forward.py) reads Q/K/V through TMA descriptors over 2-D views
(tokens, heads * head_dim), so it needs heads packed next to each other in memory and
(batched inputs) batches that follow each other. Everything it does not take goes to
the portable kernel: decode-sized query tiles, paged / seqused caches, windows,
softcap, forced splits, FP8 K/V with a 16-bit q, FP8 attention other than batched
D = Dv = 64 / 128, other GPUs and the CPU interpreter. Its configuration and schedule
arithmetic are in config.py.

FP8 attention (q, k, v all e4m3) runs the kernel's FP8 wgmmas, which take both operands
K-major: V (keys x Dv, Dv contiguous) is the PV product's B operand with the keys as K, so the
launcher hands the kernel a transposed copy, V^T (transposed_v). FA3 transposes V on chip
instead, in its producer warps (shared memory to registers and back); the copy here costs one
more pass over V (a read and a write of its bytes: not measured yet).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ...problem import Attention, Problem, descale_strides, lse_strides, token_strides
from ..constants import LOG2E, WG_ROWS
from ..device import is_sm90, num_sms
from ..epilogue import constexprs as epilogue_constexprs
from ..portable.config import cdiv, split_head_dim
from .config import (FP8_HEAD_DIMS, SMEM_LIMIT, WsConfig, _smem_bytes, head_dims_supported, schedule, staging_fits,
                     ws_config)

FP8 = torch.float8_e4m3fn

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
    fp8 = q.dtype == FP8  # (validation: then k and v are FP8 too)
    if q.dtype not in (torch.float16, torch.bfloat16) and not fp8:
        return f"inputs are {q.dtype}, not fp16/bf16/float8_e4m3fn"
    if p.fp8_kv and not fp8:
        return (f"k/v are {p.k.dtype} with a {q.dtype} q: FP8 inputs run on the portable kernel unless q, k and v all "
                "are FP8 (FP8 attention)")
    if fp8 and (p.varlen or p.paged):
        return ("FP8 inputs of a varlen or paged call run on the portable kernel (the Gluon kernel's V^T copy pads "
                "each sequence's keys to a multiple of 16: batched calls only)")
    if fp8 and (p.head_dim, p.head_dim_v) not in FP8_HEAD_DIMS:
        return (f"FP8 inputs with head dims {p.head_dim}/{p.head_dim_v} run on the portable kernel (the Gluon "
                f"kernel's FP8 path takes D/Dv in {FP8_HEAD_DIMS})")
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
    cfg = ws_config(p.head_dim, dv, in_bytes=q.element_size())
    if _smem_bytes(p.head_dim, dv, cfg.block_n, cfg.num_stages, q.element_size(), cfg.block_m) > SMEM_LIMIT:
        return "the tiles do not fit in shared memory"
    for name, t in (("q", p.q), ("k", p.k), ("v", p.v)):
        if not _views_ok(t, p.varlen) and not (fp8 and name == "v"):  # (FP8: V is read from a copy)
            return f"{name}'s layout cannot be read through a 2-D TMA view (heads must be contiguous)"
    return None


def tma_store_applies(p, cfg: WsConfig, out: torch.Tensor) -> bool:
    """The TMA-store epilogue: wanted, room for it, and `out` readable as a 2-D
    (tokens, heads * Dv) view."""
    return (cfg.tma_store and out.dtype in _GL_DTYPES
            and staging_fits(p.head_dim, p.head_dim_v, cfg, out_row_bytes(out, p), p.q.element_size())
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


def _view_descriptor(t: torch.Tensor, rows, cols, row_stride, block_rows, col_block, cached: bool):
    """TMA descriptor over t's storage as a (rows, cols) matrix of row stride row_stride."""
    if cached:
        return _cached_descriptor(t.data_ptr(), t.dtype, rows, cols, row_stride, block_rows, col_block)
    return _make_descriptor(t, rows, cols, row_stride, block_rows, col_block)


def _make_descriptor(base, rows, cols, row_stride, block_rows, col_block):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    block = (block_rows, col_block)
    return TensorDescriptor(base, [rows, cols], [row_stride, 1], list(block), _smem_layout(block, base.dtype))


@functools.lru_cache(maxsize=256)
def _cached_descriptor(ptr, dtype, rows, cols, row_stride, block_rows, col_block):
    return _make_descriptor(_Address(ptr, dtype), rows, cols, row_stride, block_rows, col_block)


# FP8 attention's key order in V^T, within each group of 16 keys: stored column 16c + 4t + 2h + e
# holds key 16c + 8h + 2t + e, the order in which a thread of the kernel's S accumulator holds
# its keys (softmax.fp8_key_order reorders P the same way: the reshape to (2, 4, 2) and the
# swap of the first two axes there and here).
FP8_KEY_GROUP = 16


def transposed_v(v: torch.Tensor) -> torch.Tensor:
    """FP8 attention's V^T: v (B, Sk, Hkv, Dv) e4m3 -> (B, Hkv, Dv, Sk_pad) with the keys
    contiguous, padded with zeros to Sk_pad = Sk rounded up to FP8_KEY_GROUP (the reorder's
    group, and 16-byte rows for TMA) and reordered within each group (FP8_KEY_GROUP above).
    Zero padding: a padded key's P is 0, and 0 x NaN would be NaN. The TMA tiles past Sk_pad
    read zeros. Copies on the device (the uint8 view: every torch copy takes it), no host sync."""
    b, sk, hkv, dv = v.shape
    groups = cdiv(sk, FP8_KEY_GROUP)
    full = sk // FP8_KEY_GROUP
    src = v.view(torch.uint8)
    vt = torch.empty((b, hkv, dv, groups * FP8_KEY_GROUP), dtype=torch.uint8, device=v.device)

    def reorder(keys):  # (B, n * 16, Hkv, Dv) -> (B, Hkv, Dv, n, 4, 2, 2): [.., c, t, h, e] = key 16c + 8h + 2t + e
        return keys.unflatten(1, (-1, 2, 4, 2)).permute(0, 5, 6, 1, 3, 2, 4)
    vt[..., :full * FP8_KEY_GROUP].unflatten(-1, (full, 4, 2, 2)).copy_(reorder(src[:, :full * FP8_KEY_GROUP]))
    if groups > full:  # the last, partial group of keys and its zero padding
        last = torch.zeros((b, FP8_KEY_GROUP, hkv, dv), dtype=torch.uint8, device=v.device)
        last[:, :sk - full * FP8_KEY_GROUP] = src[:, full * FP8_KEY_GROUP:]
        vt[..., full * FP8_KEY_GROUP:].unflatten(-1, (1, 4, 2, 2)).copy_(reorder(last))
    return vt.view(FP8)


def launch(p: Problem, attn: Attention, fmt, out: torch.Tensor, lse: Optional[torch.Tensor],
           cfg: Optional[WsConfig] = None):
    """Run the Gluon kernel on `p`: with `cfg`, or the config the problem gets (config.schedule),
    one CTA per SM (persistent) or per tile."""
    from .kernel import attn_fwd_ws_kernel

    dev = p.q.device.index if p.q.device.index is not None else torch.cuda.current_device()
    fp8 = p.q.dtype == FP8
    sched = schedule(p, cfg or ws_config(p.head_dim, p.head_dim_v, in_bytes=p.q.element_size()), attn.causal,
                     num_sms(dev))
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
                workspace(p.q.device, stream, 1 + slots),
                torch.empty(slots * WG_ROWS * (p.head_dim_v + 2), dtype=torch.float32, device=p.q.device)
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
        INTRA_OVERLAP=cfg.intra_overlap, SPLIT_TAIL=sched.parts > 1, HAS_Q_DESCALE=p.q_descale is not None,
        HAS_K_DESCALE=p.k_descale is not None, HAS_V_DESCALE=p.v_descale is not None)
    # FP8 attention's descales (after qk_scale in the kernel's parameters)
    descales = tuple(d if d is not None else dummy for d in (p.q_descale, p.k_descale, p.v_descale))
    descale_ints = (*descale_strides(p.q_descale), *descale_strides(p.k_descale), *descale_strides(p.v_descale))
    # What Triton specializes the kernel on (the descriptors: their dtype, q's, and blocks, fixed
    # by the constexprs): pointers' dtype and 16-byte alignment, ints' == 1, % 16, 32-bit range.
    key = (dev, p.q.dtype, *constexprs.values(), *[(t.dtype, t.data_ptr() % 16 == 0) for t in pointers + descales],
           *[(i == 1, i % 16 == 0, -2**31 <= i < 2**31) for i in ints + descale_ints])
    kernel = _COMPILED.get(key)
    hit = kernel is not None
    hd, hkv_d, hkv_dv = p.num_heads * p.head_dim, p.num_heads_kv * p.head_dim, p.num_heads_kv * p.head_dim_v
    q_desc = _descriptor(p.q, WG_ROWS, hd, da, hit)
    k_desc = _descriptor(p.k, cfg.block_n, hkv_d, da, hit)
    qb_desc = _descriptor(p.q, WG_ROWS, hd, db, hit) if db else q_desc
    kb_desc = _descriptor(p.k, cfg.block_n, hkv_d, db, hit) if db else k_desc
    if fp8:  # V^T: [Dv, block_n] tiles of (B * Hkv * Dv, padded keys)
        vt = transposed_v(p.v)
        v_desc = _view_descriptor(vt, vt.shape[0] * vt.shape[1] * vt.shape[2], vt.shape[3], vt.shape[3], p.head_dim_v,
                                  cfg.block_n, hit)
    else:
        v_desc = _descriptor(p.v, cfg.block_n, hkv_dv, p.head_dim_v, hit)
    o_cols = out_row_bytes(out, p) // out.element_size()  # (NVFP4: two codes a byte)
    o_desc = _descriptor(out, WG_ROWS, p.num_heads * o_cols, o_cols, hit) if tma_store else v_desc
    args = (q_desc, qb_desc, k_desc, kb_desc, v_desc, o_desc, *pointers, *ints, attn.softmax_scale * LOG2E,
            *descales, *descale_ints)
    if not hit:  # Triton's JIT dispatch: binds, specializes, compiles (once), launches
        assert attn_fwd_ws_kernel.arg_names[len(args):] == list(constexprs)  # (the constexprs come last)
        _COMPILED[key] = attn_fwd_ws_kernel[(sched.grid,)](*args, **constexprs, num_warps=4, maxnreg=maxnreg)
    else:  # the kernel it compiled for this key, launched directly (every parameter, in order)
        kernel[(sched.grid, 1, 1)](*args, *constexprs.values(), stream=stream.cuda_stream)


def workspace(device, stream, size: int):
    """int32 zeros for the unit counter (forward._producer) and the partial results' flags
    ([1 + slot]), which the kernel leaves zero again: one buffer per (device, stream), grown as
    needed, so that a call launches no fill kernel ahead of the attention kernel (~2 µs of GPU
    time each). Calls on one stream run in order; during a CUDA graph capture each call gets a
    buffer of its own (a memset in the graph, as the allocator keeps it for the graph)."""
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(size, dtype=torch.int32, device=device)
    key = (device, stream.cuda_stream)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < size:
        buf = _WORKSPACES[key] = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    return buf


_WORKSPACES = {}

# Compiled kernels by launch key. Triton's JIT dispatch (binding ~50 arguments, computing
# their specialization, looking up its cache) and building six TMA descriptors cost ~150 us
# of host time per call, the whole call ~370 us: more than the GPU time of a 4k-token
# prefill, so the eager call was launch-bound. A call
# whose key was seen launches the CompiledKernel directly, with cached descriptors.
_COMPILED = {}
