"""Host side of the Hopper fast path: which calls it takes, its tile config, the launch.

The Gluon kernel (forward.py) reads Q/K/V through TMA descriptors over 2-D views
(tokens, heads * head_dim), so it needs heads packed next to each other in memory and
(batched inputs) batches that follow each other. Everything it does not take goes to
the portable kernel: decode-sized query tiles, paged / seqused caches, windows,
softcap, forced splits, other GPUs and the CPU interpreter.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..config import cdiv, split_head_dim

BACKENDS = ("auto", "gluon", "triton")
BACKEND_ENV = "ATTNQUANT_BACKEND"
LOG2E = 1.4426950408889634
# Shared memory: the K/V stages are chosen to fit SMEM_LIMIT; the output staging buffer of the
# TMA-store epilogue may then use the headroom up to SMEM_MAX (H100's opt-in maximum, 227 KB,
# less room for the barriers and the tile-id ring: 512 B in the compiled kernels).
SMEM_MAX = 227 * 1024 - 2 * 1024
SMEM_LIMIT = 227 * 1024 - 8 * 1024
# K/V bytes of the heads one L2 section of the persistent schedule covers (forward._tile_coords):
# the CTAs in flight span about two sections, and H100's L2 is 50 MB.
L2_SECTION_BYTES = 16 << 20
WG_ROWS = 64  # one consumer warpgroup's query rows (wgmma M): the Q and output TMA blocks
# Per query row, the 3-consumer kernel with serial 128-key blocks took this fraction of the
# default kernel's time on non-causal d=128 shapes whose CTAs get equal shares of whole tiles
# (perf-notes v26): its 192-row tiles read K/V once per 3 warpgroups, whose GEMMs queue on
# the tensor cores while the others' softmaxes run.
SERIAL3_ROW_TIME = 0.965
# The most parts a split tile of the last wave is cut into (tail_split)
MAX_SPLIT = 8


@dataclass(frozen=True)
class WsConfig:
    block_n: int
    num_stages: int
    pingpong: bool = False
    # one CTA per SM taking tiles as it frees up (forward._tile_coords); False: one CTA per tile
    persistent: bool = True
    # 64-row consumer warpgroups per tile: 2 (FA3's 128-row tiles) or 3 (192 rows; a thread then
    # has 160 registers: 64-key blocks, or 128 without intra-warpgroup overlap)
    consumers: int = 2
    # non-causal calls switch to 3 consumers with serial 128-key blocks where the wave count
    # says it is faster (for_problem)
    auto_consumers: bool = True
    producer_regs: int = 24
    # keep ptxas from hoisting the PV wait above the softmax (forward.py); fixes the SASS
    # schedule but measured -2%..+2% by shape (perf-notes v6), so off
    pv_fence: bool = False
    # epilogue through shared memory and a TMA store where the staging buffer fits (full 64-row
    # tiles; a tile cut by its sequence's end stores from registers); False: registers always
    tma_store: bool = True
    # FA4's conditional O rescale (forward._softmax_step): the running max moves only by more
    # than 2^8, and a warp whose rows all kept theirs skips O *= alpha (perf-notes v19: 2-6 %
    # faster on the d=128 shapes)
    lazy_rescale: bool = True
    # FA3's intra-warpgroup overlap (QK^T of block j with the softmax of j - 1's PV); False: each
    # block's GEMMs waited for in turn (forward._serial_block), for 3 consumers with 128-key blocks
    intra_overlap: bool = True
    # non-causal, non-varlen persistent calls: the last wave's tiles split along the keys over the
    # CTAs the wave leaves idle, and merged in the kernel (tail_split)
    split_tail: bool = True
    ablate: int = 0  # measurement variants only (wrong results): 1 no softmax, 2 no PV GEMM
    # measurement only: a zeroed counter per call, i.e. a fill kernel ahead of each launch (before
    # perf-notes v30 every call did that; now the kernel leaves its workspace zero)
    fresh_workspace: bool = False

    @property
    def block_m(self) -> int:
        return self.consumers * WG_ROWS

    def registers(self):
        """(maxnreg at launch, consumer registers a thread): the 64K registers over 4 warps per
        consumer and the producer's warp (padded to a warpgroup), evenly at launch; then the
        producer's warpgroup keeps producer_regs and the consumers share the rest (240 for 2,
        160 for 3; Triton gives the default partition, consumer 0, what the others leave)."""
        threads = 128 * (self.consumers + 1)
        consumer = (65536 - 128 * self.producer_regs) // (128 * self.consumers) // 8 * 8
        return 65536 // threads // 8 * 8, min(consumer, 240)


@functools.lru_cache(maxsize=None)
def ws_config(head_dim: int, head_dim_v: int, block_n: Optional[int] = None, consumers: int = 2) -> WsConfig:
    """128-key blocks (64 past head dim 192, or with 3 consumers; `block_n` overrides, for
    measurements), as many K/V stages as shared memory allows (2-4); no consumer ping-pong
    (within noise of the free-running warpgroups on the benchmark shapes: perf-notes v11, v24)."""
    block_n = block_n or (128 if max(head_dim, head_dim_v) <= 192 and consumers == 2 else 64)
    for stages in (4, 3, 2):
        if _smem_bytes(head_dim, head_dim_v, block_n, stages, block_m=consumers * WG_ROWS) <= SMEM_LIMIT:
            return WsConfig(block_n, stages, consumers=consumers)
    return WsConfig(block_n, 1, consumers=consumers)


_ws_config = ws_config  # (tests and benchmarks replace ws_config; for_problem needs the real one)


def for_problem(cfg: WsConfig, p, causal: bool, sms: int) -> WsConfig:
    """cfg, or three consumers with serial 128-key blocks (cfg's other options kept) for a
    non-causal batched call with head dims <= 128 whose time in whole-tile waves is lower that
    way: a CTA's time is its share of whole tiles, ceil(tiles / SMs) of them, and a 192-row tile
    costs 1.5 x SERIAL3_ROW_TIME of a 128-row one, the last wave cut short where its tiles are
    split (waves). (The waves decide: at B=1, H=32, 8k, 11 waves of 192 rows against 16 of 128
    read even, perf-notes v26; with the last wave split, 10 1/2 against 16.)"""
    d, dv = p.head_dim, p.head_dim_v
    if (causal or p.varlen or not cfg.auto_consumers or cfg.consumers != 2 or cfg.pingpong
            or max(d, dv) > 128):
        return cfg
    n_blocks = cdiv(max(p.max_seqlen_k, 1), 128)

    def wave_rows(block_m):
        tiles = cdiv(max(p.max_seqlen_q, 1), block_m) * p.batch * p.num_heads
        return waves(tiles, sms, n_blocks if cfg.split_tail else 1) * block_m
    if wave_rows(3 * WG_ROWS) * SERIAL3_ROW_TIME >= wave_rows(2 * WG_ROWS):
        return cfg
    return _serial3(cfg, d, dv)


def tail_split(tiles: int, ctas: int, n_blocks: int):
    """(first split tile, parts) for `tiles` tiles of equal cost on `ctas` persistent CTAs: the
    last wave's tiles (the remainder) run as `parts` units each over shares of their n_blocks key
    blocks, as many parts as keep every unit in one wave of the CTAs (at most MAX_SPLIT); the
    kernel merges them (forward._merge_partials). (tiles, 1): nothing split."""
    rem = tiles % ctas
    parts = min(ctas // rem, n_blocks, MAX_SPLIT) if rem else 1
    return (tiles - rem, parts) if parts > 1 else (tiles, 1)


def waves(tiles: int, ctas: int, n_blocks: int) -> float:
    """A CTA's time in tiles under tail_split: the whole waves, and the split last one's part."""
    split_from, parts = tail_split(tiles, ctas, n_blocks)
    return tiles // ctas + (1 / parts if split_from < tiles else tiles % ctas > 0)


@functools.lru_cache(maxsize=None)
def _serial3(cfg: WsConfig, d: int, dv: int) -> WsConfig:
    """cfg with 3 consumers and serial 128-key blocks (cached: launch runs on every eager call)."""
    stages = _ws_config(d, dv, 128, consumers=3).num_stages
    return replace(cfg, consumers=3, block_n=128, num_stages=stages, intra_overlap=False, auto_consumers=False)


def _smem_bytes(d, dv, block_n, stages, elem=2, block_m=2 * WG_ROWS):
    return elem * (block_m * d + stages * block_n * (d + dv))


def staging_fits(d: int, dv: int, cfg: WsConfig, out_elem_bytes: int) -> bool:
    """Room for the TMA-store epilogue's block_m x Dv output tile next to Q and the K/V ring."""
    return (_smem_bytes(d, dv, cfg.block_n, cfg.num_stages, block_m=cfg.block_m) + cfg.block_m * dv * out_elem_bytes
            <= SMEM_MAX)


def tma_store_applies(p, cfg: WsConfig, out: torch.Tensor) -> bool:
    """The TMA-store epilogue: wanted, room for it, and `out` readable as a 2-D
    (tokens, heads * Dv) view."""
    return (cfg.tma_store and out.dtype in _GL_DTYPES and staging_fits(p.head_dim, p.head_dim_v, cfg, out.element_size())
            and _views_ok(out, p.varlen))


def head_dims_supported(d: int, dv: int) -> bool:
    """D = DA [+ DB] (config.split_head_dim: TMA tiles are powers of two) with both parts >= 32;
    Dv a power of two in [32, 256] (it is one TMA tile and one wgmma N)."""
    parts = split_head_dim(d)
    return parts is not None and min(x for x in parts if x) >= 32 and 32 <= dv <= 256 and dv & (dv - 1) == 0


def requested_backend(backend: Optional[str]) -> str:
    """The `backend` argument, else $ATTNQUANT_BACKEND, else 'auto'."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        src = "backend" if backend is not None else BACKEND_ENV
        raise ValueError(f"{src} must be one of {BACKENDS}, got {choice!r}")
    return choice


_SM90 = {}
_NUM_SMS = {}


def _num_sms(device_index: int) -> int:
    if device_index not in _NUM_SMS:
        _NUM_SMS[device_index] = torch.cuda.get_device_properties(device_index).multi_processor_count
    return _NUM_SMS[device_index]


def l2_section(p) -> int:
    """Batch*heads per section of the tile order: whole KV-head groups whose K/V
    (max_seqlen_k keys) fit in L2_SECTION_BYTES, at least one group."""
    group = p.num_heads // p.num_heads_kv
    kv_head_bytes = max(p.max_seqlen_k, 1) * (p.head_dim + p.head_dim_v) * p.k.element_size()
    return min(max(L2_SECTION_BYTES // kv_head_bytes, 1) * group, p.batch * p.num_heads)


def _is_sm90(device_index: int) -> bool:
    """Cached in a plain dict (torch.compile traces a dict lookup; an lru_cache it warns about)."""
    if device_index not in _SM90:
        _SM90[device_index] = torch.cuda.get_device_capability(device_index) == (9, 0)
    return _SM90[device_index]


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


def unsupported_reason(p, causal: bool, window, softcap: float, num_splits: int, interpret: bool) -> Optional[str]:
    """Why the Gluon path cannot run this call (None: it can). `p` is api._Problem."""
    q = p.q
    if interpret or q.device.type != "cuda":
        return "it needs a CUDA device (not the interpreter)"
    if not _is_sm90(q.device.index if q.device.index is not None else torch.cuda.current_device()):
        return "it needs an sm_90 (Hopper) GPU"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"inputs are {q.dtype}, not fp16/bf16"
    if p.block_table is not None or p.seqused_k is not None:
        return "paged or seqused_k key lengths are not supported"
    if window[0] >= 0 or (window[1] >= 0 and not causal) or softcap > 0:
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


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float8_e4m3fn: "float8e4nv",
              torch.float8_e5m2: "float8e5"}


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


def launch(p, fmt, out, lse, causal: bool, softmax_scale: float, epilogue: dict, out_strides, lse_strides):
    """Run the Gluon kernel: one CTA per SM (persistent) or per tile of cfg.block_m query rows."""
    from .forward import attn_fwd_ws_kernel

    dev = p.q.device.index if p.q.device.index is not None else torch.cuda.current_device()
    cfg = for_problem(ws_config(p.head_dim, p.head_dim_v), p, causal, _num_sms(dev))
    da, db = split_head_dim(p.head_dim)
    tma_store = tma_store_applies(p, cfg, out)
    num_tiles = cdiv(max(p.max_seqlen_q, 1), cfg.block_m) * p.batch * p.num_heads
    maxnreg, consumer_regs = cfg.registers()
    sms = _num_sms(dev)
    grid = min(num_tiles, sms) if cfg.persistent else num_tiles
    split_from, parts = num_tiles, 1
    if cfg.split_tail and cfg.persistent and not causal and not p.varlen:
        split_from, parts = tail_split(num_tiles, sms, cdiv(max(p.max_seqlen_k, 1), cfg.block_n))
        grid = min(sms, num_tiles + (num_tiles - split_from) * (parts - 1))
    slots = (num_tiles - split_from) * (parts - 1) * cfg.consumers  # partial results (forward._store_partial)
    dummy = out
    stream = torch.cuda.current_stream(dev)
    pointers = (out, lse if lse is not None else dummy, fmt.scale if fmt.scale is not None else dummy,
                fmt.block_scale if fmt.block_scale is not None else dummy,
                p.cu_seqlens_q if p.varlen else dummy, p.cu_seqlens_k if p.varlen else dummy,
                workspace(p.q.device, stream, 1 + slots, cfg.fresh_workspace),
                torch.empty(slots * WG_ROWS * (p.head_dim_v + 2), dtype=torch.float32, device=p.q.device)
                if slots else dummy)
    ints = (*out_strides, *lse_strides, *fmt.block_scale_strides,
            p.max_seqlen_q, p.max_seqlen_k, p.batch, p.num_heads, l2_section(p), split_from, parts)
    constexprs = dict(
        GROUP=p.num_heads // p.num_heads_kv, DA=da, DB=db, DV=p.head_dim_v,
        BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages, NUM_CONSUMERS=cfg.consumers, VARLEN=p.varlen, CAUSAL=causal,
        PINGPONG=cfg.pingpong, STORE_LSE=lse is not None,
        OUT_KIND=epilogue["OUT_KIND"], FP8_MAX=epilogue["FP8_MAX"], GROUP_SIZE=epilogue["GROUP_SIZE"],
        UE8M0=epilogue["UE8M0"], TMA_STORE=tma_store, CONSUMER_REGS=consumer_regs,
        PRODUCER_REGS=cfg.producer_regs, ABLATE=cfg.ablate, PV_FENCE=cfg.pv_fence, LAZY_RESCALE=cfg.lazy_rescale,
        INTRA_OVERLAP=cfg.intra_overlap, SPLIT_TAIL=parts > 1)
    # What Triton specializes the kernel on (the descriptors: their dtype, q's, and blocks, fixed
    # by the constexprs): pointers' dtype and 16-byte alignment, ints' == 1, % 16, 32-bit range.
    key = (dev, p.q.dtype, *constexprs.values(), *[(t.dtype, t.data_ptr() % 16 == 0) for t in pointers],
           *[(i == 1, i % 16 == 0, -2**31 <= i < 2**31) for i in ints])
    kernel = _COMPILED.get(key)
    hit = kernel is not None
    hd, hkv_d, hkv_dv = p.num_heads * p.head_dim, p.num_heads_kv * p.head_dim, p.num_heads_kv * p.head_dim_v
    q_desc = _descriptor(p.q, WG_ROWS, hd, da, hit)
    k_desc = _descriptor(p.k, cfg.block_n, hkv_d, da, hit)
    qb_desc = _descriptor(p.q, WG_ROWS, hd, db, hit) if db else q_desc
    kb_desc = _descriptor(p.k, cfg.block_n, hkv_d, db, hit) if db else k_desc
    v_desc = _descriptor(p.v, cfg.block_n, hkv_dv, p.head_dim_v, hit)
    o_desc = _descriptor(out, WG_ROWS, p.num_heads * p.head_dim_v, p.head_dim_v, hit) if tma_store else v_desc
    args = (q_desc, qb_desc, k_desc, kb_desc, v_desc, o_desc, *pointers, *ints, softmax_scale * LOG2E)
    if not hit:  # Triton's JIT dispatch: binds, specializes, compiles (once), launches
        assert attn_fwd_ws_kernel.arg_names[len(args):] == list(constexprs)  # (the constexprs come last)
        _COMPILED[key] = attn_fwd_ws_kernel[(grid,)](*args, **constexprs, num_warps=4, maxnreg=maxnreg)
    else:  # the kernel it compiled for this key, launched directly (every parameter, in order)
        kernel[(grid, 1, 1)](*args, *constexprs.values(), stream=stream.cuda_stream)


def workspace(device, stream, size: int, fresh: bool = False):
    """int32 zeros for the unit counter (forward._producer) and the partial results' flags
    ([1 + slot]), which the kernel leaves zero again: one buffer per (device, stream), grown as
    needed, so that a call launches no fill kernel ahead of the attention kernel (~2 µs of GPU
    time each). Calls on one stream run in order; during a CUDA graph capture each call gets a
    buffer of its own (a memset in the graph, as the allocator keeps it for the graph)."""
    if fresh or torch.cuda.is_current_stream_capturing():
        return torch.zeros(size, dtype=torch.int32, device=device)
    key = (device, stream.cuda_stream)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < size:
        buf = _WORKSPACES[key] = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    return buf


_WORKSPACES = {}

# Compiled kernels by launch key. Triton's JIT dispatch (binding ~50 arguments, computing
# their specialization, looking up its cache) and building six TMA descriptors cost ~150 us
# of host time per call on the lent H100's host CPU, the whole call ~370 us: more than the
# GPU time of a 4k-token prefill, so the eager call was launch-bound (perf-notes v20). A call
# whose key was seen launches the CompiledKernel directly, with cached descriptors.
_COMPILED = {}
