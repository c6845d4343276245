"""Writes scratch/fx_trace.py: the committed kernel (attnquant/kernels/hopper/forward.py) with
%clock marks per consumer step and per tile (two-consumer kernels: the causal shapes), stored
into the workspace past the scheduler's counter (scripts/trace_consumers.py gives it a big one).
Layout (int32, from TileCounter + 1024): steps[(pid*2+WG)][g % 2048][4], then from
+ 264*8192: tiles[(pid*2+WG)][i % 32][8]. Step events: 0 before the K wait, 1 after the
QK^T and PV issue, 2 after S is ready, 3 after the release. Tile events: 0 unit start, 1 Q ready,
2 after the first block's softmax, 3 the last PV done; where the kernel's epilogue has the
committed shape (else they stay 0): 4 the output values computed, 5 the TMA store issued, 6 the
epilogue returned, 7 the next unit's id read (perf-notes v39).
The marks add ~24 instructions a step and ~10 % to mla's time (perf-notes v38).
    python3 scripts/trace_kernel.py && PYTHONPATH=$PWD python3 scripts/trace_consumers.py mla
    python3 scripts/trace_kernel.py scratch/variant.py scratch/fx_trace_variant.py   (another version)"""
import sys
from pathlib import Path

source, target = (sys.argv[1:] + ["attnquant/kernels/hopper/forward.py", "scratch/fx_trace.py"][len(sys.argv[1:]):])[:2]
src = open(source).read()


def sub(old, new, count=1):
    global src
    assert src.count(old) == count, (old, src.count(old))
    src = src.replace(old, new)


MARK = '''

@gluon.jit
def _mark(ptr, idx, x):
    """%clock into ptr[idx], from the thread holding row 0 of x (a [64] row vector)."""
    c = gl.inline_asm_elementwise("mov.u32 $0, %clock;", "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)
    r = gl.arange(0, x.shape[0], layout=x.type.layout)
    gl.store(ptr + idx + r * 0, c, mask=r == 0)

'''
at = src.index("\n\n@gluon.jit\ndef _pipelined_block")
src = src[:at] + MARK + src[at:]
sub("def _pipelined_block(g, j, n_full, q, ks, v_smem, k_ready, v_ready, kv_empty, always_done, acc,",
    "def _pipelined_block(g, j, n_full, q, ks, v_smem, k_ready, v_ready, kv_empty, always_done, trace, acc,")
sub("gb + j, j, n_full, q, ks, v_smem, k_ready, v_ready, kv_empty, always_done, acc,",
    "gb + j, j, n_full, q, ks, v_smem, k_ready, v_ready, kv_empty, always_done, trace, acc,", 2)
sub("""    slot = g % NUM_STAGES  # K_g and V_{g-1} (see _producer)
    mbarrier.wait(k_ready.index(slot), (g // NUM_STAGES) & 1)
    if PINGPONG:  # my turn""", """    slot = g % NUM_STAGES  # K_g and V_{g-1} (see _producer)
    ts = (g % 2048) * 4
    _mark(trace, ts, m_i)
    mbarrier.wait(k_ready.index(slot), (g // NUM_STAGES) & 1)
    if PINGPONG:  # my turn""")
sub("""    s, p_op = warpgroup_mma_wait(1, deps=(s_tok, p_op))
""", """    _mark(trace, ts + 1, m_i)
    s, p_op = warpgroup_mma_wait(1, deps=(s_tok, p_op))
    _mark(trace, ts + 2, m_i)
""")
sub("""    mbarrier.arrive(kv_empty.index(slot))  # K_g and V_{g-1} consumed
    return acc, p, m_i, l_i, alpha""", """    mbarrier.arrive(kv_empty.index(slot))  # K_g and V_{g-1} consumed
    _mark(trace, ts + 3, m_i)
    return acc, p, m_i, l_i, alpha""")
sub("""def _consumer_tile(qs, ks, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, always_done,
""", """def _consumer_tile(qs, ks, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, always_done, trace, tiles,
""")
sub("""_consumer_tile(qs, ks, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, always_done,
                                       m0,""", """_consumer_tile(qs, ks, v_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, always_done,
                                       trace, tiles, m0,""")
sub("""    pid, nprog, num_units, num_m, num_bh, section, split_from, split_parts = sched
    STASH_STRIDES""", """    pid, nprog, num_units, num_m, num_bh, section, split_from, split_parts = sched
    trace = SplitFlags + 1023 + (pid * 2 + WG) * 8192
    tiles = SplitFlags + 1023 + 264 * 8192 + (pid * 2 + WG) * 256
    STASH_STRIDES""")
sub("""    gb = g0 - j_lo  # ring block of key block j: gb + j

    mbarrier.wait(q_bar.index(WG), tile_idx & 1)
""", """    gb = g0 - j_lo  # ring block of key block j: gb + j

    tt = (tile_idx % 32) * 8
    _mark(tiles, tt, m_i)
    mbarrier.wait(q_bar.index(WG), tile_idx & 1)
    _mark(tiles, tt + 1, m_i)
""")
sub("""        if CAUSAL:
            LOOP_MASK""", """        _mark(tiles, tt + 2, m_i)
        if CAUSAL:
            LOOP_MASK""")
last_pv = """                              is_async=True)
        acc = warpgroup_mma_wait(0, deps=(o_tok,))
"""
sub(last_pv, last_pv + "        _mark(tiles, tt + 3, m_i)\n")
# The epilogue's marks (events 4-7): only where its code has the committed kernel's shape.
EPILOGUE = [
    ("""        else:
            _tile_epilogue(acc, m_i, l_i, epilogue, WG, DV, STORE_LSE, OUT_KIND, FP8_MAX, GROUP_SIZE, UE8M0,
                           TMA_STORE, STASH_STRIDES)
        g += j_hi - j_lo
        i += 1
        unit = _read_tile(tile_ids, tile_full, tile_empty, i)""", """        else:
            _tile_epilogue(acc, m_i, l_i, epilogue, WG, DV, STORE_LSE, OUT_KIND, FP8_MAX, GROUP_SIZE, UE8M0,
                           TMA_STORE, STASH_STRIDES, tiles, (i % 32) * 8)
            _mark(tiles, (i % 32) * 8 + 6, m_i)
        g += j_hi - j_lo
        i += 1
        unit = _read_tile(tile_ids, tile_full, tile_empty, i)
        _mark(tiles, ((i - 1) % 32) * 8 + 7, m_i)"""),
    ("""                _tile_epilogue(acc, m_i, l_i, epilogue, WG, DV, STORE_LSE, OUT_KIND, FP8_MAX, GROUP_SIZE, UE8M0,
                               TMA_STORE, STASH_STRIDES)""", """                _tile_epilogue(acc, m_i, l_i, epilogue, WG, DV, STORE_LSE, OUT_KIND, FP8_MAX, GROUP_SIZE, UE8M0,
                               TMA_STORE, STASH_STRIDES, tiles, 0)"""),
    ("TMA_STORE: gl.constexpr, STASHED_STRIDES: gl.constexpr):", "TMA_STORE: gl.constexpr, STASHED_STRIDES: gl.constexpr, tiles, tt):"),
    ("""                  TMA_STORE, o_layout)
    if STORE_LSE:""", """                  TMA_STORE, o_layout, tiles, tt)
    if STORE_LSE:"""),
    ("UE8M0: gl.constexpr, TMA_STORE: gl.constexpr, layout: gl.constexpr):",
     "UE8M0: gl.constexpr, TMA_STORE: gl.constexpr, layout: gl.constexpr, tiles, tt):"),
    ("""    if OUT_KIND != 3:  # (NVFP4 stored its bytes above)
""", """    if OUT_KIND != 3:  # (NVFP4 stored its bytes above)
        _mark(tiles, tt + 4, row_factor)
"""),
    ("""                tma.async_copy_shared_to_global(o_desc, [o_row, o_col], o_smem)
""", """                tma.async_copy_shared_to_global(o_desc, [o_row, o_col], o_smem)
                _mark(tiles, tt + 5, row_factor)
"""),
]
# (the definition and the two calls of the committed kernel: a version that calls the epilogue
# elsewhere too, like v31's, would miss the new arguments there)
if src.count("_tile_epilogue(") == 3 and all(src.count(old) == 1 for old, _ in EPILOGUE):
    for old, new in EPILOGUE:
        sub(old, new)
else:
    print("epilogue marks left out: the epilogue's code differs from the committed kernel's")
Path(target).parent.mkdir(exist_ok=True)
Path(target).write_text(src)
print("wrote", target)
