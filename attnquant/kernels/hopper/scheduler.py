"""The persistent schedule, shared by the producer and the consumers: which work unit is which
tile, where that tile reads and which key blocks it walks (`Schedule.tile`), and the
hand-off of unit ids from the producer to the consumers (`TileIds`).

Units run in the order the host planned (config.schedule): CTAs take them as they free up,
from their program id on and then from a global counter (the producer's loop, pipeline.py).
Tiles are numbered in L2 sections of `section` batch*heads whose K/V stay in L2 together,
longest first within a section; with SPLIT_TAIL the last wave's tiles come as several units
each, over shares of their key blocks (merged by the tile's last part, consumer.py).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ..record import record

# Hardware named barriers (ids Triton's own partition barriers do not use: it takes 0-3 here).
# The consumers' ping-pong (FA3's warp-scheduler barriers): 2 x 128 threads each.
PINGPONG_BARRIER0 = gl.constexpr(8)
# The tile-id hand-off, per consumer warpgroup w: TILE_FULL0 + w (the producer has written the
# next id) and TILE_EMPTY0 + w (warpgroup w has read it), each the producer warp + 128 threads.
TILE_FULL0 = gl.constexpr(10)
TILE_EMPTY0 = gl.constexpr(13)
TILE_BARRIER_THREADS = gl.constexpr(32 + 128)


@gluon.jit
def named_barrier(bar_id: gl.constexpr, ARRIVE: gl.constexpr, THREADS: gl.constexpr = 256):
    """bar.sync (wait until THREADS threads have arrived, this one included) or bar.arrive
    (count this one and go on) on hardware named barrier `bar_id`. Gluon 3.6 has no named
    barriers and its mbarrier ping-pong measured slower (an arrive there costs a warpgroup
    bar.sync, a wait a try-wait loop); these need no shared-memory address, so inline asm can
    issue them. Every thread of the calling partition executes it."""
    op: gl.constexpr = "bar.arrive" if ARRIVE else "bar.sync"
    gl.inline_asm_elementwise(f"{op} {bar_id}, {THREADS};\n mov.u32 $0, $1;", "=r,r", [gl.to_tensor(0)],
                              dtype=gl.int32, is_pure=False, pack=1)


@record
class Tile:
    """One work unit's tile: (b, h); its first query token (varlen), the rows of its Q and of its
    KV head's K/V in the 2-D (tokens, heads * dim) TMA views; the sequence lengths; m0, its first
    query row within the sequence; the key blocks [j_lo, j_hi) it walks, unmasked below n_full;
    and which part of a split tile it is (part of parts; split_idx numbers the split tiles)."""

    b: gl.tensor
    h: gl.tensor
    q_tok0: gl.tensor
    q_row: gl.tensor
    k_row: gl.tensor
    seqlen_q: gl.tensor
    seqlen_k: gl.tensor
    m0: gl.tensor
    j_lo: gl.tensor
    j_hi: gl.tensor
    n_full: gl.tensor
    part: gl.tensor
    parts: gl.tensor
    split_idx: gl.tensor


@record
class Schedule:
    """This CTA's view of the grid's work: its program id, the CTA count, the units (tiles, and
    the split tiles' extra parts), the tile space (query tiles x batch*heads), the L2 section,
    the split (units from split_from on: split_parts a tile), and what a tile's extent needs."""

    pid: gl.tensor
    nprog: gl.tensor
    num_units: gl.tensor
    num_m: gl.tensor
    num_bh: gl.tensor
    section: gl.tensor
    split_from: gl.tensor
    split_parts: gl.tensor
    num_heads: gl.tensor
    seqlen_q: gl.tensor
    seqlen_k: gl.tensor
    CuSeqlensQ: gl.tensor
    CuSeqlensK: gl.tensor

    @gluon.jit
    def tile(self, unit, cfg):
        """Work unit `unit`: its Tile."""
        tile, part, parts, split_idx = _tile_work(unit, self.split_from, self.split_parts, cfg.SPLIT_TAIL)
        pid_m, bh = _tile_coords(tile, self.num_m, self.num_bh, self.section)
        b, h, q_tok0, q_row, k_row, sq, sk, m0, n_blocks, n_full = _tile_extent(
            pid_m, bh, self.num_heads, self.seqlen_q, self.seqlen_k, self.CuSeqlensQ, self.CuSeqlensK, cfg.BLOCK_M,
            cfg.BLOCK_N, cfg.VARLEN, cfg.CAUSAL)
        j_lo, j_hi, n_full = _key_range(part, parts, n_blocks, n_full, cfg.SPLIT_TAIL)
        return Tile(b, h, gl.to_tensor(q_tok0), q_row, k_row, sq, sk, m0, gl.to_tensor(j_lo), j_hi, n_full,
                    gl.to_tensor(part), gl.to_tensor(parts), gl.to_tensor(split_idx))


@gluon.jit
def _tile_coords(t, num_m, num_bh, section):
    """Tile t of the schedule: (query tile, batch*head). Tiles are numbered in sections of
    `section` consecutive batch*heads (sized on the host so that their K/V fit in L2);
    inside a section the last query tile of every head comes first (causal: the longest),
    then the one before it, and so on. CTAs take tiles in this order as they free up
    (pipeline.producer), so the longest go first and the short ones fill the end."""
    sec_tiles = section * num_m
    sec = t // sec_tiles
    rem = t - sec * sec_tiles
    width = gl.minimum(section, num_bh - sec * section)
    return num_m - 1 - rem // width, sec * section + rem % width


@gluon.jit
def _tile_work(unit, split_from, split_parts, SPLIT_TAIL: gl.constexpr):
    """Work unit `unit` of the schedule: (tile, part, parts, split index). Units below split_from
    are whole tiles (part 0 of 1); with SPLIT_TAIL each tile from split_from on (the last wave's,
    on a grid whose tiles all cost the same) comes as split_parts consecutive units, part p
    walking the p-th share of its key blocks (_key_range), and split index = tile - split_from."""
    if SPLIT_TAIL:
        s = gl.maximum(unit - split_from, 0)
        idx = s // split_parts
        return unit - s + idx, s - idx * split_parts, gl.where(unit < split_from, 1, split_parts), idx
    else:
        return unit, 0, 1, 0


@gluon.jit
def _key_range(part, parts, n_blocks, n_full, SPLIT_TAIL: gl.constexpr):
    """Key blocks [j_lo, j_hi) of the tile's [0, n_blocks) that part `part` of `parts` walks, and
    n_full clamped into that range (blocks below it unmasked)."""
    if SPLIT_TAIL:
        j_lo = part * n_blocks // parts
        j_hi = (part + 1) * n_blocks // parts
        return j_lo, j_hi, gl.minimum(gl.maximum(n_full, j_lo), j_hi)
    else:
        return 0, n_blocks, n_full


@gluon.jit
def _tile_extent(pid_m, bh, num_heads, seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, VARLEN: gl.constexpr, CAUSAL: gl.constexpr):
    """Where tile (pid_m, bh) reads and what it walks: (b, h, first query token, Q row and
    K row of the 2-D (tokens, heads * dim) views, seqlen_q, seqlen_k, m0, n_blocks, n_full).
    Key blocks [0, n_blocks) are walked, fully visible below n_full; at least one block
    (fully masked when there is no key) so the pipeline needs no empty-range case. A
    varlen tile past its sequence's end has m0 >= seqlen_q: the caller skips it."""
    b = bh // num_heads
    h = bh % num_heads
    if VARLEN:
        q_tok0 = gl.load(CuSeqlensQ + b)
        seqlen_q = gl.load(CuSeqlensQ + b + 1) - q_tok0
        k_row = gl.load(CuSeqlensK + b)
        seqlen_k = gl.load(CuSeqlensK + b + 1) - k_row
        q_row = q_tok0
    else:
        q_tok0 = 0
        q_row = b * seqlen_q
        k_row = b * seqlen_k
    m0 = pid_m * BLOCK_M
    diag = seqlen_k - seqlen_q
    hi = seqlen_k
    visible = seqlen_k
    if CAUSAL:
        hi = gl.minimum(gl.maximum(m0 + BLOCK_M + diag, 0), seqlen_k)
        visible = gl.minimum(gl.maximum(m0 + 1 + diag, 0), seqlen_k)
    n_blocks = gl.maximum(gl.cdiv(hi, BLOCK_N), 1)
    n_full = visible // BLOCK_N
    return b, h, q_tok0, q_row + m0, k_row, seqlen_q, seqlen_k, m0, n_blocks, n_full


# The tile-id hand-off (FA3's dynamic scheduler): one shared int32 slot, written by the producer
# warp and read by every consumer thread, ordered by named barriers on both sides (bar.arrive
# orders the arriving thread's earlier accesses before the waiting threads' later ones). With an
# mbarrier, whose arrive one elected thread performs, the other producer lanes' stores and the
# other consumer threads' loads were ordered only through a warp or warpgroup barrier first,
# which compute-sanitizer's racecheck does not follow: it reported hundreds of hazards a call.
# One slot costs no prefetch: the producer can load unit i's Q only once the consumers are done
# with unit i - 1's QK^T, after they have read its id anyway.


@record
class TileIds:
    """The shared slot the producer hands unit ids through (>= num_units: stop)."""

    slot: gl.shared_memory_descriptor

    @gluon.jit
    def publish(self, unit, i, NUM_CONSUMERS: gl.constexpr):
        """Producer: hand unit id `unit` (the i-th of this CTA) to the consumers, once each
        warpgroup has read the previous one."""
        if i > 0:
            for w in gl.static_range(NUM_CONSUMERS):
                named_barrier(TILE_EMPTY0 + w, False, TILE_BARRIER_THREADS)
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        self.slot.store(gl.full([1], unit, gl.int32, layout))
        for w in gl.static_range(NUM_CONSUMERS):
            named_barrier(TILE_FULL0 + w, True, TILE_BARRIER_THREADS)

    @gluon.jit
    def retire(self, NUM_CONSUMERS: gl.constexpr):
        """Producer, after publishing the stop id: wait for its reads, so that every arrive on the
        hand-off barriers meets a sync before the CTA exits."""
        for w in gl.static_range(NUM_CONSUMERS):
            named_barrier(TILE_EMPTY0 + w, False, TILE_BARRIER_THREADS)

    @gluon.jit
    def read(self, WG: gl.constexpr):
        """Consumer warpgroup WG: the next unit id the producer published."""
        named_barrier(TILE_FULL0 + WG, False, TILE_BARRIER_THREADS)
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        unit = gl.max(self.slot.load(layout), 0)
        named_barrier(TILE_EMPTY0 + WG, True, TILE_BARRIER_THREADS)
        return unit
