"""The consumers' epilogue: one warpgroup's 64 rows of a tile, O / rowsum in the output format
(with the sink folded in), and the LSE. The formats' arithmetic is the portable epilogue's
(kernels/epilogue.py: its element-wise helpers compiled as Gluon functions here); what
differs is the data movement. Whole 64-row tiles leave through shared memory and a TMA store
(TMA_STORE), FP8 as code pairs, NVFP4 as its packed code bytes; a tile cut by its sequence's
end stores from registers.
"""

import struct

import triton.language.core as tlc
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, tma

from .. import epilogue as _portable
from ..constants import LN2_C as LN2, LOG2E_C as LOG2E, WG_ROWS_C as WG_ROWS
from ..record import record

# The portable epilogue's element-wise helpers, compiled as Gluon functions: the saturation,
# the rounding and the scale arithmetic are shared, not restated.
_to_fp8 = gluon.jit(_portable._to_fp8.fn)
_ceil_pow2 = gluon.jit(_portable._ceil_pow2.fn)
_nvfp4_block_scale = gluon.jit(_portable.nvfp4_block_scale.fn)
_e2m1_code = gluon.jit(_portable.e2m1_code.fn)
_nvfp4_scale_offset = gluon.jit(_portable.nvfp4_scale_offset.fn)
_nan_max = gluon.jit(_portable.nan_max.fn)
_nan_if_inf = gluon.jit(_portable.nan_if_inf.fn)
_dequant_scale_inverse = gluon.jit(_portable.dequant_scale_inverse.fn)
_add_sink = gluon.jit(_portable.add_sink.fn)

NUM_STRIDES = gl.constexpr(16)


@record
class Outputs:
    """Where the consumers write: the output's TMA descriptor and staging tiles (TMA_STORE), its
    pointer, the LSE, the format's scales, the sinks, and the strides of all of them (output and
    LSE per batch / head / token, block scales per batch / token / head / group, sinks): a tuple,
    or a shared-memory vector (stash_strides)."""

    o_desc: tma.tensor_descriptor
    o_smem: gl.shared_memory_descriptor
    Out: gl.tensor
    Lse: gl.tensor
    OutScale: gl.tensor
    BlockScale: gl.tensor
    Sinks: gl.tensor
    strides: (tlc.tuple, gl.shared_memory_descriptor)


@gluon.constexpr_function
def stash_strides_applies(consumers, out_kind):
    """Whether the epilogue's strides wait in shared memory (stash_strides) rather than ride in
    the consumer partitions' registers through the key-block loop. Three consumers have 160
    registers a thread and their serial loop needs about all of them: with the per-group FP8
    epilogue's block-scale strides carried through it, ptxas spilled in every key block, 3-4 %
    of the non-causal benchmark shape; the plain (bf16/fp16) one spilled too, at no measurable
    cost. Static FP8 and NVFP4 fit, and FP8 measured ~2 % slower with the strides in shared
    memory, so those keep registers."""
    return consumers == 3 and out_kind in (0, 2)


@gluon.jit
def stash_strides(strides):
    """Kernel body, before the partitions start: the tuple of strides into shared memory (int64),
    entry k by thread k alone (a vector of one entry a thread: threads that stored copies of
    the same entries would be write-write hazards to compute-sanitizer's racecheck). Returns the
    buffer, whose first NUM_STRIDES entries tile_epilogue reads."""
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
    """Entry k of a stash_strides vector (held whole by every thread: no data moves)."""
    idx = gl.arange(0, NUM_STRIDES, layout=v.type.layout)
    return gl.sum(gl.where(idx == k, v, 0), 0)


@gluon.jit
def _strides(outs, STASHED: gl.constexpr):
    """The 11 strides of Outputs.strides, from registers or the shared-memory stash."""
    if STASHED:
        st = outs.strides.slice(0, NUM_STRIDES).load(gl.BlockedLayout([NUM_STRIDES], [32], [gl.num_warps()], [0]))
        return (_stride(st, 0), _stride(st, 1), _stride(st, 2), _stride(st, 3), _stride(st, 4), _stride(st, 5),
                _stride(st, 6), _stride(st, 7), _stride(st, 8), _stride(st, 9), _stride(st, 10))
    else:
        return outs.strides


@record
class RowsOut:
    """Where one warpgroup's 64 rows of a tile go: per row, its output offset, whether it is
    inside the sequence, its block-scale offset (NVFP4: its token index); the tile's head and
    the block scales' group stride; whether all 64 rows are inside (TMA_STORE: the staging tile
    `o_smem` goes to rows o_row.., columns o_col.. of the 2-D (tokens, heads * DV) view; NVFP4:
    heads * DV / 2 bytes)."""

    out_rows: gl.tensor
    row_ok: gl.tensor
    bs_rows: gl.tensor
    head: gl.tensor
    stride_bsg: gl.tensor
    whole: gl.tensor
    o_smem: gl.shared_memory_descriptor
    o_row: gl.tensor
    o_col: gl.tensor


@gluon.jit
def tile_epilogue(acc, m_i, l_i, outs, t, cfg, WG: gl.constexpr):
    """One warpgroup's 64 rows of tile `t` out: O / rowsum in the output format, and the LSE. A
    row that saw no key writes 0 and LSE -inf (with a sink: 0 and the sink's logit)."""
    o_layout: gl.constexpr = acc.type.layout
    s_rows: gl.constexpr = m_i.type.layout
    (stride_ob, stride_os, stride_oh, stride_lb, stride_lh, stride_ls, stride_bsb, stride_bss, stride_bsh, stride_bsg,
     stride_sink) = _strides(outs, cfg.STASH_STRIDES)
    tok0 = (t.q_tok0 + t.m0).to(gl.int64)
    if cfg.HAS_SINKS:  # the head's sink logit joins the denominator (and the LSE) once, here
        sink = gl.load(outs.Sinks + t.h.to(gl.int64) * stride_sink).to(gl.float32) * LOG2E
        m_i, l_i, alpha = _add_sink(m_i, l_i, sink)
    seen = l_i != 0.0  # (a NaN row sum stays NaN: output and LSE NaN)
    inv_l = gl.where(seen, 1.0 / gl.where(seen, l_i, 1.0), 0.0)
    if cfg.HAS_SINKS:
        inv_l = inv_l * alpha
    rows = WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, o_layout))
    row_ok = t.m0 + rows < t.seqlen_q
    out_row0 = t.b.to(gl.int64) * stride_ob + tok0 * stride_os + t.h.to(gl.int64) * stride_oh
    bs_row0 = t.b.to(gl.int64) * stride_bsb + tok0 * stride_bss + t.h.to(gl.int64) * stride_bsh
    dst = RowsOut(out_row0 + rows.to(gl.int64) * stride_os, row_ok, bs_row0 + rows.to(gl.int64) * stride_bss, t.h,
                  stride_bsg, t.m0 + (WG + 1) * WG_ROWS <= t.seqlen_q, outs.o_smem.index(WG), t.q_row + WG * WG_ROWS,
                  t.h * outs.o_desc.block_type.shape[1])
    store_output(acc, gl.convert_layout(inv_l, gl.SliceLayout(1, o_layout)), dst, outs, cfg, o_layout)
    if cfg.STORE_LSE:
        lse_row0 = t.b.to(gl.int64) * stride_lb + t.h.to(gl.int64) * stride_lh + tok0 * stride_ls
        lse = gl.where(seen, (m_i + gl.log2(gl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
        lrows = WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=s_rows)
        gl.store(outs.Lse + lse_row0 + lrows.to(gl.int64) * stride_ls, lse, mask=t.m0 + lrows < t.seqlen_q)


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


@gluon.jit
def _saturate(o, FP8_MAX: gl.constexpr, OUT_KIND: gl.constexpr):
    """_to_fp8 for the FP8 formats (OUT_KIND 1, 2), o itself for the plain one."""
    if OUT_KIND == 0:
        return o
    else:
        return _to_fp8(o, FP8_MAX, 0, 0, False)


@gluon.jit
def store_output(acc, row_factor, dst, outs, cfg, layout: gl.constexpr):
    """O = acc * row_factor in format cfg.OUT_KIND; the portable store_output's arithmetic
    (OUT_KIND 0 plain, 1 static FP8, 2 per-token-group FP8, 3 NVFP4). FP8 groups are masked
    column ranges, DV / GROUP_SIZE of them; NVFP4's 16-channel blocks and channel pairs are
    reshapes of the accumulator layout, whose threads hold adjacent column pairs and whose
    quads hold 8 consecutive columns (the block maximum is a quad shuffle, no shared memory).
    With TMA_STORE a whole tile (all its rows inside the sequence; NVFP4: its packed bytes) goes
    to shared memory and from there by TMA to the output (row stores of 2-byte
    pieces at the head stride cost the load/store unit ~8 sectors per instruction; a TMA store
    writes whole lines)."""
    DV: gl.constexpr = cfg.DV
    OUT_KIND: gl.constexpr = cfg.OUT_KIND
    FP8_MAX: gl.constexpr = cfg.FP8_MAX
    GROUP_SIZE: gl.constexpr = cfg.GROUP_SIZE
    Out = outs.Out
    cols = gl.arange(0, DV, layout=gl.SliceLayout(0, layout))
    ptrs = Out + dst.out_rows[:, None] + cols[None, :]
    mask = dst.row_ok[:, None] & (cols < DV)[None, :]
    acc = _nan_if_inf(acc)  # (an infinite O is a fault, not a value to saturate)
    if OUT_KIND == 0:
        o = acc * row_factor[:, None]
    elif OUT_KIND == 1:
        inv_scale = _dequant_scale_inverse(gl.load(outs.OutScale))
        o = acc * (row_factor * inv_scale)[:, None]
    elif OUT_KIND == 3:
        ROWS: gl.constexpr = acc.shape[0]
        NB: gl.constexpr = DV // 16
        ab = gl.reshape(acc, [ROWS, NB, 16])
        sf_layout: gl.constexpr = gl.SliceLayout(2, ab.type.layout)
        rf = gl.convert_layout(row_factor, gl.SliceLayout(1, sf_layout))[:, None]
        # max|O| = max|acc| x (1 / rowsum) exactly; 1 / rowsum joins the per-block factor
        sf, to_e2m1 = _nvfp4_block_scale(gl.reduce(gl.abs(ab), 2, _nan_max) * rf, gl.load(outs.OutScale), False)
        codes = gl.reshape(_e2m1_code(ab * gl.expand_dims(to_e2m1 * rf, 2)), [ROWS, DV // 2, 2])
        lo, hi = gl.split(codes)
        packed = (lo | (hi << 4)).to(gl.uint8)
        # the swizzled offset is a row part plus a column part (head is one per tile here)
        blk = dst.head * NB + gl.arange(0, NB, layout=gl.SliceLayout(0, sf_layout))
        m = gl.convert_layout(dst.bs_rows, gl.SliceLayout(1, sf_layout))
        sf_ok = gl.convert_layout(dst.row_ok, gl.SliceLayout(1, sf_layout))
        row_part = _nvfp4_scale_offset(m, 0, dst.stride_bsg)
        col_part = _nvfp4_scale_offset(0, blk, dst.stride_bsg)
        gl.store(outs.BlockScale + row_part[:, None] + col_part[None, :], sf.to(outs.BlockScale.dtype.element_ty),
                 mask=sf_ok[:, None] & (blk >= 0)[None, :])  # (the mask spelled out in full shape)
        if cfg.TMA_STORE:
            if dst.whole:
                _tma_store_tile(packed, dst, outs, OUT_KIND, FP8_MAX)
            else:
                _store_nvfp4_codes(packed, dst, Out, DV)
        else:
            _store_nvfp4_codes(packed, dst, Out, DV)
    else:
        o = acc * row_factor[:, None]
        inv_scales = gl.full([acc.shape[0], DV], 1.0, gl.float32, layout)
        for g in gl.static_range(DV // GROUP_SIZE):
            in_g = ((cols >= g * GROUP_SIZE) & (cols < (g + 1) * GROUP_SIZE))[None, :]
            sc = _nan_max(gl.reduce(gl.where(in_g, gl.abs(o), 0.0), 1, _nan_max), 1e-10) / FP8_MAX
            if cfg.UE8M0:
                sc = _ceil_pow2(sc)
            gl.store(outs.BlockScale + dst.bs_rows + g * dst.stride_bsg, sc, mask=dst.row_ok)
            # one division per row and group, then multiplies: a division per element (div.full,
            # ~8 instructions) was most of this epilogue; exact for UE8M0's powers of two
            inv_scales = gl.where(in_g, (1.0 / sc)[:, None], inv_scales)
        o = o * inv_scales
    if OUT_KIND != 3:  # (NVFP4 stored its bytes above)
        # Two register-store branches: with `if TMA_STORE and whole` Gluon would also compile
        # the TMA branch when TMA_STORE is off, against the dummy o_desc / o_smem.
        if cfg.TMA_STORE:
            if dst.whole:
                _tma_store_tile(o, dst, outs, OUT_KIND, FP8_MAX)
            else:
                gl.store(ptrs, _saturate(o, FP8_MAX, OUT_KIND).to(Out.dtype.element_ty), mask=mask)
        else:
            gl.store(ptrs, _saturate(o, FP8_MAX, OUT_KIND).to(Out.dtype.element_ty), mask=mask)


@gluon.jit
def _tma_store_tile(x, dst, outs, OUT_KIND: gl.constexpr, FP8_MAX: gl.constexpr):
    """A whole 64-row tile out through the warpgroup's staging tile and a TMA store. x: O scaled
    for the format (plain, or FP8: converted here as code pairs, through a 16-bit view of the
    same bytes, the same swizzle), or NVFP4's packed code bytes."""
    o_smem = dst.o_smem
    tma.store_wait(0)  # this warpgroup's previous tile has left o_smem
    if OUT_KIND == 0:
        o_smem.store(x.to(o_smem.dtype))
    elif OUT_KIND == 3:
        o_smem.store(x)
    else:
        pair_layout: gl.constexpr = gl.NVMMASharedLayout(o_smem.layout.swizzle_byte_width, 16)
        o_smem._reinterpret(gl.int16, [x.shape[0], x.shape[1] // 2], pair_layout).store(_fp8_pairs(x, FP8_MAX))
    fence_async_shared()  # the generic-proxy writes, visible to the TMA (async proxy)
    tma.async_copy_shared_to_global(outs.o_desc, [dst.o_row, dst.o_col], o_smem)


@gluon.jit
def _store_nvfp4_codes(packed, dst, Out, DV: gl.constexpr):
    """NVFP4's packed code bytes [rows, DV / 2] from registers (rows inside the sequence)."""
    p_layout: gl.constexpr = packed.type.layout
    pairs = gl.arange(0, DV // 2, layout=gl.SliceLayout(0, p_layout))
    p_rows = gl.convert_layout(dst.out_rows, gl.SliceLayout(1, p_layout))
    p_ok = gl.convert_layout(dst.row_ok, gl.SliceLayout(1, p_layout))
    gl.store(Out + p_rows[:, None] + pairs[None, :], packed, mask=p_ok[:, None] & (pairs < DV // 2)[None, :])
