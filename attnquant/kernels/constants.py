"""Numbers the host code and every kernel share: each defined once, here.

Kernels read module globals only as constexprs, so each number the kernels use also exists
as a `tl.constexpr` (Gluon accepts the same objects), derived from the host value.
"""

import enum

import triton.language as tl


class OutKind(enum.IntEnum):
    """The output epilogue a kernel compiles (its OUT_KIND constexpr); quant.OutputFormat.kind."""

    PLAIN = 0  # bf16 / fp16 / fp32 output
    FP8_STATIC = 1  # out = sat(O / output_scale), a per-tensor dequant scale read on the device
    FP8_GROUP = 2  # one scale per (token, head, group of G channels), written by the kernel
    NVFP4 = 3  # e2m1 pairs in bytes + an e4m3 scale per 16 channels (swizzled 128x4), global scale


LOG2E = 1.4426950408889634  # scores live in the log2 domain: exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453
NVFP4_BLOCK = 16  # channels per NVFP4 block scale
WG_ROWS = 64  # query rows of one Hopper consumer warpgroup (wgmma M): its Q and output TMA blocks

OUT_PLAIN = tl.constexpr(int(OutKind.PLAIN))
OUT_FP8_STATIC = tl.constexpr(int(OutKind.FP8_STATIC))
OUT_FP8_GROUP = tl.constexpr(int(OutKind.FP8_GROUP))
OUT_NVFP4 = tl.constexpr(int(OutKind.NVFP4))
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)
NVFP4_BLOCK_C = tl.constexpr(NVFP4_BLOCK)
WG_ROWS_C = tl.constexpr(WG_ROWS)
