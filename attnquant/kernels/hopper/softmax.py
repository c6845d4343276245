"""The consumers' online softmax, in the log2 domain: one key block's scores to P (16-bit, the
PV wgmma's A operand), the running row maximum and sum, and O's rescale.

Scores come straight from the QK^T wgmma (fp32, the wgmma accumulator layout); the softmax
scale times log2(e) is folded into one multiply-add before exp2. The running max follows FA4's
lazy rescale (LAZY_RESCALE): it moves only when a block's maximum passes it by more than 2^8,
and a warp whose rows all kept theirs skips O's rescale.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

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


# _softmax_step's MASKED: False (no key of the block is masked), True (the causal diagonal or the
# ragged end of the keys), or MASK_FROM_N_FULL: masked where j >= n_full, decided by a branch.
MASK_FROM_N_FULL = gl.constexpr(2)


@gluon.jit
def mask_scores(s, j, rows, cfg):
    """-inf where key block j's keys are past the sequence or (CAUSAL) past a row's diagonal."""
    keys = j * cfg.BLOCK_N + gl.arange(0, cfg.BLOCK_N, layout=gl.SliceLayout(0, cfg.S_LAYOUT))
    ok = (keys < rows.seqlen_k)[None, :]
    if cfg.CAUSAL:
        ok = ok & (keys[None, :] <= (rows.q_pos + rows.diag)[:, None])
    return gl.where(ok, s, float("-inf"))


@gluon.jit
def softmax_step(s, m_i, l_i, j, rows, cfg, MASKED: gl.constexpr):
    """Online softmax of score block j (the rows' WgRows): returns (p, m_new, l_new, alpha) with
    p = exp2(s * qk_scale - m) in the inputs' 16-bit dtype (half the registers of fp32 while it
    waits for its PV), alpha = exp2(m_old - m) (0-safe for rows with no key yet).
    LAZY_RESCALE (FA4's conditional rescale): m moves only when the block's maximum passes it
    by more than RESCALE_LOG2, so p <= 2^RESCALE_LOG2 (exact enough in 16 bits, no overflow in
    fp32) and alpha is exactly 1 on most blocks, whose O rescale is then skipped (rescale_o)."""
    # A NaN or +inf score makes its row NaN through the max and exp2 at no cost. A -inf score (an
    # infinite q or k element) drops its key instead: no loop checks for it, since one FMA a
    # score is 64 instructions of a ~470-530 instruction key-block loop and cost 8-13 % (docs/
    # spec.md "Known limits"). In the serial loop S, O and the max tree's first level (32
    # temporaries) do not fit the 160 registers a thread has together: its unmasked blocks stop the
    # tree after two levels (spill-free in every variant; the masked loop keeps the full tree).
    TREE: gl.constexpr = None if cfg.INTRA_OVERLAP or MASKED else 2
    qk_scale = rows.qk_scale
    if MASKED == MASK_FROM_N_FULL:
        # The row max of the unmasked scores first, recomputed in the masked branch: with the
        # branch ahead of it, ptxas moves the PV wait above the max tree.
        m_raw = row_max(s)
        if j >= rows.n_full:
            s = mask_scores(s, j, rows, cfg)
            m_raw = row_max(s)
    else:
        if MASKED:
            s = mask_scores(s, j, rows, cfg)
        m_raw = row_max(s, TREE)
    m_blk = m_raw * qk_scale
    if cfg.LAZY_RESCALE:
        m_new = gl.where(m_blk > m_i + RESCALE_LOG2, m_blk, m_i)
    else:
        m_new = gl.maximum(m_i, m_blk)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_new = l_i * alpha + gl.sum(p, 1)
    return pack_16bit(p, cfg.DTYPE), m_new, l_new, alpha


@gluon.jit
def rescale_o(acc, alpha, LAZY_RESCALE: gl.constexpr):
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
def row_max(s, LEVELS: gl.constexpr = None):
    """gl.max(s, 1) as a tree: Triton reduces a thread's 32 values of a row in one chain of
    dependent max instructions (SASS: FMNMX x31 ahead of every exp2 of the block). Here the
    column halves are maxed elementwise while the halving bit is a register bit of the wgmma
    layout (columns 8 and up), then gl.max finishes the last 8 columns (one register pair,
    two quad shuffles): the same 31 instructions, 6 deep instead of 31. LEVELS: at most this
    many halvings (each level's temporaries are registers too); None: all of them."""
    n: gl.constexpr = s.shape[1]
    row_layout: gl.constexpr = gl.SliceLayout(1, s.type.layout)
    halvings: gl.constexpr = n.bit_length() - 4 if LEVELS is None else min(LEVELS, n.bit_length() - 4)
    for _ in gl.static_range(halvings):  # n -> 8 at most
        a, b = gl.split(gl.permute(gl.reshape(s, [s.shape[0], 2, s.shape[1] // 2]), (0, 2, 1)))
        s = gl.maximum(a, b)
    return gl.convert_layout(gl.max(s, 1), row_layout)  # (the same rows to the same threads: no data moves)


@gluon.jit
def pack_16bit(x, dtype: gl.constexpr):
    """x.to(dtype) for a 16-bit float dtype, two neighbouring elements per cvt, the first in the
    low half: the register image the PV wgmma reads P in. x.to() lets ptxas pack the pair the
    other way round and swap the halves back with one PRMT per register (32 per key block)."""
    if dtype == gl.bfloat16:
        return gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.bfloat16, is_pure=True,
                                         pack=2)
    else:
        return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.float16, is_pure=True,
                                         pack=2)
