"""The consumer warpgroups: each owns 64 query rows of every unit the producer publishes, runs
S = Q K^T and O += P V on wgmma with the online softmax in registers, and writes its rows out.

Inside a unit the key-block loop is software-pipelined the FA3 way (pipelined_block): the
QK^T wgmma of block j is issued first, O's rescale for block j-1 runs under it, then the PV
wgmma of block j-1, and the softmax of block j runs while that PV is still on the tensor
cores. P never leaves registers: it is the A operand of the PV wgmma. With three consumers
the loop may instead run each block's GEMMs in turn (INTRA_OVERLAP off, serial_block): P then
dies inside the step, so 128-key blocks fit the 160 registers a thread has, and the other two
warpgroups keep the tensor cores busy. Across two consumers a named-barrier ping-pong
(PINGPONG, off by default) makes them take turns issuing their QK^T, so that they are never
in lock-step (their softmaxes contending for the MUFU, their GEMMs queued together: measured
10-14 % slower when it happened).

Split tiles (SPLIT_TAIL): each part but the last leaves its (O, max, sum) in a workspace
(`Splits`), flagged with release / acquire; the last part merges them before the epilogue.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from ..constants import WG_ROWS_C as WG_ROWS
from .epilogue import _nan_max, tile_epilogue
from ..record import record
from .scheduler import PINGPONG_BARRIER0, named_barrier
from .softmax import MASK_FROM_N_FULL, rescale_o, softmax_step


@record
class WgRows:
    """What the softmax needs of one warpgroup's 64 rows of a tile: their query positions, the
    key count, the causal diagonal's offset (seqlen_k - seqlen_q), the first masked block, the
    scale (softmax_scale * log2 e), and the zero accumulator the QK^T wgmma starts from."""

    q_pos: gl.tensor
    seqlen_k: gl.tensor
    diag: gl.tensor
    n_full: gl.tensor
    qk_scale: gl.tensor
    s_zero: gl.tensor


@record
class Splits:
    """The split tiles' partial results: a slot of WG_ROWS * (DV + 2) floats per warpgroup and
    part before the last (O's rows, the running maxima, the row sums), and a flag per slot."""

    Partials: gl.tensor
    Flags: gl.tensor

    @gluon.jit
    def store(self, acc, m_i, l_i, slot, DV: gl.constexpr):
        """A split tile's part before the last: its (O unnormalized, max, sum) into slot `slot`,
        then Flags[slot] = 1 (release: after every thread's stores)."""
        o_off, ml_off = _partial_offsets(acc, m_i, DV)
        base = self.Partials + slot.to(gl.int64) * (WG_ROWS * (DV + 2))
        gl.store(base + o_off, acc)
        gl.store(base + ml_off, m_i)
        gl.store(base + ml_off + WG_ROWS, l_i)
        gl.thread_barrier()  # the warpgroup's stores, ordered before the release
        gl.atomic_xchg(self.Flags + slot, 1, sem="release", scope="gpu")

    @gluon.jit
    def merge(self, acc, m_i, l_i, slot0, n_parts, DV: gl.constexpr, NUM_CONSUMERS: gl.constexpr):
        """The last part of a split tile: fold in the n_parts partial results in slots slot0,
        slot0 + NUM_CONSUMERS, .. once each is flagged (acquire; the loads bypass L1, which may
        hold a previous call's lines of the workspace)."""
        o_off, ml_off = _partial_offsets(acc, m_i, DV)
        for p in range(n_parts):
            slot = slot0 + p * NUM_CONSUMERS
            while gl.atomic_add(self.Flags + slot, 0, sem="acquire", scope="gpu") == 0:
                pass
            base = self.Partials + slot.to(gl.int64) * (WG_ROWS * (DV + 2))
            m_p = gl.load(base + ml_off, cache_modifier=".cg")
            l_p = gl.load(base + ml_off + WG_ROWS, cache_modifier=".cg")
            gl.atomic_xchg(self.Flags + slot, 0)  # (read by this part only: cleared for the next call)
            m_new = _nan_max(m_i, m_p)
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            a_own = gl.exp2(m_i - m_use)
            a_p = gl.exp2(m_p - m_use)
            o_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
            acc = (acc * gl.convert_layout(a_own, o_rows)[:, None]
                   + gl.load(base + o_off, cache_modifier=".cg") * gl.convert_layout(a_p, o_rows)[:, None])
            l_i = l_i * a_own + l_p * a_p
            m_i = m_new
        return acc, m_i, l_i


@gluon.jit
def _partial_offsets(acc, m_i, DV: gl.constexpr):
    """Offsets of a partial result inside its slot of WG_ROWS * (DV + 2) floats: O's rows, then
    the running maxima, then the row sums."""
    o_layout: gl.constexpr = acc.type.layout
    rows = gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, DV, layout=gl.SliceLayout(0, o_layout))
    r = gl.arange(0, WG_ROWS, layout=m_i.type.layout)
    return rows[:, None] * DV + cols[None, :], WG_ROWS * DV + r


@gluon.jit
def consumer(args, WG: gl.constexpr):
    """One warpgroup: rows WG*64 .. +64 of each unit the producer publishes, until the stop id.
    args: (KernelConfig, Schedule, TileIds, QTiles, KVRing, Outputs, Splits, qk_scale)."""
    cfg, sched, tile_ids, qs, kv, outs, splits, qk_scale = args
    g = 0  # key blocks consumed so far (the producer's ring counter)
    i = 0  # units done
    if cfg.PINGPONG and WG == 1:  # warpgroup 0 issues first
        named_barrier(PINGPONG_BARRIER0, True)
    unit = tile_ids.read(WG)
    while unit < sched.num_units:
        t = sched.tile(unit, cfg)
        acc, m_i, l_i = consumer_tile(cfg, qs, kv, t, g, i, qk_scale, WG)
        if cfg.SPLIT_TAIL:
            # The last part of a split tile merges the other parts' partial results and writes the
            # output (a whole tile is part 0 of 1: nothing to merge); the parts before it leave
            # theirs in the workspace. (The last part is handed out after the others, which are
            # running or done by then: its wait always ends.)
            slot0 = t.split_idx * (sched.split_parts - 1) * cfg.NUM_CONSUMERS + WG
            if t.part + 1 == t.parts:
                acc, m_i, l_i = splits.merge(acc, m_i, l_i, slot0, t.parts - 1, cfg.DV, cfg.NUM_CONSUMERS)
                tile_epilogue(acc, m_i, l_i, outs, t, cfg, WG)
            else:
                splits.store(acc, m_i, l_i, slot0 + t.part * cfg.NUM_CONSUMERS, cfg.DV)
        else:
            tile_epilogue(acc, m_i, l_i, outs, t, cfg, WG)
        g += t.j_hi - t.j_lo
        i += 1
        unit = tile_ids.read(WG)
    if cfg.PINGPONG and WG == 0:  # warpgroup 1's last arrive: every arrive meets a sync
        named_barrier(PINGPONG_BARRIER0, False)
    if cfg.TMA_STORE:  # the shared memory of the last output tile stays alive until its store has read it
        tma.store_wait(0)


@gluon.jit
def consumer_tile(cfg, qs, kv, t, g0, i, qk_scale, WG: gl.constexpr):
    """One warpgroup's 64 rows of unit i, tile `t`: key blocks [t.j_lo, t.j_hi) (ring blocks
    g0 ..). Returns (O unnormalized, running max in log2 units, row sum)."""
    s_layout: gl.constexpr = cfg.S_LAYOUT
    q_pos = t.m0 + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, s_layout))
    diag = t.seqlen_k - t.seqlen_q
    q = (qs.a.index(WG), qs.b.index(WG))
    s_zero = gl.zeros([WG_ROWS, cfg.BLOCK_N], gl.float32, s_layout)
    m_i = gl.full([WG_ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([WG_ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([WG_ROWS, cfg.DV], gl.float32, cfg.O_LAYOUT)
    rows = WgRows(q_pos, t.seqlen_k, diag, t.n_full, qk_scale, s_zero)
    j_lo, j_hi, n_full = t.j_lo, t.j_hi, t.n_full
    gb = g0 - j_lo  # ring block of key block j: gb + j

    mbarrier.wait(qs.ready.index(WG), i & 1)
    if cfg.INTRA_OVERLAP:
        # Block j_lo: S, its softmax; its PV waits for the loop (pipelined one block behind).
        slot0 = g0 % cfg.NUM_STAGES
        mbarrier.wait(kv.k_ready.index(slot0), (g0 // cfg.NUM_STAGES) & 1)
        if cfg.PINGPONG:
            named_barrier(PINGPONG_BARRIER0 + WG, False)
        s_tok = issue_qk(q, kv, slot0, s_zero, cfg)
        if cfg.PINGPONG:
            named_barrier(PINGPONG_BARRIER0 + 1 - WG, True)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        # K_g0, and V_{g0-1} in the same slot: the previous unit's last block, whose PV is done
        mbarrier.arrive(kv.empty.index(slot0))
        if j_lo < n_full:
            p, m_i, l_i, alpha = softmax_step(s, m_i, l_i, j_lo, rows, cfg, False)
        else:
            p, m_i, l_i, alpha = softmax_step(s, m_i, l_i, j_lo, rows, cfg, True)
        st = (acc, p, m_i, l_i, alpha)
        # Causal: one loop, the mask under a branch. Every causal tile runs its diagonal block, so
        # a masked copy of the loop is instruction-cache working set that each tile fetches again
        # (11 % less code, mla 1-3 % faster). Non-causal: an unmasked loop and a masked one, since
        # only a ragged end of the keys is masked there and the mask's registers stay out of the
        # hot loop (with the last wave split, one loop spills).
        if cfg.CAUSAL:
            LOOP_MASK: gl.constexpr = MASK_FROM_N_FULL
            j_unmasked = j_hi
        else:
            LOOP_MASK: gl.constexpr = False
            j_unmasked = n_full
        for j in range(j_lo + 1, j_unmasked):
            st = pipelined_block(gb + j, j, st, q, kv, rows, cfg, WG, LOOP_MASK)
        if not cfg.CAUSAL:
            for j in range(gl.maximum(n_full, j_lo + 1), j_hi):
                st = pipelined_block(gb + j, j, st, q, kv, rows, cfg, WG, True)
        acc, p, m_i, l_i, alpha = st
        # Every QK^T of the unit is done: the producer may load the next unit's Q (under this
        # unit's last PV and epilogue).
        mbarrier.arrive(qs.empty.index(WG))
        g_last = gb + j_hi - 1  # V_{g_last} is in slot g_last + 1, released by the next unit's first block
        mbarrier.wait(kv.v_ready.index((g_last + 1) % cfg.NUM_STAGES), (g_last // cfg.NUM_STAGES) & 1)
        acc = rescale_o(acc, alpha, cfg.LAZY_RESCALE)
        o_tok = warpgroup_mma(gl.convert_layout(p, cfg.P_LAYOUT), kv.v.index((g_last + 1) % cfg.NUM_STAGES), acc,
                              is_async=True)
        acc = warpgroup_mma_wait(0, deps=(o_tok,))
    else:
        st = (acc, m_i, l_i)
        for j in range(j_lo, n_full):
            st = serial_block(gb + j, j, st, q, kv, rows, cfg, False)
        for j in range(n_full, j_hi):
            st = serial_block(gb + j, j, st, q, kv, rows, cfg, True)
        acc, m_i, l_i = st
        mbarrier.arrive(qs.empty.index(WG))
    return acc, m_i, l_i


@gluon.jit
def issue_qk(q, kv, slot, s_zero, cfg):
    """S = Q K^T on the tensor cores, asynchronously (two wgmmas when D = DA + DB)."""
    q_a, q_b = q
    s_tok = warpgroup_mma(q_a, kv.k.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if cfg.DB > 0:
        s_tok = warpgroup_mma(q_b, kv.kb.index(slot).permute((1, 0)), s_tok, is_async=True)
    return s_tok


@gluon.jit
def pipelined_block(g, j, st, q, kv, rows, cfg, WG: gl.constexpr, MASKED: gl.constexpr):
    """One step of the consumer loop, key block j of the tile (g of the CTA): S_j = Q K_j^T
    and O += P_{j-1} V_{j-1} in flight together, the softmax of S_j under the PV. st: (O, P of
    block j-1, running max, row sum, block j-1's rescale factor)."""
    acc, p, m_i, l_i, alpha = st
    slot = g % cfg.NUM_STAGES  # K_g and V_{g-1} (see pipeline.producer)
    mbarrier.wait(kv.k_ready.index(slot), (g // cfg.NUM_STAGES) & 1)
    if cfg.PINGPONG:  # my turn: the other warpgroup has issued the QK^T of its last block
        named_barrier(PINGPONG_BARRIER0 + WG, False)
    s_tok = issue_qk(q, kv, slot, rows.s_zero, cfg)
    if cfg.PINGPONG:  # the turn holds the QK^T issue only (FA3's also holds the V wait, O's rescale and
        # the PV issue: 1-3 % slower at d=128 in two interleaved runs)
        named_barrier(PINGPONG_BARRIER0 + 1 - WG, True)
    # O's rescale by the last block's alpha runs while S_j is on the tensor cores (FA3's order)
    mbarrier.wait(kv.v_ready.index(slot), ((g - 1) // cfg.NUM_STAGES) & 1)
    acc = rescale_o(acc, alpha, cfg.LAZY_RESCALE)
    p_op = gl.convert_layout(p, cfg.P_LAYOUT)
    o_tok = warpgroup_mma(p_op, kv.v.index(slot), acc, is_async=True)
    # S_j done; PV_{j-1} may still run. Its A operand (P_{j-1} in registers) rides
    # through both waits as a dependency: otherwise it is dead to the register allocator
    # once issued, the softmax below reuses its registers, and ptxas has to wait for the
    # PV before the softmax (seen in SASS).
    s, p_op = warpgroup_mma_wait(1, deps=(s_tok, p_op))
    p, m_i, l_i, alpha = softmax_step(s, m_i, l_i, j, rows, cfg, MASKED)
    acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
    mbarrier.arrive(kv.empty.index(slot))  # K_g and V_{g-1} consumed
    return acc, p, m_i, l_i, alpha


@gluon.jit
def serial_block(g, j, st, q, kv, rows, cfg, MASKED: gl.constexpr):
    """Key block j of the tile (g of the CTA) without intra-warpgroup overlap (INTRA_OVERLAP off):
    S_j, its softmax, O's rescale, O += P_j V_j, each waited for; the other consumer warpgroups'
    GEMMs fill the tensor cores meanwhile. P_j dies inside the step, so S, P and O need not
    be live together: 128-key blocks fit the 160 registers a thread has with 3 consumers.
    st: (O, running max, row sum)."""
    acc, m_i, l_i = st
    slot = g % cfg.NUM_STAGES
    mbarrier.wait(kv.k_ready.index(slot), (g // cfg.NUM_STAGES) & 1)
    s = warpgroup_mma_wait(0, deps=(issue_qk(q, kv, slot, rows.s_zero, cfg),))
    mbarrier.arrive(kv.empty.index(slot))  # K_g, and V_{g-1} (the last step's PV, waited for)
    p, m_i, l_i, alpha = softmax_step(s, m_i, l_i, j, rows, cfg, MASKED)
    acc = rescale_o(acc, alpha, cfg.LAZY_RESCALE)
    v_slot = (g + 1) % cfg.NUM_STAGES  # V_g (see pipeline.producer)
    mbarrier.wait(kv.v_ready.index(v_slot), (g // cfg.NUM_STAGES) & 1)
    o_tok = warpgroup_mma(gl.convert_layout(p, cfg.P_LAYOUT), kv.v.index(v_slot), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(o_tok,))
    return acc, m_i, l_i
