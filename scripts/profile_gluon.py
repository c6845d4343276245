"""Run one prefill shape through the Gluon kernel a few times, for Nsight Compute:

    ncu --clock-control none --kernel-name regex:attn_fwd_ws --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        python3 scripts/profile_gluon.py noncausal_mha_8k [ablate]

`ablate` 1 leaves the softmax out, 2 the PV GEMM (timing variants, wrong results)."""

import sys
from dataclasses import replace

import torch

import attnquant as aq
from attnquant.bench import PREFILL, _prefill_inputs
from attnquant.kernels.hopper import launch as hopper

name = sys.argv[1] if len(sys.argv) > 1 else "noncausal_mha_8k"
ablate = int(sys.argv[2]) if len(sys.argv) > 2 else 0
_, b, sq, sk, h, hkv, d, dv, causal = next(s for s in PREFILL if s[0] == name)
q, k, v = _prefill_inputs(b, sq, sk, h, hkv, d, dv)
if ablate:
    base = hopper.ws_config(d, dv)
    hopper.ws_config = lambda d_, dv_: replace(base, ablate=ablate)
scale = torch.tensor(0.02, device="cuda")
for _ in range(3):
    aq.flash_attn_func(q, k, v, causal=causal, output_scale=scale, backend="gluon")
torch.cuda.synchronize()
