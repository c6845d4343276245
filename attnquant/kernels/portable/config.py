"""Tile configurations and the split-KV heuristic.

The numbers come from sweeps on the H100 (tools/ has the sweep; the results and the
reasoning are in docs/perf-notes.md). Under TRITON_INTERPRET the
tiles are tiny so that small test shapes still cross several tiles and exercise
every masked / unmasked stage.
"""

from __future__ import annotations

from dataclasses import dataclass



@dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    block_ptr: bool = False  # K/V through block pointers instead of pointer tensors
    # FP8 K/V: the dots in fp16, which holds every e4m3 value exactly and converts from it in one
    # instruction a pair (bf16 takes three: 30 % fewer instructions in the decode loop, compiled
    # here), a bf16 q scaled into fp16's range by a power of two. Off until the GPU has timed it
    # (tools/lab_bench.py --fp8-kv-sweep): two CTAs an SM at its 207-255 registers, not three.
    f16_dots: bool = False
    # split-KV: the combine launched as a programmatic dependent (PDL) that the forward triggers
    # as it starts, so the combine's launch overlaps the forward instead of following it (in a
    # CUDA graph too). Off until the GPU has timed it (tools/lab_bench.py --sweep).
    pdl: bool = False


def _pow2_le(x: int) -> int:
    return 1 << (x.bit_length() - 1)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of Python ints. (triton.cdiv is a @triton.jit function: called on the
    host it costs ~6 us a call, a fifth of an eager decode call's planning.)"""
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def split_head_dim(d: int):
    """D as BLOCK_DA + BLOCK_DB, both powers of two (BLOCK_DB may be 0), or None.

    192 = 128 + 64 and 96 = 64 + 32 run as two dots instead of one padded to 256/128.
    """
    if d < 16 or d > 256:
        return None
    a = _pow2_le(d)
    b = d - a
    if b == 0:
        return a, 0
    if b >= 16 and b & (b - 1) == 0:
        return a, b
    return None


def forward_config(head_dim: int, head_dim_v: int, rows: int, interpret: bool, page_size: int = 0,
                   kv_bytes: int = 2) -> FwdConfig:
    """Tile shape for the forward kernel; `rows` = max_seqlen_q * (H / Hkv), the packed rows;
    `page_size` is the paged cache's page (0 when K/V are contiguous); `kv_bytes` K/V's element
    size (1: an FP8 cache)."""
    if interpret:  # the decode rule for block pointers, so the CPU tests cover both load paths
        return FwdConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, block_ptr=rows <= 64)
    if rows <= 64:  # decode / short speculative steps: memory-bound, small M tile
        block_m = max(16, next_pow2(rows))
        if head_dim > 128:
            return FwdConfig(block_m, 64, 4, 3, block_ptr=True)
        if page_size >= 64:  # one page per 64-key block (one table lookup); deeper pipeline
            return FwdConfig(block_m, 64, 4, 5, block_ptr=True)
        # An FP8 cache's blocks are half the bytes: two more stages keep as many bytes in flight.
        # But 5 stages take 139 KB of shared memory, one CTA an SM, and the H100 ran this 13-31 %
        # behind the paged page-16 FP8 path (three CTAs an SM). The candidate, 3 stages with
        # splits of 8 key blocks, and fp16 dots wait for tools/lab_bench.py --fp8-kv-sweep.
        return FwdConfig(block_m, 128, 4, 3 if kv_bytes > 1 else 5, block_ptr=True)
    if head_dim <= 192 and head_dim_v <= 128:  # sweep v1: 128x64 beat 128x128 at d=128 and d=192
        return FwdConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return FwdConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)


def num_splits_heuristic(num_tiles: int, max_seqlen_k: int, block_n: int, sms: int,
                         min_blocks_per_split: int = 16) -> int:
    """Split the keys only when the (tile, batch, kv-head) programs leave SMs idle.

    Aim for about two programs per SM, but give each split at least 16 key blocks: on
    the H100, decode_gqa_8k (16 programs before splitting) ran fastest with 4 splits
    of 16 blocks (32 us), slower with 16 splits of 4 (42 us): short splits pay their
    pipeline fill, epilogue and combine traffic without enough loads to hide them.
    Pages smaller than a key block (a per-key table gather) hide their extra latency
    better with more, shorter splits: callers pass min_blocks_per_split=8 there.
    """
    if num_tiles >= sms:
        return 1
    key_blocks = max(1, -(-max_seqlen_k // block_n))
    want = -(-2 * sms // num_tiles)
    return max(1, min(want, key_blocks // min_blocks_per_split, 128))
