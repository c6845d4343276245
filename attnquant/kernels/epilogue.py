"""The output epilogue shared by the forward kernel and the split combine kernel.

Both end with an fp32 tile `acc` (rows x BLOCK_DV) and a per-row factor (1 / softmax
denominator) and must write one output format, chosen by the OUT_KIND constexpr
(see attnquant.quant): the format is an epilogue variant, not another kernel.
Everything is row-local, so the caller only supplies pointers and masks.
"""

import triton
import triton.language as tl

# Keep these equal to attnquant.quant.PLAIN / FP8_STATIC.
OUT_PLAIN = tl.constexpr(0)
OUT_FP8_STATIC = tl.constexpr(1)


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
def store_output(
    acc,
    row_factor,
    out_ptrs,
    mask,
    OutScale,
    OUT_KIND: tl.constexpr,
    FP8_MAX: tl.constexpr,
    FP8_MANT: tl.constexpr,
    FP8_EMIN: tl.constexpr,
    EMULATE_FP8_ROUNDING: tl.constexpr,
):
    """Write acc * row_factor[:, None] in the output format OUT_KIND through `out_ptrs`."""
    out_ty = out_ptrs.dtype.element_ty
    if OUT_KIND == OUT_PLAIN:
        o = acc * row_factor[:, None]
        tl.store(out_ptrs, o.to(out_ty), mask=mask)
    else:  # OUT_FP8_STATIC: out = sat(O / scale), 1/scale folded into the 1/rowsum multiply
        inv_scale = 1.0 / tl.load(OutScale)
        o = acc * (row_factor * inv_scale)[:, None]
        o = tl.minimum(tl.maximum(o, -FP8_MAX), FP8_MAX)
        if EMULATE_FP8_ROUNDING:
            o = round_to_fp8_grid(o, FP8_MANT, FP8_EMIN)
        tl.store(out_ptrs, o.to(out_ty), mask=mask)
