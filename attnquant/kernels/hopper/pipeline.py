"""The producer warp and the shared-memory channels it fills: the consumers' Q tiles (`QTiles`)
and the K/V ring (`KVRing`), loaded by TMA and handed over on mbarriers.

The K/V ring runs on across a CTA's tiles: its block counter g (slots g % NUM_STAGES, phases)
counts key blocks over all of them. K_g goes to slot g % NUM_STAGES and V_g to slot
(g + 1) % NUM_STAGES, so that the consumers' one release per block, empty[g % NUM_STAGES]
after block g, frees K_g and V_{g-1} together (Gluon's arrive costs a warpgroup bar.sync: ncu
counted barrier stalls as a third of the consumers' stall cycles with two releases a block).
A fresh mbarrier counts as having completed the phase before 0, so the first waits on an
"empty" barrier (parity 1) pass at once.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from ..constants import WG_ROWS_C as WG_ROWS
from ..record import record


@record
class Loads:
    """The TMA descriptors: Q, K as one or two column tiles (D = DA + DB: 192 = 128 + 64), V."""

    q: tma.tensor_descriptor
    qb: tma.tensor_descriptor
    k: tma.tensor_descriptor
    kb: tma.tensor_descriptor
    v: tma.tensor_descriptor


@record
class QTiles:
    """One 64-row Q tile per consumer warpgroup (and its DB columns): ready[w] completes when
    warpgroup w's has landed, empty[w] when w has issued its last QK^T of the unit."""

    a: gl.shared_memory_descriptor
    b: gl.shared_memory_descriptor
    ready: gl.shared_memory_descriptor
    empty: gl.shared_memory_descriptor


@record
class KVRing:
    """NUM_STAGES slots of a K block (and its DB columns) and a V block, with their ready
    barriers and one release barrier per slot."""

    k: gl.shared_memory_descriptor
    kb: gl.shared_memory_descriptor
    v: gl.shared_memory_descriptor
    k_ready: gl.shared_memory_descriptor
    v_ready: gl.shared_memory_descriptor
    empty: gl.shared_memory_descriptor


@gluon.jit
def load_split(desc_a, desc_b, row, col, bar, smem_a, smem_b, DA: gl.constexpr, DB: gl.constexpr):
    """TMA of a [rows, DA + DB] tile into smem_a (columns col ..) and, when DB > 0, smem_b
    (col + DA ..); `bar` completes when all of it has landed."""
    if DB > 0:
        mbarrier.expect(bar, desc_a.block_type.nbytes + desc_b.block_type.nbytes)
    else:
        mbarrier.expect(bar, desc_a.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_a, [row, col], bar, smem_a)
    if DB > 0:
        tma.async_copy_global_to_shared(desc_b, [row, col + DA], bar, smem_b)


@gluon.jit
def producer(cfg, sched, tile_ids, loads, qs, kv, TileCounter):
    """The producer warp. Picks the CTA's units (its program id first, then one from the shared counter
    each time it has issued a unit's loads: dynamic, longest first) and publishes them to the
    consumers. Per unit: Q once (when the consumers have released the last unit's), then the
    unit's K/V blocks into the ring as slots free up."""
    g = 0  # key blocks loaded so far
    i = 0  # units published (and loaded) so far
    unit = sched.pid
    while unit < sched.num_units:
        t = sched.tile(unit, cfg)
        if t.m0 < t.seqlen_q:  # (varlen: a tile past its sequence's end has no rows and is not published)
            tile_ids.publish(unit, i, cfg.NUM_CONSUMERS)
            q_col = t.h * (cfg.DA + cfg.DB)
            kv_col = (t.h // cfg.GROUP) * (cfg.DA + cfg.DB)
            v_col = (t.h // cfg.GROUP) * cfg.DV
            for w in gl.static_range(cfg.NUM_CONSUMERS):
                mbarrier.wait(qs.empty.index(w), (i & 1) ^ 1)
                load_split(loads.q, loads.qb, t.q_row + w * WG_ROWS, q_col, qs.ready.index(w), qs.a.index(w),
                           qs.b.index(w), cfg.DA, cfg.DB)
            for j in range(t.j_lo, t.j_hi):
                gj = g + j - t.j_lo
                slot = gj % cfg.NUM_STAGES
                mbarrier.wait(kv.empty.index(slot), ((gj // cfg.NUM_STAGES) & 1) ^ 1)  # K_{g-S} released
                load_split(loads.k, loads.kb, t.k_row + j * cfg.BLOCK_N, kv_col, kv.k_ready.index(slot),
                           kv.k.index(slot), kv.kb.index(slot), cfg.DA, cfg.DB)
                v_slot = (gj + 1) % cfg.NUM_STAGES
                mbarrier.wait(kv.empty.index(v_slot), (((gj + 1) // cfg.NUM_STAGES) & 1) ^ 1)  # V_{g-S} released
                mbarrier.expect(kv.v_ready.index(v_slot), loads.v.block_type.nbytes)
                tma.async_copy_global_to_shared(loads.v, [t.k_row + j * cfg.BLOCK_N, v_col], kv.v_ready.index(v_slot),
                                                kv.v.index(v_slot))
            g += t.j_hi - t.j_lo
            i += 1
        fetched = gl.atomic_add(TileCounter, 1)
        unit = sched.nprog + fetched
        # The call's num_units fetches get 0 .. num_units - 1 (every CTA's last fetch fails, one
        # each): the last one leaves the counter at zero for the next call (launch.workspace).
        gl.atomic_xchg(TileCounter, 0, mask=fetched == sched.num_units - 1)
    tile_ids.publish(unit, i, cfg.NUM_CONSUMERS)  # no more units
    tile_ids.retire(cfg.NUM_CONSUMERS)
