"""The output epilogue shared by the forward kernel and the split combine kernel.

Both end with an fp32 tile `acc` (rows x BLOCK_DV) and a per-row factor (1 / softmax
denominator) and must write one output format, chosen by the OUT_KIND constexpr
(see attnquant.quant): the format is an epilogue variant, not another kernel.
Everything is row-local, so the caller only supplies pointers and masks.

Non-finite values are never hidden (SPEC "Non-finite values"): every clamp and every
maximum here propagates NaN (max.NaN / min.NaN, the same one instruction as the plain
ones), an infinite output value becomes NaN before it could saturate, and a dequant scale
that is not a finite positive number makes the whole output NaN. FP8 stores NaN as the
format's NaN code; NVFP4, which has none, as the block's e4m3 scale byte 0x7F.
"""

import torch
import triton
import triton.language as tl

from .constants import NVFP4_BLOCK_C as NVFP4_BLOCK, OUT_FP8_STATIC, OUT_NVFP4, OUT_PLAIN, OutKind


NAN_PROPAGATE = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def nan_max(a, b):
    """max(a, b), NaN if either is NaN (a reduction's combine function: tl.max's own combine
    drops NaN on the GPU, while the interpreter's np.maximum keeps it)."""
    return tl.maximum(a, b, propagate_nan=NAN_PROPAGATE)


@triton.jit
def nan_if_inf(x):
    """x, or NaN where x is +-inf (or NaN): x * 0 + x is x for every finite x and NaN
    otherwise, one FMA. Applied where an infinity would otherwise vanish: an infinite score
    would give its key weight 0 (-inf) or turn into a finite softcap; an infinite output
    would saturate to the format's largest value."""
    return tl.fma(x, 0.0, x)


@triton.jit
def add_sink(m_i, l_i, sink):
    """Fold a learnable sink logit (gpt-oss; log2 units, like m_i) into a row's running maximum
    m_i and sum l_i as one more score whose value is 0. Returns (m, l, alpha): the new maximum
    and sum, and the factor alpha for the row's accumulated O (whose weights were relative to
    m_i). A row that saw no key gets l = 1 (O = 0, LSE = the sink); a sink of -inf changes
    nothing; a NaN sink makes the row NaN."""
    m = tl.maximum(m_i, sink, propagate_nan=NAN_PROPAGATE)  # (no nested jit call: Gluon compiles this too)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    alpha = tl.math.exp2(m_i - m_use)
    return m, l_i * alpha + tl.math.exp2(sink - m_use), alpha


@triton.jit
def dequant_scale_inverse(s):
    """1 / s for a dequant scale read on the device; NaN unless s is finite and > 0 (SPEC: such
    a scale makes every output element NaN, as no host check is possible)."""
    return tl.where((s > 0.0) & (s < float("inf")), 1.0 / s, float("nan"))


@triton.jit
def round_to_fp8_grid(y, MANT: tl.constexpr, EMIN: tl.constexpr):
    """Round fp32 `y` (already clamped to the format's range) to nearest-even on the grid of a
    float format with MANT mantissa bits and smallest normal exponent EMIN (FP8; bf16 too).

    Only used under TRITON_INTERPRET: Triton 3.6's interpreter converts fp32 -> fp8
    without carrying a mantissa round-up into the exponent (126.8 -> 64 in e4m3) and fp32 ->
    bf16 by truncation, but converts exactly representable values exactly. On a GPU the
    hardware cvt rounds correctly and this is compiled out.
    """
    a = tl.abs(y)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN)  # below the smallest normal the grid spacing is fixed
    ulp = ((e - MANT + 127) << 23).to(tl.float32, bitcast=True)
    t = a / ulp  # exact: division by a power of two
    r = (t + 8388608.0) - 8388608.0  # round-to-nearest-even of t (0 <= t < 2**23)
    # The interpreter's fp32 -> fp8 conversion keeps a NaN's top mantissa bits and rounds on the
    # next one, which for most NaNs spells a finite or infinite value (e4m3: 384): hand it the NaN
    # whose top MANT mantissa bits are ones and whose rounding bit is zero.
    nan = tl.full(y.shape, 0x7F800000 | (((1 << MANT) - 1) << (23 - MANT)), tl.int32).to(tl.float32, bitcast=True)
    return tl.where(y != y, nan, tl.where(y < 0, -r * ulp, r * ulp))


@triton.jit
def _ceil_pow2(x):
    """2 ** ceil(log2(x)) for positive normal fp32 x, exactly (on the bits, not through log2);
    NaN stays NaN."""
    bits = x.to(tl.int32, bitcast=True)
    exp = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return tl.where(x == x, (exp << 23).to(tl.float32, bitcast=True), x)


@triton.jit
def _to_fp8(o, FP8_MAX: tl.constexpr, ROUND_MANT: tl.constexpr, ROUND_EMIN: tl.constexpr,
            EMULATE_ROUNDING: tl.constexpr):
    """Saturate to the format's finite range (finite values never become NaN/inf; NaN stays
    NaN); the store's cast rounds."""
    o = tl.minimum(tl.maximum(o, -FP8_MAX, propagate_nan=NAN_PROPAGATE), FP8_MAX, propagate_nan=NAN_PROPAGATE)
    if EMULATE_ROUNDING:
        o = round_to_fp8_grid(o, ROUND_MANT, ROUND_EMIN)
    return o


@triton.jit
def nvfp4_block_scale(amax, gs, EMULATE_ROUNDING: tl.constexpr):
    """NVFP4's block scale SF = e4m3(gs * amax / 6), saturated at 448, as fp32 (exactly the
    e4m3 value the kernel stores), and the factor gs / SF that maps the block onto e2m1's
    range (0 where SF is 0: the block is all zeros, or its SF underflowed). A NaN amax (a NaN
    in the block) or a gs that is not finite and > 0 gives SF NaN, stored as 0x7F."""
    gs = tl.where((gs > 0.0) & (gs < float("inf")), gs, float("nan"))
    sf = tl.minimum(amax * (gs / 6.0), 448.0, propagate_nan=NAN_PROPAGATE)
    if EMULATE_ROUNDING:  # (the interpreter: no inline assembly either)
        sf = round_to_fp8_grid(sf, 3, -6)
        inv_sf = 1.0 / tl.where(sf > 0.0, sf, 1.0)
    else:
        sf = sf.to(tl.float8e4nv).to(tl.float32)
        # rcp.approx (one MUFU op): fp32's `/` is div.full, whose range checks and rescaling
        # took ~12 instructions per block (and predicate spills) in the Gluon epilogue. SF here
        # is in 2**-9..448, a normal fp32 value, and the reciprocal is within 1 ulp: it can move a
        # result only off an exact rounding tie, and is exact for powers of two.
        inv_sf = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [tl.where(sf > 0.0, sf, 1.0)],
                                           dtype=tl.float32, is_pure=True, pack=1)
    return sf, tl.where(sf > 0.0, gs * inv_sf, 0.0)


@triton.jit
def e2m1_code(x):
    """4-bit e2m1 code of fp32 x: sign in bit 3, magnitude rounded to nearest-even on
    {0, 0.5, 1, 1.5, 2, 3, 4, 6} and clamped to 6.

    The magnitude's code is min(rint(2a), rint(a) + 2, rint(a / 2) + 4, 7): each term rounds
    a on one segment's spacing (0.5 below 2, 1 below 4, 2 above) and is offset to that
    segment's codes, and it is the smallest exactly on its own segment (ties keep their
    parity, so they go to the even code). Each rint is one FFMA adding 1.5 * 2**23 (+ the even
    offset), which leaves the integer in the low mantissa bits: 4 ops on the FMA pipe and 3
    minimums, where working on the exponent and mantissa bits took ~10 integer/logic ops on
    the half-rate ALU pipe (where ncu counted most of the NVFP4 epilogue's instructions; the
    change measured within noise)."""
    a = tl.abs(x)
    M: tl.constexpr = 12582912.0
    c = tl.minimum(tl.minimum(a * 2.0 + M, a + (M + 2.0)), tl.minimum(a * 0.5 + (M + 4.0), M + 7.0))
    return (c.to(tl.int32, bitcast=True) & 7) | tl.where(x < 0.0, 8, 0)


@triton.jit
def nvfp4_scale_offset(m, k, COLS4):
    """Byte offset of the block scale of token m, block column k in the 128x4 swizzled layout
    that FP4 GEMMs read (SPEC.md); COLS4 = padded columns / 4."""
    return ((m // 128) * COLS4 + k // 4) * 512 + (m % 32) * 16 + ((m // 32) % 4) * 4 + k % 4


@triton.jit
def store_output(
    acc,
    row_factor,
    out_rows,
    offs_dv,
    row_ok,
    OutScale,
    BlockScale,
    bs_rows,
    heads,
    stride_bs_g,
    DV: tl.constexpr,
    OUT_KIND: tl.constexpr,
    FP8_MAX: tl.constexpr,
    ROUND_MANT: tl.constexpr,
    ROUND_EMIN: tl.constexpr,
    EMULATE_ROUNDING: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    UE8M0: tl.constexpr,
):
    """Write O = acc * row_factor[:, None] (rows x BLOCK_DV) in the format OUT_KIND.

    out_rows: pointer to each row's first channel (NVFP4: byte); row_ok: rows to write;
    channels >= DV are padding. FP8_GROUP also writes one scale per (row, group of
    GROUP_SIZE channels) at BlockScale + bs_rows[row] + group * stride_bs_g. NVFP4 writes
    one per (row, 16 channels) in the swizzled layout: bs_rows is then the row's token index,
    heads its head, stride_bs_g the padded scale columns / 4; OutScale holds gs.
    """
    out_ptrs = out_rows[:, None] + offs_dv[None, :]
    mask = row_ok[:, None] & (offs_dv < DV)[None, :]
    out_ty = out_ptrs.dtype.element_ty
    acc = nan_if_inf(acc)  # (an infinite O is a fault, not a value to saturate)
    if OUT_KIND == OUT_PLAIN:
        o = acc * row_factor[:, None]
        if EMULATE_ROUNDING:  # (bf16 in the interpreter)
            o = round_to_fp8_grid(o, ROUND_MANT, ROUND_EMIN)
    elif OUT_KIND == OUT_FP8_STATIC:  # out = sat(O / scale), 1/scale folded into the 1/rowsum multiply
        inv_scale = dequant_scale_inverse(tl.load(OutScale))
        o = _to_fp8(acc * (row_factor * inv_scale)[:, None], FP8_MAX, ROUND_MANT, ROUND_EMIN, EMULATE_ROUNDING)
    elif OUT_KIND == OUT_NVFP4:
        ROWS: tl.constexpr = acc.shape[0]
        BLOCK_DV: tl.constexpr = acc.shape[1]
        NB: tl.constexpr = BLOCK_DV // NVFP4_BLOCK
        ab = tl.reshape(acc, [ROWS, NB, NVFP4_BLOCK])
        # max|O| of a block is max|acc| x (1 / rowsum), exactly (rounding is monotonic); the
        # 1 / rowsum goes into the per-block factor, one multiply per element
        sf, to_e2m1 = nvfp4_block_scale(tl.reduce(tl.abs(ab), 2, nan_max) * row_factor[:, None], tl.load(OutScale),
                                        EMULATE_ROUNDING)
        codes = tl.reshape(e2m1_code(ab * (to_e2m1 * row_factor[:, None])[:, :, None]), [ROWS, BLOCK_DV // 2, 2])
        lo, hi = tl.split(codes)
        blk = tl.arange(0, NB)
        sf_ptrs = BlockScale + nvfp4_scale_offset(bs_rows[:, None], heads[:, None] * (DV // NVFP4_BLOCK) + blk[None, :],
                                                   stride_bs_g)
        tl.store(sf_ptrs, sf.to(sf_ptrs.dtype.element_ty), mask=row_ok[:, None] & (blk < DV // NVFP4_BLOCK)[None, :])
        pairs = tl.arange(0, BLOCK_DV // 2)
        tl.store(out_rows[:, None] + pairs[None, :], (lo | (hi << 4)).to(tl.uint8),
                 mask=row_ok[:, None] & (pairs < DV // 2)[None, :])
    else:  # OUT_FP8_GROUP: s = max(amax_g, 1e-10) / fp8_max per group (UE8M0: rounded up to 2^k)
        ROWS: tl.constexpr = acc.shape[0]
        BLOCK_DV: tl.constexpr = acc.shape[1]
        NG: tl.constexpr = BLOCK_DV // GROUP_SIZE
        og = tl.reshape(acc * row_factor[:, None], [ROWS, NG, GROUP_SIZE])
        sc = tl.maximum(tl.reduce(tl.abs(og), 2, nan_max), 1e-10, propagate_nan=NAN_PROPAGATE) / FP8_MAX
        if UE8M0:
            sc = _ceil_pow2(sc)
        o = _to_fp8(tl.reshape(og / sc[:, :, None], [ROWS, BLOCK_DV]), FP8_MAX, ROUND_MANT, ROUND_EMIN,
                    EMULATE_ROUNDING)
        g = tl.arange(0, NG)
        tl.store(BlockScale + bs_rows[:, None] + g[None, :] * stride_bs_g, sc,
                 mask=row_ok[:, None] & (g < DV // GROUP_SIZE)[None, :])
    if OUT_KIND != OUT_NVFP4:  # (NVFP4 stored its packed bytes above)
        tl.store(out_ptrs, o.to(out_ty), mask=mask)


# ----------------------------------------------------------------------------------
# Host side: the constexprs that select and parametrize the epilogue for an OutputFormat.
# ----------------------------------------------------------------------------------

# FP8 output dtypes: max finite, mantissa bits, exponent of the smallest normal
FP8_PARAMS = {torch.float8_e4m3fn: (448.0, 3, -6), torch.float8_e5m2: (57344.0, 2, -14)}
# Output dtypes whose fp32 -> dtype conversion Triton's interpreter gets wrong (it truncates bf16
# and does not carry an fp8 rounding into the exponent), which the epilogue rounds itself there
# (round_to_fp8_grid): (mantissa bits, exponent of the smallest normal)
EMULATED_ROUNDING = {**{dt: p[1:] for dt, p in FP8_PARAMS.items()}, torch.bfloat16: (7, -126)}


def constexprs(fmt, interpret: bool) -> dict:
    """store_output's constexprs for quant.OutputFormat `fmt` (the portable and combine kernels
    take them all; the Gluon kernel the ones it names)."""
    mant, emin = EMULATED_ROUNDING.get(fmt.dtype, (0, 0))
    return dict(
        OUT_KIND=int(fmt.kind), FP8_MAX=FP8_PARAMS[fmt.dtype][0] if fmt.dtype in FP8_PARAMS else 0.0, ROUND_MANT=mant,
        ROUND_EMIN=emin, EMULATE_ROUNDING=interpret and (mant > 0 or fmt.kind == OutKind.NVFP4),
        GROUP_SIZE=max(fmt.group_size, 1), UE8M0=fmt.ue8m0,
    )
