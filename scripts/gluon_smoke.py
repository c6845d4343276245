"""One small forced-Gluon call per head dim (causal; non-causal at d=128) and output (bf16;
static FP8, which takes the TMA-store epilogue where bf16 has no room for it) against the
portable kernel: a hang or a gross error shows here in seconds, before the test suite runs.
Usage: python scripts/gluon_smoke.py"""

import torch

import attnquant as aq

scale = torch.tensor(0.01, device="cuda")
for d, dv in ((64, 64), (128, 128), (192, 128), (256, 256)):
    for causal in (False, True) if d == 128 else (True,):
        for fmt in ({}, {"output_scale": scale}):
            torch.manual_seed(0)
            q = torch.randn(2, 300, 4, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(2, 333, 2, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(2, 333, 2, dv, device="cuda", dtype=torch.bfloat16)
            a, la = aq.flash_attn_func(q, k, v, causal=causal, return_lse=True, backend="gluon", **fmt)
            b, lb = aq.flash_attn_func(q, k, v, causal=causal, return_lse=True, backend="triton", **fmt)
            torch.cuda.synchronize()
            print(f"d={d}/{dv} causal={causal} {a.dtype}: max|out diff| {(a.float() - b.float()).abs().max().item():.4f}"
                  f" max|lse diff| {(la - lb).abs().max().item():.4f}", flush=True)
