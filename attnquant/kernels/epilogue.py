"""The output epilogue shared by the forward kernel and the split combine kernel.

Both end with an fp32 tile `acc` (rows x BLOCK_DV) and a per-row factor (1 / softmax
denominator) and must write one output format, chosen by the OUT_KIND constexpr
(see attnquant.quant): the format is an epilogue variant, not another kernel.
Everything is row-local, so the caller only supplies pointers and masks.
"""

import triton
import triton.language as tl

# Keep these equal to attnquant.quant.PLAIN / FP8_STATIC / FP8_GROUP.
OUT_PLAIN = tl.constexpr(0)
OUT_FP8_STATIC = tl.constexpr(1)
OUT_FP8_GROUP = tl.constexpr(2)


@triton.jit
def round_to_fp8_grid(y, MANT: tl.constexpr, EMIN: tl.constexpr):
    """Round fp32 `y` (already clamped to the format's range) to nearest-even on the FP8 grid.

    Only used under TRITON_INTERPRET: Triton 3.6's interpreter converts fp32 -> fp8
    without carrying a mantissa round-up into the exponent (126.8 -> 64 in e4m3), but
    converts exactly representable values exactly. On a GPU the hardware cvt rounds
    correctly and this is compiled out.
    """
    a = tl.abs(y)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN)  # below the smallest normal the grid spacing is fixed
    ulp = ((e - MANT + 127) << 23).to(tl.float32, bitcast=True)
    t = a / ulp  # exact: division by a power of two
    r = (t + 8388608.0) - 8388608.0  # round-to-nearest-even of t (0 <= t < 2**23)
    return tl.where(y < 0, -r * ulp, r * ulp)


@triton.jit
def _ceil_pow2(x):
    """2 ** ceil(log2(x)) for positive normal fp32 x, exactly (on the bits, not through log2)."""
    bits = x.to(tl.int32, bitcast=True)
    exp = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (exp << 23).to(tl.float32, bitcast=True)


@triton.jit
def _to_fp8(o, FP8_MAX: tl.constexpr, FP8_MANT: tl.constexpr, FP8_EMIN: tl.constexpr,
            EMULATE_FP8_ROUNDING: tl.constexpr):
    """Saturate to the format's finite range (never NaN/inf); the store's cast rounds."""
    o = tl.minimum(tl.maximum(o, -FP8_MAX), FP8_MAX)
    if EMULATE_FP8_ROUNDING:
        o = round_to_fp8_grid(o, FP8_MANT, FP8_EMIN)
    return o


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
    stride_bs_g,
    DV: tl.constexpr,
    OUT_KIND: tl.constexpr,
    FP8_MAX: tl.constexpr,
    FP8_MANT: tl.constexpr,
    FP8_EMIN: tl.constexpr,
    EMULATE_FP8_ROUNDING: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    UE8M0: tl.constexpr,
):
    """Write O = acc * row_factor[:, None] (rows x BLOCK_DV) in the format OUT_KIND.

    out_rows: pointer to each row's first channel; row_ok: rows to write; channels
    >= DV are padding. FP8_GROUP also writes one scale per (row, group of GROUP_SIZE
    channels) at BlockScale + bs_rows[row] + group * stride_bs_g.
    """
    out_ptrs = out_rows[:, None] + offs_dv[None, :]
    mask = row_ok[:, None] & (offs_dv < DV)[None, :]
    out_ty = out_ptrs.dtype.element_ty
    if OUT_KIND == OUT_PLAIN:
        o = acc * row_factor[:, None]
    elif OUT_KIND == OUT_FP8_STATIC:  # out = sat(O / scale), 1/scale folded into the 1/rowsum multiply
        inv_scale = 1.0 / tl.load(OutScale)
        o = _to_fp8(acc * (row_factor * inv_scale)[:, None], FP8_MAX, FP8_MANT, FP8_EMIN, EMULATE_FP8_ROUNDING)
    else:  # OUT_FP8_GROUP: s = max(amax_g, 1e-10) / fp8_max per group (UE8M0: rounded up to 2^k)
        ROWS: tl.constexpr = acc.shape[0]
        BLOCK_DV: tl.constexpr = acc.shape[1]
        NG: tl.constexpr = BLOCK_DV // GROUP_SIZE
        og = tl.reshape(acc * row_factor[:, None], [ROWS, NG, GROUP_SIZE])
        sc = tl.maximum(tl.max(tl.abs(og), axis=2), 1e-10) / FP8_MAX
        if UE8M0:
            sc = _ceil_pow2(sc)
        o = _to_fp8(tl.reshape(og / sc[:, :, None], [ROWS, BLOCK_DV]), FP8_MAX, FP8_MANT, FP8_EMIN,
                    EMULATE_FP8_ROUNDING)
        g = tl.arange(0, NG)
        tl.store(BlockScale + bs_rows[:, None] + g[None, :] * stride_bs_g, sc,
                 mask=row_ok[:, None] & (g < DV // GROUP_SIZE)[None, :])
    tl.store(out_ptrs, o.to(out_ty), mask=mask)
