"""The Hopper kernel's configuration and schedule arithmetic (pure Python: the planner and the
tests read it on any machine): WsConfig, the config a problem gets, the shared-memory budget,
the last wave's split and the L2 sections of the persistent schedule."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

from ..constants import WG_ROWS
from ..portable.config import cdiv, split_head_dim

# Shared memory: the K/V stages are chosen to fit SMEM_LIMIT; the output staging buffer of the
# TMA-store epilogue may then use the headroom up to SMEM_MAX (H100's opt-in maximum, 227 KB,
# less room for the barriers and the tile-id ring: 512 B in the compiled kernels).
SMEM_MAX = 227 * 1024 - 2 * 1024
SMEM_LIMIT = 227 * 1024 - 8 * 1024
# K/V bytes of the heads one L2 section of the persistent schedule covers (scheduler._tile_coords):
# the CTAs in flight span about two sections, and H100's L2 is 50 MB.
L2_SECTION_BYTES = 16 << 20
# Per query row, the 3-consumer kernel with serial 128-key blocks took this fraction of the
# default kernel's time on non-causal d=128 shapes whose CTAs get equal shares of whole tiles:
# its 192-row tiles read K/V once per 3 warpgroups, whose GEMMs queue on the tensor cores while
# the others' softmaxes run.
SERIAL3_ROW_TIME = 0.965
# The most parts a split tile of the last wave is cut into (tail_split)
MAX_SPLIT = 8


@dataclass(frozen=True)
class WsConfig:
    block_n: int
    num_stages: int
    pingpong: bool = False
    # one CTA per SM taking tiles as it frees up (scheduler._tile_coords); False: one CTA per tile
    persistent: bool = True
    # 64-row consumer warpgroups per tile: 2 (FA3's 128-row tiles) or 3 (192 rows; a thread then
    # has 160 registers: 64-key blocks, or 128 without intra-warpgroup overlap)
    consumers: int = 2
    # non-causal calls switch to 3 consumers with serial 128-key blocks where the wave count
    # says it is faster (for_problem)
    auto_consumers: bool = True
    producer_regs: int = 24
    # epilogue through shared memory and a TMA store where the staging buffer fits (full 64-row
    # tiles; a tile cut by its sequence's end stores from registers); False: registers always
    tma_store: bool = True
    # FA4's conditional O rescale (softmax.softmax_step): the running max moves only by more
    # than 2^8, and a warp whose rows all kept theirs skips O *= alpha (2-6 %
    # faster on the d=128 shapes)
    lazy_rescale: bool = True
    # FA3's intra-warpgroup overlap (QK^T of block j with the softmax of j - 1's PV); False: each
    # block's GEMMs waited for in turn (consumer.serial_block), for 3 consumers with 128-key blocks
    intra_overlap: bool = True
    # non-causal, non-varlen persistent calls: the last wave's tiles split along the keys over the
    # CTAs the wave leaves idle, and merged in the kernel (tail_split)
    split_tail: bool = True
    # persistent CTAs: 0 = one per SM; tests set a few to make each CTA walk many tiles
    ctas: int = 0
    # K/V bytes of the heads one L2 section of the persistent schedule covers (l2_section)
    l2_section_bytes: int = L2_SECTION_BYTES

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
    (within noise of the free-running warpgroups on the benchmark shapes)."""
    block_n = block_n or (128 if max(head_dim, head_dim_v) <= 192 and consumers == 2 else 64)
    for stages in (4, 3, 2):
        if _smem_bytes(head_dim, head_dim_v, block_n, stages, block_m=consumers * WG_ROWS) <= SMEM_LIMIT:
            return WsConfig(block_n, stages, consumers=consumers)
    return WsConfig(block_n, 1, consumers=consumers)


def for_problem(cfg: WsConfig, p, causal: bool, sms: int) -> WsConfig:
    """cfg, or three consumers with serial 128-key blocks (cfg's other options kept) for a
    non-causal batched call with head dims <= 128 whose time in whole-tile waves is lower that
    way: a CTA's time is its share of whole tiles, ceil(tiles / SMs) of them, and a 192-row tile
    costs 1.5 x SERIAL3_ROW_TIME of a 128-row one, the last wave cut short where its tiles are
    split (waves). (The waves decide: at B=1, H=32, 8k, 11 waves of 192 rows against 16 of 128
    read even; with the last wave split, 10 1/2 against 16.)"""
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
    kernel merges them (consumer.Splits.merge). (tiles, 1): nothing split."""
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
    stages = ws_config(d, dv, 128, consumers=3).num_stages
    return replace(cfg, consumers=3, block_n=128, num_stages=stages, intra_overlap=False, auto_consumers=False)


def _smem_bytes(d, dv, block_n, stages, elem=2, block_m=2 * WG_ROWS):
    return elem * (block_m * d + stages * block_n * (d + dv))


def staging_fits(d: int, dv: int, cfg: WsConfig, out_row_bytes: int) -> bool:
    """Room for the TMA-store epilogue's block_m output rows (out_row_bytes each) next to Q and the
    K/V ring."""
    return (_smem_bytes(d, dv, cfg.block_n, cfg.num_stages, block_m=cfg.block_m) + cfg.block_m * out_row_bytes
            <= SMEM_MAX)


def head_dims_supported(d: int, dv: int) -> bool:
    """D = DA [+ DB] (split_head_dim: TMA tiles are powers of two) with both parts >= 32; Dv a
    power of two in [32, 256] (it is one TMA tile and one wgmma N)."""
    parts = split_head_dim(d)
    return parts is not None and min(x for x in parts if x) >= 32 and 32 <= dv <= 256 and dv & (dv - 1) == 0


def l2_section(p, section_bytes: int = L2_SECTION_BYTES) -> int:
    """Batch*heads per section of the tile order: whole KV-head groups whose K/V
    (max_seqlen_k keys) fit in section_bytes, at least one group."""
    kv_head_bytes = max(p.max_seqlen_k, 1) * (p.head_dim + p.head_dim_v) * p.k.element_size()
    return min(max(section_bytes // kv_head_bytes, 1) * p.group, p.batch * p.num_heads)


@dataclass(frozen=True)
class Schedule:
    """Where one call's work runs on the persistent grid (scheduler._tile_work): `num_tiles` tiles
    of cfg.block_m query rows, the tiles from `split_from` on each cut into `parts` units over
    shares of the keys, on `grid` CTAs, in L2 sections of `section` batch*heads."""

    cfg: WsConfig
    num_tiles: int
    grid: int
    split_from: int
    parts: int
    section: int

    @property
    def partial_slots(self) -> int:
        """Workspace slots for the split tiles' partial results (all parts but the last, per
        consumer warpgroup)."""
        return (self.num_tiles - self.split_from) * (self.parts - 1) * self.cfg.consumers


def schedule(p, cfg: WsConfig, causal: bool, sms: int) -> Schedule:
    """The config (for_problem), grid and last-wave split for problem `p` on `sms` SMs (or
    cfg.ctas, when set)."""
    ctas = cfg.ctas or sms
    cfg = for_problem(cfg, p, causal, ctas)
    num_tiles = cdiv(max(p.max_seqlen_q, 1), cfg.block_m) * p.batch * p.num_heads
    grid = min(num_tiles, ctas) if cfg.persistent else num_tiles
    split_from, parts = num_tiles, 1
    if cfg.split_tail and cfg.persistent and not causal and not p.varlen:
        split_from, parts = tail_split(num_tiles, ctas, cdiv(max(p.max_seqlen_k, 1), cfg.block_n))
        grid = min(ctas, num_tiles + (num_tiles - split_from) * (parts - 1))
    return Schedule(cfg, num_tiles, grid, split_from, parts, l2_section(p, cfg.l2_section_bytes))
