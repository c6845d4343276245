"""Portable flash-attention forward (Triton tl.*): one kernel, constexpr variants.

One program computes a tile of BLOCK_M query rows against one KV head. Rows are
GQA-packed: row r of a (batch, kv-head) problem is query position r // GROUP of
query head kv_head * GROUP + r % GROUP, so the GROUP heads sharing a KV head share
every K/V load (decode with few query tokens still fills a tile).

Variants, all constexpr: varlen q/k (cu_seqlens), seqused_k, paged K/V (block
table), K/V address mode (block pointers or pointer tensors), window left/right
bounds (causal = right bound 0), softcap, learnable sinks, and the output epilogue (OUT_KIND).
Split-KV needs no variant: program_id(2) takes a contiguous share of the key blocks,
and the host passes a float32 workspace as Out (plain epilogue + LSE) for the
combine kernel, which quantizes after the merge.

Masking follows Triton's fused-attention tutorial: the key blocks of a tile split
into at most three ranges - masked blocks before the fully visible ones (window
left edge), fully visible blocks with no mask arithmetic at all, and masked blocks
after them (the causal diagonal / right window edge / the ragged end of the keys).
Scores live in the log2 domain: exp2 with softmax_scale * log2(e) folded in.
"""

import triton
import triton.language as tl
from triton.language.core import constexpr
from triton.language.extra.cuda import gdc_launch_dependents

from ..constants import LN2_C as LN2, LOG2E_C as LOG2E
from ..epilogue import add_sink, nan_if_inf, store_output
from ..record import record, value


@record
class Tiles:
    """The compiled variant's tile shape and key-side options, every field a constexpr: key
    block, head-dim pieces (D = BLOCK_DA + BLOCK_DB; Dv = DV padded to BLOCK_DV), the K/V
    address mode (paged and its page size, block pointers) and the score options."""

    BLOCK_N: constexpr
    BLOCK_DA: constexpr
    BLOCK_DB: constexpr
    DV: constexpr
    BLOCK_DV: constexpr
    PAGED: constexpr
    PAGE_SIZE: constexpr
    BLOCK_PTR: constexpr
    WINDOW_LEFT: constexpr
    WINDOW_RIGHT: constexpr
    HAS_SOFTCAP: constexpr


@record
class KeySource:
    """The K and V of one (batch, KV head) as the key-block loop reads them: base pointers (the
    cache itself when paged, with this sequence's block-table row), row and page strides, the
    in-block offsets of the pointer-tensor address mode, the head-dim column offsets, and the
    sequence's key count."""

    K: value
    V: value
    block_table: value
    stride_kb: value
    stride_ks: value
    stride_vb: value
    stride_vs: value
    k_off: value
    k2_off: value
    v_off: value
    offs_da: value
    offs_db: value
    offs_dv: value
    seqlen_k: value


@record
class ScoreRule:
    """How a q.k product becomes a log2-domain score and which keys a row sees: the scale
    (softmax_scale * log2(e), descales folded in), softcap's two factors, the window bounds,
    and q_diag[r] = query position of row r + seqlen_k - seqlen_q, the last key row r sees
    under a causal mask (bottom-right alignment)."""

    qk_scale: value
    softcap_in: value
    softcap_out: value
    window_left: value
    window_right: value
    q_diag: value


@triton.jit
def _block_start(base, stride_b, kv, blk, cfg):
    """(base, rows, row) locating key block `blk`: it starts `row` rows into the `rows`
    readable rows at `base`. Contiguous: the sequence. Paged (PAGE_SIZE >= BLOCK_N): the
    block's page, one table lookup; rows past seqlen_k in a page are cache memory,
    readable (their scores are masked)."""
    start = blk * cfg.BLOCK_N
    if cfg.PAGED:
        page = tl.load(kv.block_table + start // cfg.PAGE_SIZE).to(tl.int64)
        return base + page * stride_b, cfg.PAGE_SIZE, start % cfg.PAGE_SIZE
    else:
        return base, kv.seqlen_k, start


@triton.jit
def _gather_rows(stride_b, stride_s, kv, offs_n, cfg):
    """Row offsets of keys offs_n when pages are smaller than a block: a per-key table gather."""
    page = tl.load(kv.block_table + offs_n // cfg.PAGE_SIZE, mask=offs_n < kv.seqlen_k, other=0).to(tl.int64)
    return page * stride_b + (offs_n % cfg.PAGE_SIZE).to(tl.int64) * stride_s


@triton.jit
def _load_k_block(kv, blk, offs_n, offs_d, k_off, D_OFF: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASKED: tl.constexpr, cfg):
    """K^T of key block `blk`, head-dim columns [D_OFF, D_OFF + BLOCK_D): (BLOCK_D, BLOCK_N).

    Three address modes. BLOCK_PTR: a block pointer on the block's rows, no per-element
    pointer tensor (for 16-row decode tiles the pointer tensors alone spilled: ptxas
    reported 22 KB of spill stores, against 72 B with block pointers). Else a scalar base
    plus precomputed in-block offsets `k_off`, or a per-key gather for small pages.
    Under MASKED, keys past seqlen_k read as 0 (or as cache rows of the same page).
    """
    if cfg.PAGED and cfg.PAGE_SIZE < cfg.BLOCK_N:
        rows = _gather_rows(kv.stride_kb, kv.stride_ks, kv, offs_n, cfg)
        ptrs = kv.K + rows[None, :] + offs_d[:, None]
        if MASKED:
            return tl.load(ptrs, mask=(offs_n < kv.seqlen_k)[None, :], other=0.0)
        return tl.load(ptrs)
    base, n_rows, row = _block_start(kv.K, kv.stride_kb, kv, blk, cfg)
    if cfg.BLOCK_PTR:
        bp = tl.make_block_ptr(base, (cfg.BLOCK_DA + cfg.BLOCK_DB, n_rows), (1, kv.stride_ks), (D_OFF, row),
                               (BLOCK_D, cfg.BLOCK_N), (0, 1))
        if MASKED:
            return tl.load(bp, boundary_check=(1,), padding_option="zero")
        return tl.load(bp)
    ptrs = base + tl.cast(row, tl.int64) * kv.stride_ks + k_off
    if MASKED:
        return tl.load(ptrs, mask=(offs_n < kv.seqlen_k)[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _load_v_block(kv, blk, offs_n, MASKED: tl.constexpr, cfg):
    """V of key block `blk`: (BLOCK_N, BLOCK_DV), zero past DV and (MASKED) past seqlen_k."""
    if cfg.PAGED and cfg.PAGE_SIZE < cfg.BLOCK_N:
        rows = _gather_rows(kv.stride_vb, kv.stride_vs, kv, offs_n, cfg)
        ptrs = kv.V + rows[:, None] + kv.offs_dv[None, :]
    else:
        base, n_rows, row = _block_start(kv.V, kv.stride_vb, kv, blk, cfg)
        if cfg.BLOCK_PTR:
            bp = tl.make_block_ptr(base, (n_rows, cfg.DV), (kv.stride_vs, 1), (row, 0), (cfg.BLOCK_N, cfg.BLOCK_DV),
                                   (1, 0))
            if MASKED and cfg.PAGED:
                # A page's rows past seqlen_k are whatever the cache holds there (stale or never
                # written: possibly NaN, and 0 * NaN = NaN in the PV product): zero them.
                v = tl.load(bp, boundary_check=(0, 1), padding_option="zero")
                return tl.where((offs_n < kv.seqlen_k)[:, None], v, 0.0)
            if MASKED or cfg.BLOCK_DV != cfg.DV:
                return tl.load(bp, boundary_check=(0, 1), padding_option="zero")
            return tl.load(bp)
        ptrs = base + tl.cast(row, tl.int64) * kv.stride_vs + kv.v_off
    if MASKED:
        return tl.load(ptrs, mask=(offs_n < kv.seqlen_k)[:, None] & (kv.offs_dv < cfg.DV)[None, :], other=0.0)
    if cfg.BLOCK_DV != cfg.DV:
        return tl.load(ptrs, mask=(kv.offs_dv < cfg.DV)[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _f16_exponent(qa, qb):
    """e such that q * 2^-e has its largest finite magnitude in [2^14, 2^15] (fp16 holds it;
    NaN and inf stay what they are), clamped to [-126, 126]; 0 for a q with no finite nonzero."""
    a = tl.abs(qa.to(tl.float32))
    b = tl.abs(qb.to(tl.float32))
    amax = tl.maximum(tl.max(tl.max(tl.where(a < float("inf"), a, 0.0), 1), 0),
                      tl.max(tl.max(tl.where(b < float("inf"), b, 0.0), 1), 0))
    e = tl.where(amax > 0.0, tl.ceil(tl.log2(tl.maximum(amax, 1e-30))) - 15.0, 0.0)
    return tl.minimum(tl.maximum(e, -126.0), 126.0).to(tl.int32)


@triton.jit
def _pow2(e):
    """2^e, exactly, for an int32 e in [-126, 127]."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _attn_block_range(acc, l_i, m_i, qa, qb, kv, rule, blk_lo, blk_hi, MASKED: tl.constexpr, cfg):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [blk_lo, blk_hi) of `kv`,
    scored by `rule`; MASKED: the blocks need the sequence-end / window mask."""
    for blk in range(blk_lo, blk_hi):
        offs_n = blk * cfg.BLOCK_N + tl.arange(0, cfg.BLOCK_N)
        k = _load_k_block(kv, blk, offs_n, kv.offs_da, kv.k_off, 0, cfg.BLOCK_DA, MASKED, cfg)
        s = tl.dot(qa, k.to(qa.dtype))  # (FP8 K: converted in registers)
        if cfg.BLOCK_DB > 0:  # head dims like 192 = 128 + 64: a second dot, no padding waste
            k2 = _load_k_block(kv, blk, offs_n, kv.offs_db, kv.k2_off, cfg.BLOCK_DA, cfg.BLOCK_DB, MASKED, cfg)
            s = tl.dot(qb, k2.to(qa.dtype), s)
        # An infinite score comes from an infinite q or k: NaN, not a key of weight 0 (-inf) or
        # a finite softcap value (SPEC: non-finite inputs give NaN rows). Masked keys' scores
        # are replaced below, so a key a row does not see cannot make it NaN.
        s = nan_if_inf(s)

        if cfg.HAS_SOFTCAP:
            # softcap * tanh(s * scale / softcap), times log2(e); tanh through exp2 so the
            # same code runs in the interpreter.
            x = s * rule.softcap_in
            s = rule.softcap_out * (1.0 - 2.0 / (1.0 + tl.math.exp2(x * (2.0 * LOG2E))))
            scale = 1.0
        else:
            scale = rule.qk_scale
        if MASKED:
            s = s * scale
            ok = (offs_n < kv.seqlen_k)[None, :]
            if cfg.WINDOW_RIGHT:
                ok = ok & (offs_n[None, :] <= rule.q_diag[:, None] + rule.window_right)
            if cfg.WINDOW_LEFT:
                ok = ok & (offs_n[None, :] >= rule.q_diag[:, None] - rule.window_left)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf; subtract 0 instead (p = 0).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
            m_use = m_new
            p = tl.math.exp2(s * scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_v_block(kv, blk, offs_n, MASKED, cfg).to(qa.dtype)
        acc = tl.dot(p.to(qa.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "num_splits", "window_left", "window_right"])
def attn_fwd_kernel(
    Q, K, V, Out, Lse, OutScale, BlockScale, BlockTable, CuSeqlensQ, CuSeqlensK, SeqUsedK, Sinks,
    QDescale, KDescale, VDescale,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_o_split, stride_ob, stride_os, stride_oh,
    stride_l_split, stride_lb, stride_lh, stride_ls,
    stride_bsb, stride_bss, stride_bsh, stride_bsg,
    stride_bt, stride_sink,
    stride_qd_b, stride_qd_h, stride_kd_b, stride_kd_h, stride_vd_b, stride_vd_h,
    seqlen_q, seqlen_k, num_heads_kv, num_splits,
    qk_scale, softcap_in, softcap_out, window_left, window_right,
    GROUP: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_PTR: tl.constexpr, F16_DOTS: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_Q_DESCALE: tl.constexpr, HAS_K_DESCALE: tl.constexpr,
    HAS_V_DESCALE: tl.constexpr, STORE_LSE: tl.constexpr,
    OUT_KIND: tl.constexpr, FP8_MAX: tl.constexpr, ROUND_MANT: tl.constexpr, ROUND_EMIN: tl.constexpr,
    EMULATE_ROUNDING: tl.constexpr, GROUP_SIZE: tl.constexpr, UE8M0: tl.constexpr,
):
    # Grid (m-tiles, batch * kv-heads, splits), started x-fastest: the tiles of one KV head
    # run together (its K/V stays in L2), each head's last m-tiles (under a causal mask
    # the longest) first, so the grid ends on short tiles.
    if LAUNCH_DEPENDENTS:  # (the split combine, launched as a programmatic dependent, may start now)
        gdc_launch_dependents()
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // num_heads_kv
    h_kv = pid_bh % num_heads_kv

    # ---- sequence extents of batch b -------------------------------------------------
    if VARLEN_Q:
        q_start = tl.load(CuSeqlensQ + b)
        seqlen_q = tl.load(CuSeqlensQ + b + 1) - q_start
    else:
        q_start = 0
    if pid_m * BLOCK_M >= seqlen_q * GROUP:
        return
    if VARLEN_K:
        k_start = tl.load(CuSeqlensK + b)
        seqlen_k = tl.load(CuSeqlensK + b + 1) - k_start
    if HAS_SEQUSED:
        # Lengths beyond the cache cannot be rejected without a host sync; clamp them.
        seqlen_k = tl.minimum(tl.load(SeqUsedK + b), seqlen_k)

    # ---- rows of this tile: (query position, query head), GQA-packed ---------------
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = offs_m // GROUP
    head = h_kv * GROUP + offs_m % GROUP
    row_ok = pos < seqlen_q
    offs_da = tl.arange(0, BLOCK_DA)
    if BLOCK_DB > 0:
        offs_db = BLOCK_DA + tl.arange(0, BLOCK_DB)
    else:
        offs_db = offs_da  # unused
    offs_dv = tl.arange(0, BLOCK_DV)

    q_rows = Q + b.to(tl.int64) * stride_qb + (q_start + pos).to(tl.int64) * stride_qs \
        + head.to(tl.int64) * stride_qh
    # The dots run in q's 16-bit dtype, or bf16 when q is FP8, or fp16 with F16_DOTS (FP8 K/V): FP8
    # inputs are converted in registers (their descales fold into the scales below), K/V blocks
    # as they are loaded.
    COMPUTE: tl.constexpr = tl.float16 if F16_DOTS else (
        tl.bfloat16 if Q.dtype.element_ty == tl.float8e4nv else Q.dtype.element_ty)
    qa = tl.load(q_rows[:, None] + offs_da[None, :], mask=row_ok[:, None], other=0.0)
    if BLOCK_DB > 0:
        qb = tl.load(q_rows[:, None] + offs_db[None, :], mask=row_ok[:, None], other=0.0)
    else:
        qb = qa
    if F16_DOTS and Q.dtype.element_ty != tl.float16 and Q.dtype.element_ty != tl.float8e4nv:
        # a wider q into fp16 by an exact power of two; the inverse joins the score scale
        e = _f16_exponent(qa, qb)
        qa = (qa.to(tl.float32) * _pow2(-e)).to(COMPUTE)
        qb = (qb.to(tl.float32) * _pow2(-e)).to(COMPUTE)
        qk_scale *= _pow2(e)
        softcap_in *= _pow2(e)
    else:
        qa = qa.to(COMPUTE)
        qb = qb.to(COMPUTE)
    # FP8 inputs: the real scores are s * q_descale * k_descale, the real values V * v_descale (one
    # scalar each for this program's (batch, kv head)): folded into the score scale and into the
    # final 1 / rowsum
    if HAS_Q_DESCALE:
        qk_descale = tl.load(QDescale + b * stride_qd_b + h_kv * stride_qd_h)
        qk_scale *= qk_descale
        softcap_in *= qk_descale
    if HAS_K_DESCALE:
        qk_descale = tl.load(KDescale + b * stride_kd_b + h_kv * stride_kd_h)
        qk_scale *= qk_descale
        softcap_in *= qk_descale

    K_base = K + h_kv.to(tl.int64) * stride_kh
    V_base = V + h_kv.to(tl.int64) * stride_vh
    if not PAGED:
        K_base += b.to(tl.int64) * stride_kb
        V_base += b.to(tl.int64) * stride_vb
        if VARLEN_K:
            K_base += k_start.to(tl.int64) * stride_ks
            V_base += k_start.to(tl.int64) * stride_vs
    BT_row = BlockTable + b.to(tl.int64) * stride_bt
    offs_n0 = tl.arange(0, BLOCK_N)
    k_off = offs_n0[None, :] * stride_ks + offs_da[:, None]
    k2_off = offs_n0[None, :] * stride_ks + offs_db[:, None]
    v_off = offs_n0[:, None] * stride_vs + offs_dv[None, :]

    # ---- key-block ranges: masked | fully visible | masked -----------------------
    diag = seqlen_k - seqlen_q
    q_diag = pos + diag
    p_lo = pid_m * BLOCK_M // GROUP
    p_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, seqlen_q - 1)
    lo = tl.full([], 0, tl.int32)
    full_lo = tl.full([], 0, tl.int32)
    hi = seqlen_k + lo
    full_hi = seqlen_k + lo
    if WINDOW_RIGHT:
        hi = tl.maximum(tl.minimum(seqlen_k, p_hi + diag + window_right + 1), 0)
        full_hi = tl.maximum(tl.minimum(seqlen_k, p_lo + diag + window_right + 1), 0)
    if WINDOW_LEFT:
        lo = tl.minimum(tl.maximum(0, p_lo + diag - window_left), seqlen_k)
        full_lo = tl.minimum(tl.maximum(0, p_hi + diag - window_left), seqlen_k)
    lo_blk = lo // BLOCK_N
    hi_blk = tl.maximum(tl.cdiv(hi, BLOCK_N), lo_blk)
    full_lo_blk = tl.cdiv(full_lo, BLOCK_N)
    full_hi_blk = full_hi // BLOCK_N
    if full_hi_blk <= full_lo_blk:  # no fully visible block: everything goes to stage 1
        full_lo_blk = hi_blk
        full_hi_blk = hi_blk

    # split-KV: this program's contiguous share of [lo_blk, hi_blk)
    per_split = tl.cdiv(hi_blk - lo_blk, num_splits)
    s_lo = lo_blk + split * per_split
    s_hi = tl.minimum(s_lo + per_split, hi_blk)

    cfg = Tiles(BLOCK_N, BLOCK_DA, BLOCK_DB, DV, BLOCK_DV, PAGED, PAGE_SIZE, BLOCK_PTR, WINDOW_LEFT, WINDOW_RIGHT,
                HAS_SOFTCAP)
    kv = KeySource(K_base, V_base, BT_row, stride_kb, stride_ks, stride_vb, stride_vs, k_off, k2_off, v_off, offs_da,
                   offs_db, offs_dv, seqlen_k)
    rule = ScoreRule(qk_scale, softcap_in, softcap_out, window_left, window_right, q_diag)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    for stage in tl.static_range(3):  # masked | fully visible (no mask arithmetic) | masked
        if stage == 0:
            stage_lo, stage_hi = lo_blk, full_lo_blk
        elif stage == 1:
            stage_lo, stage_hi = full_lo_blk, full_hi_blk
        else:
            stage_lo, stage_hi = full_hi_blk, hi_blk
        acc, l_i, m_i = _attn_block_range(acc, l_i, m_i, qa, qb, kv, rule, tl.maximum(stage_lo, s_lo),
                                          tl.minimum(stage_hi, s_hi), stage != 1, cfg)

    # ---- epilogue: a row that saw no key writes 0 and LSE -inf; a NaN row sum (a non-finite
    # input in what the row saw) stays NaN in both ------------------------------------
    if HAS_SINKS:  # (a split's partials leave the sink to the combine: the host passes it there)
        sink = tl.load(Sinks + head.to(tl.int64) * stride_sink, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
        m_i, l_i, alpha = add_sink(m_i, l_i, sink)
        acc = acc * alpha[:, None]
    seen = l_i != 0.0
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    if HAS_V_DESCALE:
        inv_l *= tl.load(VDescale + b * stride_vd_b + h_kv * stride_vd_h)
    tok = (q_start + pos).to(tl.int64)
    o_rows = Out + split.to(tl.int64) * stride_o_split + b.to(tl.int64) * stride_ob \
        + tok * stride_os + head.to(tl.int64) * stride_oh
    bs_rows = b.to(tl.int64) * stride_bsb + tok * stride_bss + head.to(tl.int64) * stride_bsh
    store_output(acc, inv_l, o_rows, offs_dv, row_ok, OutScale, BlockScale, bs_rows, head, stride_bsg,
                 DV, OUT_KIND, FP8_MAX, ROUND_MANT, ROUND_EMIN, EMULATE_ROUNDING, GROUP_SIZE, UE8M0)
    if STORE_LSE:
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
        l_ptrs = Lse + split.to(tl.int64) * stride_l_split + b.to(tl.int64) * stride_lb \
            + head.to(tl.int64) * stride_lh + tok * stride_ls
        tl.store(l_ptrs, lse, mask=row_ok)
