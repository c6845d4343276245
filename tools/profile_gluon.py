"""Run one prefill shape through the Gluon kernel a few times, for Nsight Compute:

    ncu --clock-control none --kernel-name regex:attn_fwd_ws --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        python3 tools/profile_gluon.py noncausal_mha_8k [fp8|bf16|group|nvfp4|fa4] [option=N ...]

The second argument picks the output format (default static FP8), or `fa4` runs FA4's bf16
kernel instead (flash_attn.cute where it is carried: ncu's --kernel-name is then
regex:FlashAttentionForward); option=N sets an int or bool WsConfig field (pingpong=1, ...)."""

import sys
from dataclasses import replace

import torch

import attnquant as aq
from attnquant import bench
from attnquant.kernels.hopper.config import ws_config

name = sys.argv[1] if len(sys.argv) > 1 else "noncausal_mha_8k"
out_format = sys.argv[2] if len(sys.argv) > 2 else "fp8"
_, q, k, v, causal, scale, _ = next(c for c in bench.prefill_cases([name]) if c[0] == name)
d, dv = q.shape[-1], v.shape[-1]
base = ws_config(d, dv)
options = dict(arg.split("=") for arg in sys.argv[3:])
cfg = replace(base, **{field: type(getattr(base, field))(int(x)) for field, x in options.items()})
if out_format == "fa4":
    call = bench.fa4(q, k, v, causal)
    assert call is not None, "flash_attn.cute (FA4) is not importable"
else:
    call = bench.format_call(aq, out_format, q, k, v, causal, scale, backend="gluon", _config=cfg)
for _ in range(3):
    call()
torch.cuda.synchronize()
