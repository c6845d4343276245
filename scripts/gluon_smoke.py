"""One small forced-Gluon call per head dim against the portable kernel (a hang or a gross
error shows here in seconds, before the test suite runs). Usage: python scripts/gluon_smoke.py"""

import torch

import attnquant as aq

for d, dv in ((64, 64), (128, 128), (192, 128), (256, 256)):
    for causal in (False, True):
        torch.manual_seed(0)
        q = torch.randn(2, 300, 4, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2, 333, 2, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(2, 333, 2, dv, device="cuda", dtype=torch.bfloat16)
        a, la = aq.flash_attn_func(q, k, v, causal=causal, return_lse=True, backend="gluon")
        b, lb = aq.flash_attn_func(q, k, v, causal=causal, return_lse=True, backend="triton")
        torch.cuda.synchronize()
        print(f"d={d}/{dv} causal={causal}: max|out diff| {(a.float() - b.float()).abs().max().item():.4f} "
              f"max|lse diff| {(la - lb).abs().max().item():.4f}", flush=True)
