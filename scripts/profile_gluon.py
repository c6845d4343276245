"""Run one prefill shape through the Gluon kernel a few times, for Nsight Compute:

    ncu --clock-control none --kernel-name regex:attn_fwd_ws --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        python3 scripts/profile_gluon.py noncausal_mha_8k [ablate] [fp8|bf16|nvfp4] [option=N ...]

`ablate` 1 leaves the softmax out, 2 the PV GEMM (timing variants, wrong results); the third
argument picks the output format (default static FP8), or `fa4` runs FA4's bf16 kernel instead
(flash_attn.cute where it is carried: ncu's --kernel-name is then regex:FlashAttentionForward);
option=N sets an int or bool WsConfig field (pingpong=1, pv_fence=1, ...)."""

import sys
from dataclasses import replace

import torch

import attnquant as aq
from attnquant.bench import _prefill_cases
from attnquant.kernels.hopper import launch as hopper

name = sys.argv[1] if len(sys.argv) > 1 else "noncausal_mha_8k"
ablate = int(sys.argv[2]) if len(sys.argv) > 2 else 0
out_format = sys.argv[3] if len(sys.argv) > 3 else "fp8"
_, q, k, v, causal, scale, _ = next(c for c in _prefill_cases([name]) if c[0] == name)
(b, sq, h, d), dv = q.shape, v.shape[-1]
options = dict(arg.split("=") for arg in sys.argv[4:])
if ablate or options:
    base = hopper.ws_config(d, dv)
    cfg = replace(base, ablate=ablate, **{field: type(getattr(base, field))(int(x)) for field, x in options.items()})
    hopper.ws_config = lambda d_, dv_: cfg
fmt = {"fa4": {}, "fp8": dict(output_scale=scale), "bf16": {},
       "nvfp4": dict(out_dtype="nvfp4", output_scale=scale,
                     output_block_scale=torch.empty(aq.quant.nvfp4_scale_shape(b * sq, h, dv),
                                                    dtype=torch.float8_e4m3fn, device="cuda"))}[out_format]
if out_format == "fa4":
    from attnquant.bench import _fa4

    call = _fa4(q, k, v, causal)
    assert call is not None, "flash_attn.cute (FA4) is not importable"
else:
    call = lambda: aq.flash_attn_func(q, k, v, causal=causal, backend="gluon", **fmt)  # noqa: E731
for _ in range(3):
    call()
torch.cuda.synchronize()
