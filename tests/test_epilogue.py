"""The epilogue's element-wise NVFP4 helper on its own: e2m1 codes of many fp32 values
(every rounding tie, its fp32 neighbours, the clamp, signs, random values) against the
reference quantizer's nearest-grid-point search."""

import torch
import triton
import triton.language as tl

from attnquant import quant
from attnquant.kernels.epilogue import e2m1_code

from .helpers import DEVICE


@triton.jit
def _codes_kernel(X, Out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(Out + offs, e2m1_code(x).to(tl.uint8), mask=offs < n)


def test_e2m1_code_matches_reference():
    points = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0,
                           1e30, 1e-30])
    inf = torch.full_like(points, float("inf"))
    near = torch.cat([points, torch.nextafter(points, inf), torch.nextafter(points, -inf)])
    x = torch.cat([near, -near, torch.randn(20000) * 3, torch.rand(20000) * 16 - 8]).to(DEVICE)
    out = torch.empty(x.shape, dtype=torch.uint8, device=DEVICE)
    _codes_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    ref = quant.round_e2m1(x.double())
    bad = (out != ref).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} codes differ, e.g. x={x[bad[:5]].tolist()}: " \
                             f"{out[bad[:5]].tolist()} vs {ref[bad[:5]].tolist()}"


def test_nvfp4_swizzle_offsets_match_the_blocked_layout():
    """The oracle's swizzle (SPEC.md's offset formula) is the layout FP4 GEMMs read, built
    the other way: the logical (rows, cols) scales cut into (rows/128, 4, 32, cols/4, 4)
    blocks and stored in (row tile, column group, row % 32, (row / 32) % 4, col % 4) order."""
    rows, cols = 256, 12
    logical = torch.arange(rows * cols).reshape(rows, cols)
    blocked = logical.reshape(rows // 128, 4, 32, cols // 4, 4).permute(0, 3, 2, 1, 4).reshape(-1)
    offs = quant.nvfp4_swizzle_offsets(rows, cols)
    assert torch.equal(blocked[offs.reshape(-1)].reshape(rows, cols), logical)
