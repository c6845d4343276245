"""The benchmark: attnquant next to its peers, in one run on one GPU.

    python -m attnquant.bench [--prefill] [--decode] [--sinks] [--host] [--fp8-attention]   # all by default

- prefill: the PERF.md shapes; the Gluon kernel writing bf16, static FP8, per-group FP8 and
  NVFP4 (interleaved rounds), FA4 (flash_attn.cute, bf16 out) where importable, cuDNN SDPA
  bf16 and SDPA followed by a torch.compile'd FP8 quantization. µs and TFLOP/s
  (2 * B * H * Sq * Sk * (D + Dv), halved for causal).
- decode (CUDA-graph replays): bf16 and FP8 (e4m3) KV caches with fused FP8 output,
  contiguous and paged (page 16), and cuDNN SDPA bf16 + quantization. µs and TB/s of K+V read.
- sinks: a gpt-oss layer (64 query / 8 KV heads, d 64; full and 128-token sliding window) with
  and without learnable sinks, fused FP8 out.
- host: host µs per eager call (decode B8 1k, prefill B1 512; back-to-back launches) against
  its GPU time, cuDNN SDPA's and FA4's.
- FP8 attention: e4m3 q/k/v with (B, Hkv) descales against bf16 inputs on the d 64 / 128
  prefill shapes, each writing bf16, static FP8 and NVFP4 (the kernel 'auto' picks: today the
  portable one for FP8 inputs); and its accuracy on FA3's distribution (relative RMSE against
  float64).
- block (--block): attention + output projection (attnquant.blocks) per layer: fused FP8 ->
  FP8 GEMM (static; per-token-group 1x128 with 128x128 weight blocks where Dv allows), ours
  bf16 -> separate quantization -> FP8 GEMM, FA4 bf16 -> the same, cuDNN SDPA bf16 -> bf16
  GEMM; and what the fused path saves per 60-layer model step.
- sweep (--sweep): TFLOP/s against sequence length (16k tokens a call, causal) for ours
  (fused FP8), FA4 and cuDNN at d 64, 128, 192-128 and 256.
--json PATH writes every table's numbers; --plots DIR draws them (attnquant.plots, matplotlib).
Times are medians of triton.testing.do_bench. The lab's measurements (sweeps, config A/Bs,
spread, power) are tools/lab_bench.py; A/B of two versions: tools/ab_versions.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import triton

import attnquant as aq
from attnquant.quant import nvfp4_scale_shape, quantize_kv_fp8

PREFILL = [  # name, B, Sq, Sk, H, Hkv, D, Dv, causal
    ("prefill_mla_4k", 2, 4096, 4096, 16, 1, 192, 128, True),
    ("prefill_mha_4k", 2, 4096, 4096, 32, 32, 128, 128, True),
    ("prefill_gqa_8k", 2, 8192, 8192, 32, 4, 128, 128, True),
    ("noncausal_mha_8k", 1, 8192, 8192, 32, 32, 128, 128, False),
    ("causal_d64_b2_8k", 2, 8192, 8192, 32, 8, 64, 64, True),
    ("noncausal_d64_8k", 1, 8192, 8192, 32, 32, 64, 64, False),
]
# Prefill shapes outside the table, run when named (the lab's tools)
EXTRA_PREFILL = [
    ("causal_d64_16k", 1, 16384, 16384, 32, 8, 64, 64, True),
    ("mla_8k_b1", 1, 8192, 8192, 16, 1, 192, 128, True),
    ("noncausal_b2_8k", 2, 8192, 8192, 32, 32, 128, 128, False),
]
DECODE = [  # name, B, Sk, H, Hkv, D
    ("decode_gqa_8k", 16, 8192, 16, 1, 128),
    ("decode_mha_8k", 16, 8192, 16, 16, 128),
]
# 64 sequences of random lengths up to 16k against a cache of H32/8, d 128 (a serving batch)
RAGGED_DECODE = ("decode_64seq_ragged_16k", 64, 16384, 32, 8, 128)
# the small eager calls whose host time is measured: name, B, Sq, Sk, H, Hkv, D, causal
HOST = [("decode_b8_1k", 8, 1, 1024, 32, 8, 128, False), ("prefill_b1_512", 1, 512, 512, 32, 8, 128, True)]
HOST_CALLS = 200
GPT_OSS = ("gpt-oss", 1, 4096, 64, 8, 64)  # name, B, S, H, Hkv, D
FORMATS = ("bf16", "fp8", "group", "nvfp4")
FP8 = torch.float8_e4m3fn
# attention + o_proj: name, B, Sq (1: decode against an Sk cache), Sk, H, Hkv, D, Dv, causal, N (hidden size)
BLOCK = [
    ("prefill_mla_4k", 2, 4096, 4096, 16, 1, 192, 128, True, 7168),
    ("prefill_gqa_8k", 2, 8192, 8192, 32, 4, 128, 128, True, 4096),
    ("decode_gqa_8k", 16, 1, 8192, 16, 1, 128, 128, False, 7168),
    ("gpt-oss_4k", 1, 4096, 4096, 64, 8, 64, 64, True, 2880),
]
SWEEP_DIMS = [(64, 64, 16, 16), (128, 128, 16, 16), (192, 128, 16, 1), (256, 256, 16, 16)]  # D, Dv, H, Hkv
SWEEP_LENS = [1024, 2048, 4096, 8192, 16384]
SWEEP_TOKENS = 16384
LAYERS = 60
RESULTS: dict = {}  # every table's numbers, for --json and the plots


def bench(fn) -> float:
    """Median µs, launched from Python each time."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def bench_graph(fn) -> float:
    """Median µs of a CUDA-graph replay: the GPU time, without Python launch overhead (decode
    steps run under CUDA graphs in serving engines)."""
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def interleaved(fns, rounds=3, graph=False):
    """Median µs of each fn over `rounds` rounds that run them in turn (the card drifts by a
    few % over seconds: interleaving keeps that out of the comparison)."""
    timer = bench_graph if graph else bench
    times = [[timer(fn) for fn in fns] for _ in range(rounds)]
    return [sorted(r[i] for r in times)[rounds // 2] for i in range(len(fns))]


def prefill_inputs(b, sq, sk, h, hkv, d, dv):
    torch.manual_seed(0)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, sk, hkv, dv, device="cuda", dtype=torch.bfloat16)
    return q, k, v


def prefill_cases(shapes=()):
    """The PREFILL shapes whose names contain one of `shapes` (all when empty) and the
    EXTRA_PREFILL shapes named in `shapes`, as (name, q, k, v, causal, FP8 scale, FLOPs)."""
    for name, b, sq, sk, h, hkv, d, dv, causal in PREFILL + [s for s in EXTRA_PREFILL if s[0] in shapes]:
        if shapes and not any(x in name for x in shapes):
            continue
        q, k, v = prefill_inputs(b, sq, sk, h, hkv, d, dv)
        flops = 2 * b * h * sq * sk * (d + dv) / (2 if causal else 1)
        yield name, q, k, v, causal, torch.tensor(0.02, device="cuda"), flops


def format_call(module, fmt, q, k, v, causal, scale, **kw):
    """`module`.flash_attn_func (attnquant, or another version of it: tools/ab_versions.py)
    writing output format `fmt` (FORMATS; per-group FP8 with G = min(128, Dv) and UE8M0)."""
    b, sq, h, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    if fmt == "bf16":
        extra = {}
    elif fmt == "fp8":
        extra = dict(output_scale=scale)
    elif fmt == "group":
        extra = dict(output_block_scale=torch.empty(b, sq, h * dv // min(128, dv), device="cuda"), ue8m0=True)
    else:
        extra = dict(out_dtype="nvfp4", output_scale=scale,
                     output_block_scale=torch.empty(nvfp4_scale_shape(b * sq, h, dv), dtype=FP8, device="cuda"))
    return lambda: module.flash_attn_func(q, k, v, causal=causal, **extra, **kw)


def _quant_fn():
    @torch.compile(dynamic=False)
    def quant(o, scale):
        return (o.float() * (1.0 / scale)).clamp(-448.0, 448.0).to(FP8)

    return quant


def _sdpa(q, k, v, causal):
    """SDPA on (B, H, S, D) views; the first backend (cuDNN first) that accepts the case."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def fn(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
        try:
            fn()
            torch.cuda.synchronize()
            return fn, backend.name.replace("_ATTENTION", "").lower()
        except Exception:  # noqa: BLE001 - a backend that refuses the shape; try the next
            continue
    return None, "none"


def fa4(q, k, v, causal):
    """FA4's bf16 forward (flash_attn.cute) where it is importable and runs here, else None.
    docs/design.md ("Measuring") says how to carry it to the GPU machine."""
    try:
        from flash_attn.cute.interface import flash_attn_func
        fn = lambda: flash_attn_func(q, k, v, causal=causal)  # noqa: E731
        fn()
        return fn
    except Exception as e:  # noqa: BLE001 - not installed, or its CuTe DSL fails on this card/shape
        if not isinstance(e, ImportError):
            print(f"  (FA4: {type(e).__name__}: {str(e)[:100]})")
        return None


def prefill_table():
    quant = _quant_fn()
    print("\nprefill (µs, TFLOP/s): the Gluon kernel in each output format, FA4 and cuDNN SDPA bf16")
    print(f"{'shape':<18} {'bf16':>15} {'fp8':>15} {'group':>7} {'nvfp4':>7} {'fp8/bf16':>8} {'grp/bf16':>8} "
          f"{'fp4/bf16':>8} {'FA4 bf16':>15} {'FA4/fp8':>7} {'SDPA bf16':>15} {'SDPA+q':>7} {'SDPA/fp8':>8}")
    for name, q, k, v, causal, scale, flops in prefill_cases():
        cell = lambda us: f"{us:6.0f} ({flops / us * 1e-6:4.0f} TF)"  # noqa: E731
        fns = [format_call(aq, fmt, q, k, v, causal, scale) for fmt in FORMATS]
        peer = fa4(q, k, v, causal)
        t = interleaved(fns + ([peer] if peer else []))
        t_fa4 = t[4] if peer else float("nan")
        sdpa, backend = _sdpa(q, k, v, causal)
        t_sdpa = bench(sdpa) if sdpa else float("nan")
        t_sdpa_q = bench(lambda: quant(sdpa(), scale)) if sdpa else float("nan")
        print(f"{name:<18} {cell(t[0])} {cell(t[1])} {t[2]:7.0f} {t[3]:7.0f} {t[1] / t[0]:8.3f} {t[2] / t[0]:8.3f} "
              f"{t[3] / t[0]:8.3f} {cell(t_fa4)} {t_fa4 / t[1]:7.2f} {cell(t_sdpa)} {t_sdpa_q:7.0f} "
              f"{t_sdpa / t[1]:8.2f}", flush=True)


def fp8_inputs(q, k, v):
    """q, k, v in e4m3 with (B, Hkv) descales (q's: each KV head's group of query heads shares
    one), as an FP8 KV cache and an FP8 projection of q give them."""
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    qq, q_ds = quantize_kv_fp8(q.reshape(b, sq, hkv, h // hkv * d))
    kq, k_ds = quantize_kv_fp8(k)
    vq, v_ds = quantize_kv_fp8(v)
    return qq.reshape(b, sq, h, d), kq, vq, dict(q_descale=q_ds, k_descale=k_ds, v_descale=v_ds)


def fp8_attention_table():
    """FP8 attention (e4m3 q/k/v, descales) against bf16 inputs, each in three output formats,
    interleaved (backend 'auto')."""
    print("\nFP8 attention (µs, TFLOP/s): e4m3 q/k/v with descales vs bf16 inputs, fused outputs")
    print(f"{'shape':<18} {'bf16 in: bf16':>15} {'fp8':>7} {'nvfp4':>7} {'fp8 in: bf16':>15} {'fp8':>15} "
          f"{'nvfp4':>7} {'speedup fp8 out':>15}")
    for name, q, k, v, causal, scale, flops in prefill_cases():
        if q.shape[-1] not in (64, 128) or v.shape[-1] != q.shape[-1]:
            continue  # (the head dims FP8 attention on the Gluon kernel takes first: issue 25)
        cell = lambda us: f"{us:6.0f} ({flops / us * 1e-6:4.0f} TF)"  # noqa: E731
        qq, kq, vq, descales = fp8_inputs(q, k, v)
        fmts = ("bf16", "fp8", "nvfp4")
        fns = ([format_call(aq, f, q, k, v, causal, scale) for f in fmts]
               + [format_call(aq, f, qq, kq, vq, causal, scale, **descales) for f in fmts])
        t = interleaved(fns)
        RESULTS.setdefault("fp8_attention", {})[name] = dict(zip([f"bf16_{f}" for f in fmts] + [f"fp8_{f}" for f in fmts], t))
        print(f"{name:<18} {cell(t[0])} {t[1]:7.0f} {t[2]:7.0f} {cell(t[3])} {cell(t[4])} {t[5]:7.0f} "
              f"{t[1] / t[4]:15.2f}", flush=True)


def fa3_inputs(b, s, h, hkv, d, seed=0):
    """FA3's accuracy distribution: standard normal with 0.1 % of the entries drawn with standard
    deviation 10 (outliers, as activations have), bf16."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def draw(*shape):
        x = torch.randn(*shape, device="cuda", generator=g)
        outlier = torch.rand(*shape, device="cuda", generator=g) < 1e-3
        return torch.where(outlier, x * 10.0, x).to(torch.bfloat16)

    return draw(b, s, h, d), draw(b, s, hkv, d), draw(b, s, hkv, d)


def rel_rmse(out, ref) -> float:
    """RMS of out - ref over the RMS of ref (float64)."""
    return ((out.double() - ref).square().mean() / ref.square().mean()).sqrt().item()


FP8_ACCURACY = [  # name, B, S, H, Hkv, D, causal
    ("d128 non-causal", 2, 2048, 16, 16, 128, False),
    ("d128 causal gqa", 2, 2048, 16, 4, 128, True),
    ("d64 non-causal", 2, 2048, 16, 16, 64, False),
]


def fp8_accuracy_table():
    """FP8 attention's error on FA3's distribution against float64 attention of the bf16 tensors
    (FA3 reports a relative RMSE of 2.4e-2 for a baseline FP8 attention, 9.1e-3 with block
    quantization and a Hadamard rotation)."""
    from .reference import attention_ref_batched
    print("\nFP8 attention accuracy (relative RMSE against float64 of the bf16 inputs, FA3's distribution)")
    print(f"{'case':<18} {'bf16 in':>9} {'fp8 in':>9}")
    for name, b, s, h, hkv, d, causal in FP8_ACCURACY:
        q, k, v = fa3_inputs(b, s, h, hkv, d)
        ref, _ = attention_ref_batched(q.double(), k.double(), v.double(), causal=causal)
        qq, kq, vq, descales = fp8_inputs(q, k, v)
        errs = [rel_rmse(aq.flash_attn_func(q, k, v, causal=causal)[0], ref),
                rel_rmse(aq.flash_attn_func(qq, kq, vq, causal=causal, **descales)[0], ref)]
        RESULTS.setdefault("fp8_accuracy", {})[name] = errs
        print(f"{name:<18} {errs[0]:9.2e} {errs[1]:9.2e}", flush=True)


def paged(cache, page, gen=None):
    """A contiguous (B, S, Hkv, D) cache scattered into shuffled pages: (pages, block table)."""
    b, sk, hkv, d = cache.shape
    nb = -(-sk // page)
    perm = torch.randperm(b * nb, device=cache.device, generator=gen)
    pages = torch.zeros(b * nb, page, hkv, d, dtype=cache.dtype, device=cache.device)
    padded = torch.zeros(b, nb * page, hkv, d, dtype=cache.dtype, device=cache.device)
    padded[:, :sk] = cache
    pages[perm] = padded.reshape(b * nb, page, hkv, d)
    return pages, perm.reshape(b, nb).to(torch.int32)


def decode_calls(module, b, sk, h, hkv, d, lens=None, page=0):
    """Decode steps of `module` (attnquant or another version) with fused FP8 output, on a bf16
    and an FP8 cache (per-(sequence, head) descales; None where the version has no FP8 KV)."""
    torch.manual_seed(0)
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
    lens = lens if lens is not None else torch.full((b,), sk, dtype=torch.int32, device="cuda")
    scale = torch.tensor(0.02, device="cuda")
    bt = None
    if page:
        kc, bt = paged(kc, page)
        vc, _ = paged(vc, page)
    calls = {"bf16 kv": lambda: module.flash_attn_with_kvcache(q, kc, vc, lens, block_table=bt, output_scale=scale)}
    if hasattr(module, "quantize_kv_fp8"):
        kq, kd = module.quantize_kv_fp8(kc, num_seqs=b) if page else module.quantize_kv_fp8(kc)
        vq, vd = module.quantize_kv_fp8(vc, num_seqs=b) if page else module.quantize_kv_fp8(vc)
        calls["fp8 kv"] = lambda: module.flash_attn_with_kvcache(q, kq, vq, lens, block_table=bt, output_scale=scale,
                                                                 k_descale=kd, v_descale=vd)
    return calls, (q, kc, vc)


def decode_table():
    quant = _quant_fn()
    print("\ndecode, CUDA-graph replays (µs; TB/s of the bf16 cache's K+V bytes, FP8 reads half), fused FP8 out")
    print(f"{'shape':<26} {'bf16 kv':>16} {'fp8 kv':>16} {'bf16/fp8':>8} {'paged16 bf16':>12} {'paged16 fp8':>11} "
          f"{'fp8 paged/contig':>16} {'SDPA bf16':>9} {'SDPA+q':>7} {'SDPA/ours bf16':>14}")
    cases = [(name, b, sk, h, hkv, d, None) for name, b, sk, h, hkv, d in DECODE]
    name, b, sk, h, hkv, d = RAGGED_DECODE
    gen = torch.Generator(device="cuda").manual_seed(1)
    cases.append((name, b, sk, h, hkv, d, torch.randint(1, sk + 1, (b,), device="cuda", generator=gen,
                                                         dtype=torch.int32)))
    for name, b, sk, h, hkv, d, lens in cases:
        calls, (q, kc, vc) = decode_calls(aq, b, sk, h, hkv, d, lens)
        paged_calls, _ = decode_calls(aq, b, sk, h, hkv, d, lens, page=16)
        nbytes = 2 * (lens.sum().item() if lens is not None else b * sk) * hkv * d * 2
        t = interleaved(list(calls.values()) + list(paged_calls.values()), graph=True)
        cell = lambda us: f"{us:6.1f} ({nbytes / us * 1e-6:4.2f})"  # noqa: E731
        sdpa, backend = _sdpa(q, kc, vc, False) if lens is None else (None, "-")
        t_sdpa = bench_graph(sdpa) if sdpa else float("nan")
        scale = torch.tensor(0.02, device="cuda")
        t_sdpa_q = bench_graph(lambda: quant(sdpa(), scale)) if sdpa else float("nan")
        print(f"{name:<26} {cell(t[0])} {cell(t[1])} {t[0] / t[1]:8.2f} {t[2]:12.1f} {t[3]:11.1f} {t[3] / t[1]:16.3f} "
              f"{t_sdpa:9.1f} {t_sdpa_q:7.1f} {t_sdpa / t[0]:14.3f}", flush=True)
        del calls, paged_calls, q, kc, vc
        torch.cuda.empty_cache()


def host_us(fn, n=HOST_CALLS) -> float:
    """Host µs per call: n calls launched back to back with no sync (the GPU queue absorbs
    them, so where the GPU time is shorter the loop's wall time is the host's), best of 3."""
    fn()
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return best


def host_table():
    """Host time of one eager call against its GPU time (CUDA-graph replay): attnquant with
    fused FP8 out, eager and as a plan's replay (attnquant.plan: what a serving engine pays per
    layer after one planning call a step), cuDNN SDPA bf16 and FA4 bf16 (where loaded). In
    serving engines attention often runs outside the captured graphs, once per layer: a host
    time above the GPU time is what such a step pays."""
    print(f"\nhost time per call (µs, best of 3 x {HOST_CALLS} back-to-back calls; GPU: CUDA-graph replay)")
    print(f"{'call':<16} {'ours eager':>10} {'ours plan.run':>13} {'ours GPU':>8} {'SDPA host':>9} {'SDPA GPU':>8} "
          f"{'FA4 host':>8} {'eager/SDPA':>10} {'run/SDPA':>8}")
    scale = torch.tensor(0.02, device="cuda")
    for name, b, sq, sk, h, hkv, d, causal in HOST:
        q, k, v = prefill_inputs(b, sq, sk, h, hkv, d, d)
        if sq == 1:
            lens = torch.full((b,), sk, dtype=torch.int32, device="cuda")
            fn, args, kw = aq.flash_attn_with_kvcache, (q, k, v, lens), dict(output_scale=scale)
        else:
            fn, args, kw = aq.flash_attn_func, (q, k, v), dict(causal=causal, output_scale=scale)
        planned = aq.plan(fn, *args, **kw)
        ours = lambda: fn(*args, **kw)  # noqa: E731
        sdpa, _ = _sdpa(q, k, v, causal)
        peer = fa4(q, k, v, causal) if sq > 1 else None
        t = [host_us(ours), host_us(lambda: planned.run(q, k, v)), bench_graph(ours)]
        t += [host_us(sdpa), bench_graph(sdpa)] if sdpa else [float("nan")] * 2
        t.append(host_us(peer) if peer else float("nan"))
        RESULTS.setdefault("host", {})[name] = dict(zip(("ours", "ours_run", "ours_gpu", "sdpa", "sdpa_gpu", "fa4"), t))
        print(f"{name:<16} {t[0]:10.1f} {t[1]:13.1f} {t[2]:8.1f} {t[3]:9.1f} {t[4]:8.1f} {t[5]:8.1f} "
              f"{t[0] / t[3]:10.2f} {t[1] / t[3]:8.2f}", flush=True)


def sinks_table():
    name, b, s, h, hkv, d = GPT_OSS
    q, k, v = prefill_inputs(b, s, s, h, hkv, d, d)
    sinks = torch.randn(h, device="cuda")
    scale = torch.tensor(0.02, device="cuda")
    print(f"\nsinks ({name}: B{b} S{s} H{h}/{hkv} d{d}, causal, fused FP8 out; µs, interleaved)")
    for window in ((-1, -1), (128, 0)):
        fns = [lambda s_=s_: aq.flash_attn_func(q, k, v, causal=True, window_size=window, output_scale=scale,
                                                sinks=s_) for s_ in (None, sinks)]
        t = interleaved(fns)
        label = "full" if window[0] < 0 else f"window {window[0]}"
        print(f"  {label:<12} no sinks {t[0]:8.1f}   sinks {t[1]:8.1f}   cost {t[1] / t[0] - 1:+7.2%}", flush=True)


def block_table():
    """Attention + output projection per layer, every way a user could build it (module docstring)."""
    from . import blocks

    quant = _quant_fn()
    print(f"\nattention + o_proj per layer (µs; the fused path's saving per {LAYERS}-layer step, ms)")
    print(f"{'shape':<16} {'fused fp8':>9} {'fused grp':>9} {'ours+q':>8} {'FA4+q':>8} {'SDPA bf16':>9} "
          f"{'vs ours+q':>9} {'vs FA4+q':>9} {'vs SDPA':>8}")
    rows = RESULTS.setdefault("block", {})
    for name, b, sq, sk, h, hkv, d, dv, causal, n in BLOCK:
        q, k, v = prefill_inputs(b, sq, sk, h, hkv, d, dv)
        w = torch.randn(n, h * dv, device="cuda") * (h * dv) ** -0.5
        wt, wb = blocks.quantize_weight_fp8(w), blocks.quantize_weight_fp8(w, block=True)
        w16 = w.to(torch.bfloat16)
        scale = torch.tensor(0.02, device="cuda")
        decode = sq == 1
        if decode:  # q against a full cache: the decode kernel (split-KV), as serving runs it
            lens = torch.full((b,), sk, dtype=torch.int32, device="cuda")
            attend = lambda **kw: aq.flash_attn_with_kvcache(q, k, v, lens, **kw)[0]  # noqa: E731
        else:
            attend = lambda **kw: aq.flash_attn_func(q, k, v, causal=causal, **kw)[0]  # noqa: E731
        fns = {"fused fp8": lambda: blocks.oproj_fp8(attend(output_scale=scale), wt, scale),
               "ours+q": lambda: blocks.oproj_fp8(quant(attend(), scale), wt, scale)}
        if dv % blocks.GEMM_BLOCK == 0:
            gs = blocks.group_scale_buffer(b * sq, h, dv, "cuda").view(b, sq, -1)
            fns["fused grp"] = lambda: blocks.oproj_fp8(attend(out_dtype=FP8, output_block_scale=gs), wb, gs)
        peer = fa4(q, k, v, causal)
        if peer:
            first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731 - (FA4 returns (out, lse))
            fns["FA4+q"] = lambda: blocks.oproj_fp8(quant(first(peer()), scale), wt, scale)
        sdpa, _ = _sdpa(q, k, v, causal)
        if sdpa:
            fns["SDPA bf16"] = lambda: sdpa().transpose(1, 2).flatten(-2) @ w16.t()
        try:
            t = dict(zip(fns, interleaved(list(fns.values()), graph=decode)))
        except Exception as e:  # noqa: BLE001 - one row's failure (a peer under graph capture) is reported, not fatal
            print(f"{name:<16} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        rows[name] = t
        get = lambda key: t.get(key, float("nan"))  # noqa: E731
        save = lambda key: (get(key) - get("fused fp8")) * LAYERS * 1e-3  # noqa: E731
        print(f"{name:<16} {get('fused fp8'):9.1f} {get('fused grp'):9.1f} {get('ours+q'):8.1f} {get('FA4+q'):8.1f} "
              f"{get('SDPA bf16'):9.1f} {save('ours+q'):9.2f} {save('FA4+q'):9.2f} {save('SDPA bf16'):8.2f}",
              flush=True)
        torch.cuda.empty_cache()


def sweep_table():
    """TFLOP/s against sequence length: ours (fused FP8), FA4 bf16, cuDNN SDPA bf16."""
    quant_scale = torch.tensor(0.02, device="cuda")
    print(f"\nsweep (TFLOP/s, causal, {SWEEP_TOKENS} tokens a call): ours fused FP8 / FA4 bf16 / SDPA bf16")
    rows = RESULTS.setdefault("sweep", {})
    for d, dv, h, hkv in SWEEP_DIMS:
        key = f"d{d}" if d == dv else f"d{d}-{dv}"
        series = rows.setdefault(key, {"seqlen": [], "ours fp8": [], "FA4 bf16": [], "SDPA bf16": []})
        for s in SWEEP_LENS:
            b = max(1, SWEEP_TOKENS // s)
            q, k, v = prefill_inputs(b, s, s, h, hkv, d, dv)
            flops = 2 * b * h * s * s * (d + dv) / 2
            fns = [lambda: aq.flash_attn_func(q, k, v, causal=True, output_scale=quant_scale)]
            peer = fa4(q, k, v, True)
            sdpa, _ = _sdpa(q, k, v, True)
            fns += [f for f in (peer, sdpa) if f]
            t = iter(interleaved(fns))
            tf = [flops / next(t) * 1e-6] + [flops / next(t) * 1e-6 if f else float("nan") for f in (peer, sdpa)]
            series["seqlen"].append(s)
            for label, x in zip(("ours fp8", "FA4 bf16", "SDPA bf16"), tf):
                series[label].append(x)
            print(f"  {key:<9} B{b:<3} S{s:<6} " + "  ".join(f"{lab} {x:5.0f}" for lab, x in
                                                        zip(("ours fp8", "FA4 bf16", "SDPA bf16"), tf)), flush=True)
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", action="store_true")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--sinks", action="store_true")
    ap.add_argument("--host", action="store_true", help="host time of small eager calls against cuDNN SDPA's")
    ap.add_argument("--fp8-attention", action="store_true", help="e4m3 q/k/v against bf16 inputs")
    ap.add_argument("--block", action="store_true", help="attention + o_proj (not in the default run)")
    ap.add_argument("--sweep", action="store_true", help="TFLOP/s against sequence length (not in the default run)")
    ap.add_argument("--json", metavar="PATH", help="write every table's numbers here")
    ap.add_argument("--plots", metavar="DIR", help="draw the sweep and block tables as PNGs (needs matplotlib)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("the benchmark needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    every = not (args.prefill or args.decode or args.sinks or args.host or args.block or args.sweep
                 or args.fp8_attention)
    RESULTS["device"] = torch.cuda.get_device_name()
    tables = [(prefill_table, every or args.prefill), (decode_table, every or args.decode),
              (sinks_table, every or args.sinks), (host_table, every or args.host), (fp8_attention_table, every or args.fp8_attention),
              (fp8_accuracy_table, every or args.fp8_attention),
              (block_table, args.block), (sweep_table, args.sweep)]
    for table, wanted in tables:
        if wanted:
            try:
                table()
            except Exception as e:  # noqa: BLE001 - one table's failure is printed; the others still run
                print(f"\n{table.__name__} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1)
    if args.plots:
        from . import plots
        print("plots:", ", ".join(plots.draw(RESULTS, args.plots)))


if __name__ == "__main__":
    main()
