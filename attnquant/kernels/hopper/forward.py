"""Hopper (sm_90a) prefill forward in Gluon: warp-specialized, TMA + wgmma.

A tile is BLOCK_M = NUM_CONSUMERS x 64 query rows (2 x 64; 3 x 64 for large non-causal
calls, launch.for_problem) of one (batch, query head) against that head's KV head. The grid is persistent (one CTA per SM): CTAs take tiles from a global counter as
they free up, in an order that puts the longest first and keeps the heads in flight few
enough for their K/V to stay in L2 (_tile_coords), and the producer loads the next tile's
Q and first K/V blocks while the consumers finish the current one. Three partitions
(FA3's structure):

- a producer warp: picks the tiles and hands their ids to the consumers (a two-entry
  shared-memory ring); TMA loads of the 64-row Q tiles (once per tile, when the
  consumers have released the previous tile's) and of K/V blocks into a NUM_STAGES-deep
  shared-memory ring (ready mbarriers for K and V, one "empty" mbarrier per slot that the
  consumers arrive on once per block). The ring runs on across tiles: block counters
  (slots, phases) are per CTA, not per tile;
- NUM_CONSUMERS consumer warpgroups (the default partition and workers), each owning 64 of
  the rows: S = Q K^T and O += P V on wgmma, the online softmax in registers, and the
  output epilogue. P never leaves registers: it is the A operand of the PV wgmma.

Inside a consumer the loop is software-pipelined the FA3 way: the QK^T wgmma of block
j is issued first, O's rescale for block j-1 runs under it, then the PV wgmma of block
j-1, and the softmax of block j runs while that PV is still on the tensor cores. O's
rescale is FA4's conditional one: the running max moves only when a block's exceeds it
by more than 2^8, and a warp whose rows all kept theirs skips the rescale. With three
consumers the loop may instead run each block's GEMMs in turn, waiting for each
(INTRA_OVERLAP off, _serial_block): P then dies inside the step, so 128-key blocks fit the
160 registers a thread has, and the other two warpgroups keep the tensor cores busy. Across two
consumers a named-barrier ping-pong (PINGPONG, off by default) makes them take turns issuing
their QK^T, so that the two are never in lock-step (perf-notes v24: a change elsewhere can
leave the free-running warpgroups in lock-step, their softmaxes contending for the MUFU and
their GEMMs queued together, 10-14 % slower). Registers move from the producer (24) to the
consumers (240 each with two, 160 with three).

With SPLIT_TAIL (non-causal, batched: every tile costs the same) the tiles of the last wave,
which would leave SMs idle, run as several units each over shares of their key blocks
(_tile_work, launch.tail_split); a tile's last part waits for the others' partial results
(fp32 O, max, sum in a workspace, flagged with release / acquire) and merges them before the
epilogue.

Keys are walked low to high; blocks from `n_full` on get the causal / sequence-end
mask, the others none. Scores are in the log2 domain (softmax_scale * log2 e folded
into one multiply-add before exp2). The epilogue writes the same formats with the
same arithmetic as the portable kernel's (kernels/epilogue.py).
"""

import struct

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .. import epilogue as _portable
from ..constants import LN2_C as LN2, LOG2E_C as LOG2E, WG_ROWS_C as WG_ROWS

# The portable epilogue's element-wise helpers, compiled as Gluon functions: the
# saturation and the power-of-two rounding are shared, not restated.
_to_fp8 = gluon.jit(_portable._to_fp8.fn)
_ceil_pow2 = gluon.jit(_portable._ceil_pow2.fn)
_nvfp4_block_scale = gluon.jit(_portable.nvfp4_block_scale.fn)
_e2m1_code = gluon.jit(_portable.e2m1_code.fn)
_nvfp4_scale_offset = gluon.jit(_portable.nvfp4_scale_offset.fn)
_nan_max = gluon.jit(_portable.nan_max.fn)
_nan_if_inf = gluon.jit(_portable.nan_if_inf.fn)
_dequant_scale_inverse = gluon.jit(_portable.dequant_scale_inverse.fn)
_add_sink = gluon.jit(_portable.add_sink.fn)

# LAZY_RESCALE: the running max moves only when a block's passes it by more than this (log2
# units: P <= 256), FA4's threshold
RESCALE_LOG2 = gl.constexpr(8.0)


def _rescale_asm(n):
    """n outputs $0.. = inputs $n.. (O) x $2n.. (alpha), unless input $3n (the warp's vote) is 0."""
    muls = "".join(f" mul.f32 ${i}, ${i + n}, ${i + 2 * n};\n" for i in range(n))
    movs = "".join(f" mov.b32 ${i}, ${i + n};\n" for i in range(n))
    return (f"{{ .reg .pred skip;\n setp.eq.u32 skip, ${3 * n}, 0;\n @skip bra SKIP;\n{muls}"
            f" bra.uni DONE;\n SKIP:\n{movs} DONE:\n}}")


# O's rescale in asm blocks of 32 values of a thread (16 at Dv = 32, where a thread holds 16)
_RESCALE_ASM = gl.constexpr({n: _rescale_asm(n) for n in (16, 32)})
_RESCALE_CONSTRAINTS = gl.constexpr({n: ",".join(["=r"] * n + ["r"] * (3 * n)) for n in (16, 32)})


def _fp8_pair_asm(fp8_max, fmt):
    """PTX: two fp32 values ($1 the lower column, $2 the upper) to one 16-bit register of two fp8
    codes, the lower column in the low byte. The max with -FP8_MAX is _to_fp8's lower clamp
    (max.NaN keeps a NaN); cvt's .satfinite is its upper clamp (values past the largest finite
    one become it) and turns NaN into the format's NaN code."""
    neg = f"0f{struct.unpack('<I', struct.pack('<f', -fp8_max))[0]:08X}"
    return (f"{{ .reg .f32 lo, hi;\n max.NaN.f32 lo, $1, {neg};\n max.NaN.f32 hi, $2, {neg};\n"
            f" cvt.rn.satfinite.{fmt}.f32 $0, hi, lo; }}")


# by the format's largest finite value: e4m3fn, e5m2
_FP8_PAIR_ASM = gl.constexpr({448.0: _fp8_pair_asm(448.0, "e4m3x2"), 57344.0: _fp8_pair_asm(57344.0, "e5m2x2")})


@gluon.jit
def _fp8_pairs(o, FP8_MAX: gl.constexpr):
    """o [rows, cols] fp32 -> [rows, cols / 2] int16, each the fp8 codes of columns 2c, 2c + 1 with
    _to_fp8's saturation, bit for bit what _to_fp8(o).to(fp8) holds. The wgmma layout gives a
    thread neighbouring column pairs, so the split moves no data; converted and stored as
    pairs, the fp8 output skips what Triton makes of o.to(fp8) followed by a byte store (each
    pair unpacked into bytes and packed again: ~100 instructions a tile)."""
    lo, hi = gl.split(gl.reshape(o, [o.shape[0], o.shape[1] // 2, 2]))
    return gl.inline_asm_elementwise(_FP8_PAIR_ASM[FP8_MAX], "=h,r,r", [lo, hi], dtype=gl.int16,
                                     is_pure=True, pack=1)


# Hardware named barriers (ids Triton's own partition barriers do not use: it takes 0-3 here).
# The consumers' ping-pong (FA3's warp-scheduler barriers): 2 x 128 threads each.
PINGPONG_BARRIER0 = gl.constexpr(8)
# The tile-id hand-off, per consumer warpgroup w: TILE_FULL0 + w (the producer has written the
# next id) and TILE_EMPTY0 + w (warpgroup w has read it), each the producer warp + 128 threads.
TILE_FULL0 = gl.constexpr(10)
TILE_EMPTY0 = gl.constexpr(13)
TILE_BARRIER_THREADS = gl.constexpr(32 + 128)


@gluon.jit
def _named_barrier(bar_id: gl.constexpr, ARRIVE: gl.constexpr, THREADS: gl.constexpr = 256):
    """bar.sync (wait until THREADS threads have arrived, this one included) or bar.arrive
    (count this one and go on) on hardware named barrier `bar_id`. Gluon 3.6 has no named
    barriers and its mbarrier ping-pong measured slower (an arrive there costs a warpgroup
    bar.sync, a wait a try-wait loop); these need no shared-memory address, so inline asm can
    issue them. Every thread of the calling partition executes it."""
    op: gl.constexpr = "bar.arrive" if ARRIVE else "bar.sync"
    gl.inline_asm_elementwise(f"{op} {bar_id}, {THREADS};\n mov.u32 $0, $1;", "=r,r", [gl.to_tensor(0)],
                              dtype=gl.int32, is_pure=False, pack=1)


NUM_STRIDES = gl.constexpr(16)


@gluon.constexpr_function
def _stash_strides_applies(consumers, out_kind):
    """Whether the epilogue's strides (output, LSE, block scales) wait in shared memory
    (_stash_strides) rather than ride in the consumer partitions' registers through the key-block
    loop. Three consumers have 160 registers a thread and their serial loop needs about all of
    them: with the per-group FP8 epilogue's block-scale strides carried through it, ptxas spilled
    in every key block, 3-4 % of the non-causal benchmark shape; the plain (bf16/fp16) one spilled
    too, at no measurable cost (perf-notes v35). Static FP8 and NVFP4 fit, and FP8 measured ~2 %
    slower with the strides in shared memory, so those keep registers."""
    return consumers == 3 and out_kind in (0, 2)


@gluon.jit
def _stash_strides(strides):
    """Kernel body, before the partitions start: the tuple of strides into shared memory (int64),
    entry k by thread k alone (a vector of one entry a thread: threads that stored copies of
    the same entries would be write-write hazards to compute-sanitizer's racecheck). Returns the
    buffer, whose first NUM_STRIDES entries _tile_epilogue reads."""
    THREADS: gl.constexpr = 32 * gl.num_warps()
    smem = gl.allocate_shared_memory(gl.int64, [THREADS], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    idx = gl.arange(0, THREADS, layout=layout)
    v = gl.zeros([THREADS], gl.int64, layout)
    for k in gl.static_range(len(strides)):
        v = gl.where(idx == k, strides[k], v)
    smem.store(v)
    return smem


@gluon.jit
def _stride(v, k: gl.constexpr):
    """Entry k of a _stash_strides vector (held whole by every thread: no data moves)."""
    idx = gl.arange(0, NUM_STRIDES, layout=v.type.layout)
    return gl.sum(gl.where(idx == k, v, 0), 0)


@gluon.jit
def _tile_coords(t, num_m, num_bh, section):
    """Tile t of the schedule: (query tile, batch*head). Tiles are numbered in sections of
    `section` consecutive batch*heads (sized on the host so that their K/V fit in L2);
    inside a section the last query tile of every head comes first (causal: the longest),
    then the one before it, and so on. CTAs take tiles in this order as they free up
    (_producer), so the longest go first and the short ones fill the end."""
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


# The tile-id hand-off (FA3's dynamic scheduler): one shared int32 slot, written by the producer
# warp and read by every consumer thread, ordered by named barriers on both sides (bar.arrive
# orders the arriving thread's earlier accesses before the waiting threads' later ones). With an
# mbarrier, whose arrive one elected thread performs, the other producer lanes' stores and the
# other consumer threads' loads were ordered only through a warp or warpgroup barrier first,
# which compute-sanitizer's racecheck does not follow: it reported hundreds of hazards a call.
# One slot costs no prefetch: the producer can load unit i's Q only once the consumers are done
# with unit i - 1's QK^T, after they have read its id anyway.


@gluon.jit
def _publish_tile(tile_ids, tile, i, NUM_CONSUMERS: gl.constexpr):
    """Producer: hand unit id `tile` (the i-th of this CTA; >= num_units: stop) to the consumers,
    once each warpgroup has read the previous one."""
    if i > 0:
        for w in gl.static_range(NUM_CONSUMERS):
            _named_barrier(TILE_EMPTY0 + w, False, TILE_BARRIER_THREADS)
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    tile_ids.store(gl.full([1], tile, gl.int32, layout))
    for w in gl.static_range(NUM_CONSUMERS):
        _named_barrier(TILE_FULL0 + w, True, TILE_BARRIER_THREADS)


@gluon.jit
def _retire_tile_ids(NUM_CONSUMERS: gl.constexpr):
    """Producer, after publishing the stop id: wait for its reads, so that every arrive on the
    hand-off barriers meets a sync before the CTA exits."""
    for w in gl.static_range(NUM_CONSUMERS):
        _named_barrier(TILE_EMPTY0 + w, False, TILE_BARRIER_THREADS)


@gluon.jit
def _read_tile(tile_ids, WG: gl.constexpr):
    """Consumer warpgroup WG: the next unit id the producer published."""
    _named_barrier(TILE_FULL0 + WG, False, TILE_BARRIER_THREADS)
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    tile = gl.max(tile_ids.load(layout), 0)
    _named_barrier(TILE_EMPTY0 + WG, True, TILE_BARRIER_THREADS)
    return tile


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


@gluon.jit
def _load_split(desc_a, desc_b, row, col, bar, smem_a, smem_b, DA: gl.constexpr, DB: gl.constexpr):
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
def _producer(args, GROUP: gl.constexpr, DA: gl.constexpr, DB: gl.constexpr, DV: gl.constexpr, BLOCK_N: gl.constexpr,
              NUM_STAGES: gl.constexpr, VARLEN: gl.constexpr, CAUSAL: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
              SPLIT_TAIL: gl.constexpr):
    """One warp. Picks the CTA's tiles (its program id first, then one from the shared
    counter each time it has issued a tile's loads: dynamic, longest first) and publishes
    them to the consumers. Per tile: Q once (when the consumers have released the last
    tile's), then K_g into ring slot g % NUM_STAGES and V_g into slot (g + 1) % NUM_STAGES
    as slots free up, g counting key blocks over all of this CTA's tiles. Head dims that are not a power
    of two come as two column tiles (192 = 128 + 64)."""
    (descs, qs, ks, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, tile_ids, sched,
     TileCounter, num_heads, seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK) = args
    q_desc, qb_desc, k_desc, kb_desc, v_desc = descs
    q_smem, qb_smem = qs
    k_smem, kb_smem = ks
    pid, nprog, num_units, num_m, num_bh, section, split_from, split_parts = sched
    g = 0  # key blocks loaded so far
    i = 0  # units published (and loaded) so far
    unit = pid
    while unit < num_units:
        tile, part, parts, split_idx = _tile_work(unit, split_from, split_parts, SPLIT_TAIL)
        pid_m, bh = _tile_coords(tile, num_m, num_bh, section)
        b, h, q_tok0, q_row, k_row, sq, sk, m0, n_blocks, n_full = _tile_extent(
            pid_m, bh, num_heads, seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK, NUM_CONSUMERS * WG_ROWS, BLOCK_N, VARLEN,
            CAUSAL)
        j_lo, j_hi, n_full = _key_range(part, parts, n_blocks, n_full, SPLIT_TAIL)
        if m0 < sq:  # (varlen: a tile past its sequence's end has no rows and is not published)
            _publish_tile(tile_ids, unit, i, NUM_CONSUMERS)
            q_col = h * (DA + DB)
            kv_col = (h // GROUP) * (DA + DB)
            v_col = (h // GROUP) * DV
            for w in gl.static_range(NUM_CONSUMERS):
                # A fresh mbarrier counts as having completed the phase before 0: the first
                # waits on an "empty" barrier (parity 1) pass at once.
                mbarrier.wait(q_empty.index(w), (i & 1) ^ 1)
                _load_split(q_desc, qb_desc, q_row + w * WG_ROWS, q_col, q_bar.index(w), q_smem.index(w),
                            qb_smem.index(w), DA, DB)
            # K_g goes to slot g % NUM_STAGES, V_g to slot (g + 1) % NUM_STAGES: then the
            # consumers' one release per block, kv_empty[g % NUM_STAGES] after block g, frees
            # K_g and V_{g-1} together (Gluon's arrive costs a warpgroup bar.sync: ncu counted
            # barrier stalls as a third of the consumers' stall cycles with two per block).
            for j in range(j_lo, j_hi):
                gj = g + j - j_lo
                slot = gj % NUM_STAGES
                mbarrier.wait(kv_empty.index(slot), ((gj // NUM_STAGES) & 1) ^ 1)  # K_{g-S} released
                _load_split(k_desc, kb_desc, k_row + j * BLOCK_N, kv_col, k_ready.index(slot), k_smem.index(slot),
                            kb_smem.index(slot), DA, DB)
                v_slot = (gj + 1) % NUM_STAGES
                mbarrier.wait(kv_empty.index(v_slot), (((gj + 1) // NUM_STAGES) & 1) ^ 1)  # V_{g-S} released
                mbarrier.expect(v_ready.index(v_slot), v_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(v_desc, [k_row + j * BLOCK_N, v_col], v_ready.index(v_slot),
                                                v_smem.index(v_slot))
            g += j_hi - j_lo
            i += 1
        fetched = gl.atomic_add(TileCounter, 1)
        unit = nprog + fetched
        # The call's num_units fetches get 0 .. num_units - 1 (every CTA's last fetch fails, one
        # each): the last one leaves the counter at zero for the next call (launch.workspace).
        gl.atomic_xchg(TileCounter, 0, mask=fetched == num_units - 1)
    _publish_tile(tile_ids, unit, i, NUM_CONSUMERS)  # no more tiles
    _retire_tile_ids(NUM_CONSUMERS)


# _softmax_step's MASKED: False (no key of the block is masked), True (the causal diagonal or the
# ragged end of the keys), or MASK_FROM_N_FULL: masked where j >= n_full, decided by a branch.
MASK_FROM_N_FULL = gl.constexpr(2)


@gluon.jit
def _mask_scores(s, j, q_pos, seqlen_k, diag, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, s_layout: gl.constexpr):
    """-inf where key block j's keys are past the sequence or (CAUSAL) past a row's diagonal."""
    keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    ok = (keys < seqlen_k)[None, :]
    if CAUSAL:
        ok = ok & (keys[None, :] <= (q_pos + diag)[:, None])
    return gl.where(ok, s, float("-inf"))


@gluon.jit
def _softmax_step(s, m_i, l_i, j, n_full, q_pos, seqlen_k, diag, qk_scale,
                  MASKED: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, s_layout: gl.constexpr,
                  p_dtype: gl.constexpr, LAZY_RESCALE: gl.constexpr):
    """Online softmax of score block j: returns (p, m_new, l_new, alpha) with
    p = exp2(s * qk_scale - m) in p_dtype (16-bit: half the registers of fp32 while it waits
    for its PV), alpha = exp2(m_old - m) (0-safe for rows with no key yet).
    LAZY_RESCALE (FA4's conditional rescale): m moves only when the block's maximum passes it
    by more than RESCALE_LOG2, so p <= 2^RESCALE_LOG2 (exact enough in 16 bits, no overflow in
    fp32) and alpha is exactly 1 on most blocks, whose O rescale is then skipped (_rescale_o)."""
    # An infinite score (an infinite q or k) must give NaN, not a key of weight 0 (SPEC): where a
    # mask may follow, s itself is checked first (the mask then replaces what a row does not
    # see); unmasked blocks check p instead (below), which keeps ptxas's register allocation.
    if MASKED == MASK_FROM_N_FULL:
        s = _nan_if_inf(s)
        # The row max of the unmasked scores first, recomputed in the masked branch: with the
        # branch ahead of it, ptxas moves the PV wait above the max tree (perf-notes v40).
        m_raw = _row_max(s)
        if j >= n_full:
            s = _mask_scores(s, j, q_pos, seqlen_k, diag, BLOCK_N, CAUSAL, s_layout)
            m_raw = _row_max(s)
    else:
        if MASKED:
            s = _mask_scores(_nan_if_inf(s), j, q_pos, seqlen_k, diag, BLOCK_N, CAUSAL, s_layout)
        m_raw = _row_max(s)
    m_blk = m_raw * qk_scale
    if LAZY_RESCALE:
        m_new = gl.where(m_blk > m_i + RESCALE_LOG2, m_blk, m_i)
    else:
        m_new = gl.maximum(m_i, m_blk)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_use[:, None])
    if not MASKED:
        p = gl.fma(s, 0.0, p)  # NaN where s is +-inf or NaN, p elsewhere
    alpha = gl.exp2(m_i - m_use)
    l_new = l_i * alpha + gl.sum(p, 1)
    return _pack_16bit(p, p_dtype), m_new, l_new, alpha


@gluon.jit
def _rescale_o(acc, alpha, LAZY_RESCALE: gl.constexpr):
    """O *= alpha (per row). LAZY_RESCALE: each warp skips it when alpha is 1 on all 16 of its
    rows (a warp vote and a branch, in inline asm: Gluon's `if` needs a value uniform over the
    warpgroup, which would cost a cross-warp reduction through shared memory)."""
    a = gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))
    if not LAZY_RESCALE:
        return acc * a[:, None]
    # A thread holds 2 rows of the wgmma layout (r and r + 8): pack=2 sees both.
    need = gl.inline_asm_elementwise(
        "{ .reg .pred p;\n setp.ne.f32 p, $2, 0f3F800000;\n setp.ne.or.f32 p, $3, 0f3F800000, p;\n"
        " vote.sync.any.pred p, p, 0xffffffff;\n selp.u32 $0, 1, 0, p;\n mov.u32 $1, $0; }",
        "=r,=r,r,r", [a], dtype=gl.int32, is_pure=False, pack=2)
    if acc.shape[1] >= 64:  # 32 or more values a thread
        return gl.inline_asm_elementwise(_RESCALE_ASM[32], _RESCALE_CONSTRAINTS[32], [acc, a[:, None], need[:, None]],
                                         dtype=gl.float32, is_pure=True, pack=32)
    else:  # Dv = 32: 16 values a thread
        return gl.inline_asm_elementwise(_RESCALE_ASM[16], _RESCALE_CONSTRAINTS[16], [acc, a[:, None], need[:, None]],
                                         dtype=gl.float32, is_pure=True, pack=16)


@gluon.jit
def _row_max(s):
    """gl.max(s, 1) as a tree: Triton reduces a thread's 32 values of a row in one chain of
    dependent max instructions (SASS: FMNMX x31 ahead of every exp2 of the block). Here the
    column halves are maxed elementwise while the halving bit is a register bit of the wgmma
    layout (columns 8 and up), then gl.max finishes the last 8 columns (one register pair,
    two quad shuffles): the same 31 instructions, 6 deep instead of 31."""
    n: gl.constexpr = s.shape[1]
    row_layout: gl.constexpr = gl.SliceLayout(1, s.type.layout)
    for _ in gl.static_range(gl.constexpr(n.bit_length() - 4)):  # n -> 8
        a, b = gl.split(gl.permute(gl.reshape(s, [s.shape[0], 2, s.shape[1] // 2]), (0, 2, 1)))
        s = gl.maximum(a, b)
    return gl.convert_layout(gl.max(s, 1), row_layout)  # (the same rows to the same threads: no data moves)


@gluon.jit
def _pack_16bit(x, dtype: gl.constexpr):
    """x.to(dtype) for a 16-bit float dtype, two neighbouring elements per cvt, the first in the
    low half: the register image the PV wgmma reads P in. x.to() lets ptxas pack the pair the
    other way round and swap the halves back with one PRMT per register (32 per key block)."""
    if dtype == gl.bfloat16:
        return gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.bfloat16, is_pure=True,
                                         pack=2)
    else:
        return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.float16, is_pure=True,
                                         pack=2)


@gluon.jit
def _issue_qk(q, ks, slot, s_zero, DB: gl.constexpr):
    """S = Q K^T on the tensor cores, asynchronously (two wgmmas when D = DA + DB)."""
    k_smem, kb_smem = ks
    q_a, q_b = q
    s_tok = warpgroup_mma(q_a, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if DB > 0:
        s_tok = warpgroup_mma(q_b, kb_smem.index(slot).permute((1, 0)), s_tok, is_async=True)
    return s_tok


@gluon.jit
def _pipelined_block(g, j, n_full, q, ks, v_smem, k_ready, v_ready, kv_empty, acc, p, m_i, l_i, alpha,
                     q_pos, seqlen_k, diag, qk_scale, s_zero,
                     WG: gl.constexpr, DB: gl.constexpr, MASKED: gl.constexpr, BLOCK_N: gl.constexpr,
                     NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, s_layout: gl.constexpr,
                     o_layout: gl.constexpr, p_layout: gl.constexpr, LAZY_RESCALE: gl.constexpr):
    """One step of the consumer loop, key block j of the tile (g of the CTA): S_j = Q K_j^T
    and O += P_{j-1} V_{j-1} in flight together, the softmax of S_j under the PV."""
    slot = g % NUM_STAGES  # K_g and V_{g-1} (see _producer)
    mbarrier.wait(k_ready.index(slot), (g // NUM_STAGES) & 1)
    if PINGPONG:  # my turn: the other warpgroup has issued the QK^T of its last block
        _named_barrier(PINGPONG_BARRIER0 + WG, False)
    s_tok = _issue_qk(q, ks, slot, s_zero, DB)
    if PINGPONG:  # the turn holds the QK^T issue only (FA3's also holds the V wait, O's rescale and
        # the PV issue: 1-3 % slower at d=128 in two interleaved runs, perf-notes v24)
        _named_barrier(PINGPONG_BARRIER0 + 1 - WG, True)
    # O's rescale by the last block's alpha runs while S_j is on the tensor cores (FA3's order)
    mbarrier.wait(v_ready.index(slot), ((g - 1) // NUM_STAGES) & 1)
    acc = _rescale_o(acc, alpha, LAZY_RESCALE)
    p_op = gl.convert_layout(p, p_layout)
    o_tok = warpgroup_mma(p_op, v_smem.index(slot), acc, is_async=True)
    # S_j done; PV_{j-1} may still run. Its A operand (P_{j-1} in registers) rides
    # through both waits as a dependency: otherwise it is dead to the register allocator
    # once issued, the softmax below reuses its registers, and ptxas has to wait for the
    # PV before the softmax (seen in SASS).
    s, p_op = warpgroup_mma_wait(1, deps=(s_tok, p_op))
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, j, n_full, q_pos, seqlen_k, diag, qk_scale,
                                       MASKED, BLOCK_N, CAUSAL, s_layout, v_smem.dtype, LAZY_RESCALE)
    acc, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
    mbarrier.arrive(kv_empty.index(slot))  # K_g and V_{g-1} consumed
    return acc, p, m_i, l_i, alpha


@gluon.jit
def _serial_block(g, j, q, ks, v_smem, k_ready, v_ready, kv_empty, acc, m_i, l_i, q_pos, seqlen_k, diag, qk_scale,
                  s_zero, DB: gl.constexpr, MASKED: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                  CAUSAL: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr, LAZY_RESCALE: gl.constexpr):
    """Key block j of the tile (g of the CTA) without intra-warpgroup overlap (INTRA_OVERLAP off):
    S_j, its softmax, O's rescale, O += P_j V_j, each waited for; the other consumer warpgroups'
    GEMMs fill the tensor cores meanwhile. P_j dies inside the step, so S, P and O need not
    be live together: 128-key blocks fit the 160 registers a thread has with 3 consumers."""
    slot = g % NUM_STAGES
    mbarrier.wait(k_ready.index(slot), (g // NUM_STAGES) & 1)
    s = warpgroup_mma_wait(0, deps=(_issue_qk(q, ks, slot, s_zero, DB),))
    mbarrier.arrive(kv_empty.index(slot))  # K_g, and V_{g-1} (the last step's PV, waited for)
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, j, 0, q_pos, seqlen_k, diag, qk_scale, MASKED, BLOCK_N, CAUSAL,
                                       s_layout, v_smem.dtype, LAZY_RESCALE)
    acc = _rescale_o(acc, alpha, LAZY_RESCALE)
    v_slot = (g + 1) % NUM_STAGES  # V_g (see _producer)
    mbarrier.wait(v_ready.index(v_slot), (g // NUM_STAGES) & 1)
    o_tok = warpgroup_mma(gl.convert_layout(p, p_layout), v_smem.index(v_slot), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(o_tok,))
    return acc, m_i, l_i


@gluon.jit
def _consumer(args, WG: gl.constexpr, DB: gl.constexpr, BLOCK_N: gl.constexpr, DV: gl.constexpr,
              NUM_STAGES: gl.constexpr, VARLEN: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
              STORE_LSE: gl.constexpr, OUT_KIND: gl.constexpr, FP8_MAX: gl.constexpr, GROUP_SIZE: gl.constexpr,
              UE8M0: gl.constexpr, TMA_STORE: gl.constexpr, HAS_SINKS: gl.constexpr,
              LAZY_RESCALE: gl.constexpr, NUM_CONSUMERS: gl.constexpr, INTRA_OVERLAP: gl.constexpr,
              SPLIT_TAIL: gl.constexpr):
    """One warpgroup: rows WG*64 .. +64 of each unit the producer publishes. `args`: the buffers,
    barriers and scalars every consumer gets (constexprs cannot ride in a tuple built in the
    kernel: Gluon 3.6 turns them into tensors)."""
    (qs, ks, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, tile_ids,
     o_desc, o_smem, Out, Lse, OutScale, BlockScale, CuSeqlensQ, CuSeqlensK, Partials, Sinks, SplitFlags, sched, num_heads,
     seqlen_q, seqlen_k, strides, qk_scale) = args
    pid, nprog, num_units, num_m, num_bh, section, split_from, split_parts = sched
    STASH_STRIDES: gl.constexpr = _stash_strides_applies(NUM_CONSUMERS, OUT_KIND)
    g = 0  # key blocks consumed so far (the producer's ring counter)
    i = 0  # units done
    if PINGPONG and WG == 1:  # warpgroup 0 issues first
        _named_barrier(PINGPONG_BARRIER0, True)
    unit = _read_tile(tile_ids, WG)
    while unit < num_units:
        tile, part, parts, split_idx = _tile_work(unit, split_from, split_parts, SPLIT_TAIL)
        pid_m, bh = _tile_coords(tile, num_m, num_bh, section)
        b, h, q_tok0, q_row, k_row, sq, sk, m0, n_blocks, n_full = _tile_extent(
            pid_m, bh, num_heads, seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK, NUM_CONSUMERS * WG_ROWS, BLOCK_N, VARLEN,
            CAUSAL)
        j_lo, j_hi, n_full = _key_range(part, parts, n_blocks, n_full, SPLIT_TAIL)
        acc, m_i, l_i = _consumer_tile(qs, ks, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty,
                                       m0, sk, sq, j_lo, j_hi, n_full, g, i, qk_scale,
                                       WG, DB, BLOCK_N, DV, NUM_STAGES, CAUSAL, PINGPONG,
                                       LAZY_RESCALE, INTRA_OVERLAP)
        epilogue = (o_desc, o_smem, Out, Lse, OutScale, BlockScale, Sinks, b, h, q_tok0, q_row, m0, sq,
                    strides)
        if SPLIT_TAIL:
            # The last part of a split tile merges the other parts' partial results and writes the
            # output (a whole tile is part 0 of 1: nothing to merge); the parts before it leave
            # theirs in Partials. (The last part is handed out after the others, which are running
            # or done by then: its wait always ends.)
            slot0 = split_idx * (split_parts - 1) * NUM_CONSUMERS + WG
            if part + 1 == parts:
                acc, m_i, l_i = _merge_partials(acc, m_i, l_i, Partials, SplitFlags, slot0, parts - 1, DV,
                                                NUM_CONSUMERS)
                _tile_epilogue(acc, m_i, l_i, epilogue, WG, DV, STORE_LSE, HAS_SINKS, OUT_KIND, FP8_MAX, GROUP_SIZE, UE8M0,
                               TMA_STORE, STASH_STRIDES)
            else:
                _store_partial(acc, m_i, l_i, Partials, SplitFlags, slot0 + part * NUM_CONSUMERS, DV)
        else:
            _tile_epilogue(acc, m_i, l_i, epilogue, WG, DV, STORE_LSE, HAS_SINKS, OUT_KIND, FP8_MAX, GROUP_SIZE, UE8M0,
                           TMA_STORE, STASH_STRIDES)
        g += j_hi - j_lo
        i += 1
        unit = _read_tile(tile_ids, WG)
    if PINGPONG and WG == 0:  # warpgroup 1's last arrive: every arrive meets a sync
        _named_barrier(PINGPONG_BARRIER0, False)
    if TMA_STORE:  # the shared memory of the last output tile stays alive until its store has read it
        tma.store_wait(0)


@gluon.jit
def _consumer_tile(qs, ks, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty,
                   q_pos0, seqlen_k, seqlen_q, j_lo, j_hi, n_full, g0, tile_idx, qk_scale,
                   WG: gl.constexpr, DB: gl.constexpr, BLOCK_N: gl.constexpr, DV: gl.constexpr,
                   NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
                   LAZY_RESCALE: gl.constexpr,
                   INTRA_OVERLAP: gl.constexpr):
    """One warpgroup's 64 rows of one unit: key blocks [j_lo, j_hi) of its tile (ring blocks g0 ..).
    Returns (O unnormalized, running max in log2 units, row sum)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, DV, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = v_smem.dtype

    q_pos = q_pos0 + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, s_layout))
    diag = seqlen_k - seqlen_q
    q = (qs[0].index(WG), qs[1].index(WG))
    s_zero = gl.zeros([WG_ROWS, BLOCK_N], gl.float32, s_layout)
    m_i = gl.full([WG_ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([WG_ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([WG_ROWS, DV], gl.float32, o_layout)
    gb = g0 - j_lo  # ring block of key block j: gb + j

    mbarrier.wait(q_bar.index(WG), tile_idx & 1)
    if INTRA_OVERLAP:
        # Block j_lo: S, its softmax; its PV waits for the loop (pipelined one block behind).
        slot0 = g0 % NUM_STAGES
        mbarrier.wait(k_ready.index(slot0), (g0 // NUM_STAGES) & 1)
        if PINGPONG:
            _named_barrier(PINGPONG_BARRIER0 + WG, False)
        s_tok = _issue_qk(q, ks, slot0, s_zero, DB)
        if PINGPONG:
            _named_barrier(PINGPONG_BARRIER0 + 1 - WG, True)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        # K_g0, and V_{g0-1} in the same slot: the previous unit's last block, whose PV is done
        mbarrier.arrive(kv_empty.index(slot0))
        if j_lo < n_full:
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, j_lo, n_full, q_pos, seqlen_k, diag, qk_scale,
                                               False, BLOCK_N, CAUSAL, s_layout, dtype, LAZY_RESCALE)
        else:
            p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, j_lo, n_full, q_pos, seqlen_k, diag, qk_scale,
                                               True, BLOCK_N, CAUSAL, s_layout, dtype, LAZY_RESCALE)
        # Causal: one loop, the mask under a branch. Every causal tile runs its diagonal block, so
        # a masked copy of the loop is instruction-cache working set that each tile fetches again
        # (perf-notes v40: 11 % less code, mla 1-3 % faster). Non-causal: an unmasked loop and a
        # masked one, since only a ragged end of the keys is masked there and the mask's
        # registers stay out of the hot loop (with the last wave split, one loop spills).
        if CAUSAL:
            LOOP_MASK: gl.constexpr = MASK_FROM_N_FULL
            j_unmasked = j_hi
        else:
            LOOP_MASK: gl.constexpr = False
            j_unmasked = n_full
        for j in range(j_lo + 1, j_unmasked):
            acc, p, m_i, l_i, alpha = _pipelined_block(
                gb + j, j, n_full, q, ks, v_smem, k_ready, v_ready, kv_empty, acc, p, m_i, l_i,
                alpha, q_pos, seqlen_k, diag, qk_scale, s_zero, WG, DB, LOOP_MASK, BLOCK_N, NUM_STAGES,
                CAUSAL, PINGPONG, s_layout, o_layout, p_layout, LAZY_RESCALE)
        if not CAUSAL:
            for j in range(gl.maximum(n_full, j_lo + 1), j_hi):
                acc, p, m_i, l_i, alpha = _pipelined_block(
                    gb + j, j, n_full, q, ks, v_smem, k_ready, v_ready, kv_empty, acc, p, m_i, l_i,
                    alpha, q_pos, seqlen_k, diag, qk_scale, s_zero, WG, DB, True, BLOCK_N, NUM_STAGES,
                    CAUSAL, PINGPONG, s_layout, o_layout, p_layout, LAZY_RESCALE)
        # Every QK^T of the unit is done: the producer may load the next unit's Q (under this
        # unit's last PV and epilogue).
        mbarrier.arrive(q_empty.index(WG))
        g_last = gb + j_hi - 1  # V_{g_last} is in slot g_last + 1, released by the next unit's first block
        mbarrier.wait(v_ready.index((g_last + 1) % NUM_STAGES), (g_last // NUM_STAGES) & 1)
        acc = _rescale_o(acc, alpha, LAZY_RESCALE)
        o_tok = warpgroup_mma(gl.convert_layout(p, p_layout), v_smem.index((g_last + 1) % NUM_STAGES), acc,
                              is_async=True)
        acc = warpgroup_mma_wait(0, deps=(o_tok,))
    else:
        for j in range(j_lo, n_full):
            acc, m_i, l_i = _serial_block(gb + j, j, q, ks, v_smem, k_ready, v_ready, kv_empty, acc, m_i, l_i, q_pos,
                                          seqlen_k, diag, qk_scale, s_zero, DB, False, BLOCK_N, NUM_STAGES, CAUSAL,
                                          s_layout, p_layout, LAZY_RESCALE)
        for j in range(n_full, j_hi):
            acc, m_i, l_i = _serial_block(gb + j, j, q, ks, v_smem, k_ready, v_ready, kv_empty, acc, m_i, l_i, q_pos,
                                          seqlen_k, diag, qk_scale, s_zero, DB, True, BLOCK_N, NUM_STAGES, CAUSAL,
                                          s_layout, p_layout, LAZY_RESCALE)
        mbarrier.arrive(q_empty.index(WG))
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
def _store_partial(acc, m_i, l_i, Partials, SplitFlags, slot, DV: gl.constexpr):
    """A split tile's part before the last: its (O unnormalized, max, sum) into slot `slot` of
    Partials, then SplitFlags[slot] = 1 (release: after every thread's stores)."""
    o_off, ml_off = _partial_offsets(acc, m_i, DV)
    base = Partials + slot.to(gl.int64) * (WG_ROWS * (DV + 2))
    gl.store(base + o_off, acc)
    gl.store(base + ml_off, m_i)
    gl.store(base + ml_off + WG_ROWS, l_i)
    gl.thread_barrier()  # the warpgroup's stores, ordered before the release
    gl.atomic_xchg(SplitFlags + slot, 1, sem="release", scope="gpu")


@gluon.jit
def _merge_partials(acc, m_i, l_i, Partials, SplitFlags, slot0, n_parts, DV: gl.constexpr,
                    NUM_CONSUMERS: gl.constexpr):
    """The last part of a split tile: fold in the n_parts partial results in slots slot0,
    slot0 + NUM_CONSUMERS, .. once each is flagged (acquire; the loads bypass L1, which may hold
    a previous call's lines of the workspace)."""
    o_off, ml_off = _partial_offsets(acc, m_i, DV)
    for p in range(n_parts):
        slot = slot0 + p * NUM_CONSUMERS
        while gl.atomic_add(SplitFlags + slot, 0, sem="acquire", scope="gpu") == 0:
            pass
        base = Partials + slot.to(gl.int64) * (WG_ROWS * (DV + 2))
        m_p = gl.load(base + ml_off, cache_modifier=".cg")
        l_p = gl.load(base + ml_off + WG_ROWS, cache_modifier=".cg")
        gl.atomic_xchg(SplitFlags + slot, 0)  # (read by this part only: cleared for the next call)
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
def _tile_epilogue(acc, m_i, l_i, epilogue, WG: gl.constexpr, DV: gl.constexpr, STORE_LSE: gl.constexpr,
                   HAS_SINKS: gl.constexpr, OUT_KIND: gl.constexpr, FP8_MAX: gl.constexpr, GROUP_SIZE: gl.constexpr, UE8M0: gl.constexpr,
                   TMA_STORE: gl.constexpr, STASHED_STRIDES: gl.constexpr):
    """One warpgroup's 64 rows of a tile out: O / rowsum in the output format, and the LSE. A
    row that saw no key writes 0 and LSE -inf (with a sink: 0 and the sink's logit)."""
    (o_desc, o_smem, Out, Lse, OutScale, BlockScale, Sinks, b, h, q_tok0, q_row, q_pos0, seqlen_q,
     strides) = epilogue
    o_layout: gl.constexpr = acc.type.layout
    s_rows: gl.constexpr = m_i.type.layout
    if STASHED_STRIDES:  # (a shared-memory vector: _stash_strides)
        st = strides.slice(0, NUM_STRIDES).load(gl.BlockedLayout([NUM_STRIDES], [32], [gl.num_warps()], [0]))
        stride_ob = _stride(st, 0)
        stride_os = _stride(st, 1)
        stride_oh = _stride(st, 2)
        stride_lb = _stride(st, 3)
        stride_lh = _stride(st, 4)
        stride_ls = _stride(st, 5)
        stride_bsb = _stride(st, 6)
        stride_bss = _stride(st, 7)
        stride_bsh = _stride(st, 8)
        stride_bsg = _stride(st, 9)
        stride_sink = _stride(st, 10)
    else:
        (stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls, stride_bsb, stride_bss, stride_bsh, stride_bsg,
         stride_sink) = strides
    tok0 = (q_tok0 + q_pos0).to(gl.int64)
    if HAS_SINKS:  # the head's sink logit joins the denominator (and the LSE) once, here
        sink = gl.load(Sinks + h.to(gl.int64) * stride_sink).to(gl.float32) * LOG2E
        m_i, l_i, alpha = _add_sink(m_i, l_i, sink)
    seen = l_i != 0.0  # (a NaN row sum stays NaN: output and LSE NaN)
    inv_l = gl.where(seen, 1.0 / gl.where(seen, l_i, 1.0), 0.0)
    if HAS_SINKS:
        inv_l = inv_l * alpha
    rows = WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, o_layout))
    row_ok = q_pos0 + rows < seqlen_q
    out_row0 = b.to(gl.int64) * stride_ob + tok0 * stride_os + h.to(gl.int64) * stride_oh
    bs_row0 = b.to(gl.int64) * stride_bsb + tok0 * stride_bss + h.to(gl.int64) * stride_bsh
    _store_output(acc, gl.convert_layout(inv_l, gl.SliceLayout(1, o_layout)), Out,
                  out_row0 + rows.to(gl.int64) * stride_os, row_ok, OutScale, BlockScale,
                  bs_row0 + rows.to(gl.int64) * stride_bss, h, stride_bsg, q_pos0 + (WG + 1) * WG_ROWS <= seqlen_q,
                  o_desc, o_smem.index(WG), q_row + WG * WG_ROWS, h * DV, DV, OUT_KIND, FP8_MAX, GROUP_SIZE, UE8M0,
                  TMA_STORE, o_layout)
    if STORE_LSE:
        lse_row0 = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + tok0 * stride_ls
        lse = gl.where(seen, (m_i + gl.log2(gl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
        lrows = WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=s_rows)
        gl.store(Lse + lse_row0 + lrows.to(gl.int64) * stride_ls, lse, mask=q_pos0 + lrows < seqlen_q)


@gluon.jit
def _saturate(o, FP8_MAX: gl.constexpr, OUT_KIND: gl.constexpr):
    """_to_fp8 for the FP8 formats (OUT_KIND 1, 2), o itself for the plain one."""
    if OUT_KIND == 0:
        return o
    else:
        return _to_fp8(o, FP8_MAX, 0, 0, False)


@gluon.jit
def _store_output(acc, row_factor, Out, out_rows, row_ok, OutScale, BlockScale, bs_rows, head, stride_bsg,
                  whole, o_desc, o_smem, o_row, o_col, DV: gl.constexpr, OUT_KIND: gl.constexpr, FP8_MAX: gl.constexpr, GROUP_SIZE: gl.constexpr,
                  UE8M0: gl.constexpr, TMA_STORE: gl.constexpr, layout: gl.constexpr):
    """O = acc * row_factor in format OUT_KIND; the portable store_output's arithmetic
    (OUT_KIND 0 plain, 1 static FP8, 2 per-token-group FP8, 3 NVFP4). FP8 groups are masked
    column ranges, DV / GROUP_SIZE of them; NVFP4's 16-channel blocks and channel pairs are
    reshapes of the accumulator layout, whose threads hold adjacent column pairs and whose
    quads hold 8 consecutive columns (the block maximum is a quad shuffle, no shared memory).
    NVFP4's bytes go out from registers. With TMA_STORE a whole tile
    (all its rows inside the sequence) goes to o_smem and from there by TMA to rows o_row.., columns o_col.. of o_desc's
    2-D (tokens, heads * DV) view (row stores of 2-byte pieces at the head stride cost the
    load/store unit ~8 sectors per instruction; a TMA store writes whole lines)."""
    cols = gl.arange(0, DV, layout=gl.SliceLayout(0, layout))
    ptrs = Out + out_rows[:, None] + cols[None, :]
    mask = row_ok[:, None] & (cols < DV)[None, :]
    acc = _nan_if_inf(acc)  # (an infinite O is a fault, not a value to saturate)
    if OUT_KIND == 0:
        o = acc * row_factor[:, None]
    elif OUT_KIND == 1:
        inv_scale = _dequant_scale_inverse(gl.load(OutScale))
        o = acc * (row_factor * inv_scale)[:, None]
    elif OUT_KIND == 3:
        ROWS: gl.constexpr = acc.shape[0]
        NB: gl.constexpr = DV // 16
        ab = gl.reshape(acc, [ROWS, NB, 16])
        sf_layout: gl.constexpr = gl.SliceLayout(2, ab.type.layout)
        rf = gl.convert_layout(row_factor, gl.SliceLayout(1, sf_layout))[:, None]
        # max|O| = max|acc| x (1 / rowsum) exactly; 1 / rowsum joins the per-block factor
        sf, to_e2m1 = _nvfp4_block_scale(gl.reduce(gl.abs(ab), 2, _nan_max) * rf, gl.load(OutScale), False)
        codes = gl.reshape(_e2m1_code(ab * gl.expand_dims(to_e2m1 * rf, 2)), [ROWS, DV // 2, 2])
        lo, hi = gl.split(codes)
        packed = (lo | (hi << 4)).to(gl.uint8)
        # the swizzled offset is a row part plus a column part (head is one per tile here)
        blk = head * NB + gl.arange(0, NB, layout=gl.SliceLayout(0, sf_layout))
        m = gl.convert_layout(bs_rows, gl.SliceLayout(1, sf_layout))
        sf_ok = gl.convert_layout(row_ok, gl.SliceLayout(1, sf_layout))
        row_part = _nvfp4_scale_offset(m, 0, stride_bsg)
        col_part = _nvfp4_scale_offset(0, blk, stride_bsg)
        gl.store(BlockScale + row_part[:, None] + col_part[None, :], sf.to(BlockScale.dtype.element_ty),
                 mask=sf_ok[:, None] & (blk >= 0)[None, :])  # (the mask spelled out in full shape)
        p_layout: gl.constexpr = packed.type.layout
        pairs = gl.arange(0, DV // 2, layout=gl.SliceLayout(0, p_layout))
        p_rows = gl.convert_layout(out_rows, gl.SliceLayout(1, p_layout))
        p_ok = gl.convert_layout(row_ok, gl.SliceLayout(1, p_layout))
        gl.store(Out + p_rows[:, None] + pairs[None, :], packed, mask=p_ok[:, None] & (pairs < DV // 2)[None, :])
    else:
        o = acc * row_factor[:, None]
        inv_scales = gl.full([acc.shape[0], DV], 1.0, gl.float32, layout)
        for g in gl.static_range(DV // GROUP_SIZE):
            in_g = ((cols >= g * GROUP_SIZE) & (cols < (g + 1) * GROUP_SIZE))[None, :]
            sc = _nan_max(gl.reduce(gl.where(in_g, gl.abs(o), 0.0), 1, _nan_max), 1e-10) / FP8_MAX
            if UE8M0:
                sc = _ceil_pow2(sc)
            gl.store(BlockScale + bs_rows + g * stride_bsg, sc, mask=row_ok)
            # one division per row and group, then multiplies: a division per element (div.full,
            # ~8 instructions) was most of this epilogue; exact for UE8M0's powers of two
            inv_scales = gl.where(in_g, (1.0 / sc)[:, None], inv_scales)
        o = o * inv_scales
    if OUT_KIND != 3:  # (NVFP4 stored its bytes above)
        # Two register-store branches: with `if TMA_STORE and whole` Gluon would also compile
        # the TMA branch when TMA_STORE is off, against the dummy o_desc / o_smem.
        if TMA_STORE:
            if whole:
                tma.store_wait(0)  # this warpgroup's previous tile has left o_smem
                if OUT_KIND == 0:
                    o_smem.store(o.to(Out.dtype.element_ty))
                else:  # FP8 as code pairs, through a 16-bit view of the same bytes (same swizzle)
                    pair_layout: gl.constexpr = gl.NVMMASharedLayout(o_smem.layout.swizzle_byte_width, 16)
                    o_smem._reinterpret(gl.int16, [o.shape[0], DV // 2], pair_layout).store(
                        _fp8_pairs(o, FP8_MAX))
                fence_async_shared()  # the generic-proxy writes, visible to the TMA (async proxy)
                tma.async_copy_shared_to_global(o_desc, [o_row, o_col], o_smem)
            else:
                gl.store(ptrs, _saturate(o, FP8_MAX, OUT_KIND).to(Out.dtype.element_ty), mask=mask)
        else:
            gl.store(ptrs, _saturate(o, FP8_MAX, OUT_KIND).to(Out.dtype.element_ty), mask=mask)


@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "batch", "section", "split_from", "split_parts"])
def attn_fwd_ws_kernel(
    q_desc, qb_desc, k_desc, kb_desc, v_desc, o_desc, Out, Lse, OutScale, BlockScale, CuSeqlensQ, CuSeqlensK, TileCounter,
    Partials, Sinks, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls,
    stride_bsb, stride_bss, stride_bsh, stride_bsg, stride_sink,
    seqlen_q, seqlen_k, batch, num_heads, section, split_from, split_parts, qk_scale,
    GROUP: gl.constexpr, DA: gl.constexpr, DB: gl.constexpr, DV: gl.constexpr,
    BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
    VARLEN: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, STORE_LSE: gl.constexpr,
    HAS_SINKS: gl.constexpr,
    OUT_KIND: gl.constexpr, FP8_MAX: gl.constexpr, GROUP_SIZE: gl.constexpr, UE8M0: gl.constexpr,
    TMA_STORE: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    LAZY_RESCALE: gl.constexpr = False, INTRA_OVERLAP: gl.constexpr = True,
    SPLIT_TAIL: gl.constexpr = False,
):
    """Grid: (number of CTAs,); seqlen_q / seqlen_k are the (max) lengths, `section` the
    batch*heads per L2 section (_tile_coords), TileCounter int32 zeros: [0] counts the units
    handed out past the first grid's worth, [1 + slot] flags a partial result; the kernel leaves
    them zero again. A grid of one CTA
    per tile is the non-persistent kernel. NUM_CONSUMERS (2 or 3) 64-row consumer warpgroups make
    a tile of BLOCK_M query rows. SPLIT_TAIL: the tiles from split_from on run as split_parts
    units each, over shares of the keys (_tile_work), merged through Partials (fp32, a slot of
    64 x (DV + 2) per warpgroup and part before the last)."""
    gl.static_assert(NUM_CONSUMERS == 2 or (NUM_CONSUMERS == 3 and not PINGPONG), "2 consumers, or 3 without ping-pong")
    gl.static_assert(INTRA_OVERLAP or (NUM_STAGES >= 2 and not PINGPONG), "INTRA_OVERLAP off: 2+ stages, no ping-pong")
    BLOCK_M: gl.constexpr = NUM_CONSUMERS * WG_ROWS
    STASH_STRIDES: gl.constexpr = _stash_strides_applies(NUM_CONSUMERS, OUT_KIND)
    num_m = gl.cdiv(seqlen_q, BLOCK_M)
    num_bh = batch * num_heads
    num_units = num_m * num_bh
    if SPLIT_TAIL:
        num_units += (num_units - split_from) * (split_parts - 1)
    sched = (gl.program_id(0), gl.num_programs(0), num_units, num_m, num_bh, section, split_from, split_parts)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [NUM_CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    if DB > 0:
        qb_smem = gl.allocate_shared_memory(qb_desc.dtype, [NUM_CONSUMERS] + qb_desc.block_type.shape,
                                            qb_desc.layout)
        kb_smem = gl.allocate_shared_memory(kb_desc.dtype, [NUM_STAGES] + kb_desc.block_type.shape,
                                            kb_desc.layout)
    else:  # unused
        qb_smem = q_smem
        kb_smem = k_smem
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    if TMA_STORE:  # one output tile per consumer warpgroup, staged for its TMA store
        o_smem = gl.allocate_shared_memory(o_desc.dtype, [NUM_CONSUMERS] + o_desc.block_type.shape, o_desc.layout)
    else:  # unused
        o_smem = v_smem
    q_bar = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    # tile ids from the producer to the consumers: a two-entry ring
    # the next unit id, from the producer to the consumers (_publish_tile)
    tile_ids = gl.allocate_shared_memory(gl.int32, [1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    for i in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(q_bar.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=NUM_CONSUMERS)
    fence_async_shared()

    strides = (stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls, stride_bsb, stride_bss, stride_bsh,
               stride_bsg, stride_sink)
    if STASH_STRIDES:
        strides = _stash_strides(strides)
    # The two consumers' argument tuples are spelled out: built by tuple concatenation in the
    # kernel, the constexprs in them arrive in the partitions as tensors (Gluon 3.6).
    consumer = ((q_smem, qb_smem), (k_smem, kb_smem), v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty,
                tile_ids, o_desc, o_smem, Out, Lse, OutScale, BlockScale, CuSeqlensQ, CuSeqlensK,
                Partials, Sinks, TileCounter + 1, sched, num_heads, seqlen_q, seqlen_k, strides, qk_scale)
    producer = ((q_desc, qb_desc, k_desc, kb_desc, v_desc), (q_smem, qb_smem), (k_smem, kb_smem), v_smem, q_bar,
                q_empty, k_ready, v_ready, kv_empty, tile_ids, sched, TileCounter, num_heads,
                seqlen_q, seqlen_k, CuSeqlensQ, CuSeqlensK)
    # The default partition (the kernel's 4 warps) is consumer 0; the other consumers are 4-warp
    # workers, the producer a 1-warp worker. (Two spelled-out lists: a list built by `+` or from
    # a tuple held in a variable reaches the partitions with its constexprs as plain ints or
    # tensors in Gluon 3.6.)
    if NUM_CONSUMERS == 3:
        gl.warp_specialize([
            (_consumer, (consumer, 0, DB, BLOCK_N, DV, NUM_STAGES, VARLEN, CAUSAL, PINGPONG, STORE_LSE, OUT_KIND,
                         FP8_MAX, GROUP_SIZE, UE8M0, TMA_STORE, HAS_SINKS, LAZY_RESCALE, NUM_CONSUMERS,
                         INTRA_OVERLAP, SPLIT_TAIL)),
            (_consumer, (consumer, 1, DB, BLOCK_N, DV, NUM_STAGES, VARLEN, CAUSAL, PINGPONG, STORE_LSE, OUT_KIND,
                         FP8_MAX, GROUP_SIZE, UE8M0, TMA_STORE, HAS_SINKS, LAZY_RESCALE, NUM_CONSUMERS,
                         INTRA_OVERLAP, SPLIT_TAIL)),
            (_consumer, (consumer, 2, DB, BLOCK_N, DV, NUM_STAGES, VARLEN, CAUSAL, PINGPONG, STORE_LSE, OUT_KIND,
                         FP8_MAX, GROUP_SIZE, UE8M0, TMA_STORE, HAS_SINKS, LAZY_RESCALE, NUM_CONSUMERS,
                         INTRA_OVERLAP, SPLIT_TAIL)),
            (_producer, (producer, GROUP, DA, DB, DV, BLOCK_N, NUM_STAGES, VARLEN, CAUSAL, NUM_CONSUMERS, SPLIT_TAIL)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (consumer, 0, DB, BLOCK_N, DV, NUM_STAGES, VARLEN, CAUSAL, PINGPONG, STORE_LSE, OUT_KIND,
                         FP8_MAX, GROUP_SIZE, UE8M0, TMA_STORE, HAS_SINKS, LAZY_RESCALE, NUM_CONSUMERS,
                         INTRA_OVERLAP, SPLIT_TAIL)),
            (_consumer, (consumer, 1, DB, BLOCK_N, DV, NUM_STAGES, VARLEN, CAUSAL, PINGPONG, STORE_LSE, OUT_KIND,
                         FP8_MAX, GROUP_SIZE, UE8M0, TMA_STORE, HAS_SINKS, LAZY_RESCALE, NUM_CONSUMERS,
                         INTRA_OVERLAP, SPLIT_TAIL)),
            (_producer, (producer, GROUP, DA, DB, DV, BLOCK_N, NUM_STAGES, VARLEN, CAUSAL, NUM_CONSUMERS, SPLIT_TAIL)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
