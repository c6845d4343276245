"""Benchmark: attnquant next to its baselines, in one run on one GPU.

    python -m attnquant.bench                   # the PERF.md shapes: prefill + decode tables
    python -m attnquant.bench --sweep           # portable-kernel tile / split sweeps (kernels/config.py)
    python -m attnquant.bench --gluon-variants  # Hopper kernel variants and ablations
    python -m attnquant.bench --formats         # each output format's cost, ping-pong off / on
    python -m attnquant.bench --configs         # Gluon config options vs the default, interleaved
    python -m attnquant.bench --spread          # per-launch spread, Gluon kernel vs cuDNN
    python -m attnquant.bench --power           # launch times next to the SM clock and power draw

Prefill rows report µs and TFLOP/s (2*B*H*Sq*Sk*(D+Dv), halved for causal) for the Hopper
Gluon kernel and the portable one; decode rows report µs and the TB/s at which K and V are
read. Times are medians of triton.testing.do_bench. Baselines: torch SDPA (cuDNN backend where it accepts the
shape), SDPA followed by a torch.compile'd static FP8 quantization of its output, PERF.md's FA4
numbers, and FA4 itself (flash_attn.cute, bf16 out) timed in the same run where it is importable.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch
import triton

import attnquant as aq
from attnquant.kernels.config import FwdConfig
from attnquant.quant import nvfp4_scale_shape

PREFILL = [  # name, B, Sq, Sk, H, Hkv, D, Dv, causal
    ("prefill_mla_4k", 2, 4096, 4096, 16, 1, 192, 128, True),
    ("prefill_mha_4k", 2, 4096, 4096, 32, 32, 128, 128, True),
    ("prefill_gqa_8k", 2, 8192, 8192, 32, 4, 128, 128, True),
    ("noncausal_mha_8k", 1, 8192, 8192, 32, 32, 128, 128, False),
]
# Prefill shapes outside the table, run only when named in full (--power, scripts/ab_kernel.py):
EXTRA_PREFILL = [
    # mla's shape with one K/V head per query head (is its slow mode about every CTA streaming
    # the same K/V?), and at d = 128 with 16 / 4 / 1 query heads per KV head
    ("mla_4k_as_mha", 2, 4096, 4096, 16, 16, 192, 128, True),
    ("mqa_4k_d128", 2, 4096, 4096, 16, 1, 128, 128, True),
    ("gqa4_4k_d128", 2, 4096, 4096, 16, 4, 128, 128, True),
    ("mha_4k_d128_h16", 2, 4096, 4096, 16, 16, 128, 128, True),
    # mla with twice the key blocks a tile, and without the causal mask: how much of mla's time is
    # per tile (perf-notes v28)
    ("mla_8k_b1", 1, 8192, 8192, 16, 1, 192, 128, True),
    ("mla_4k_noncausal", 2, 4096, 4096, 16, 1, 192, 128, False),
    # non-causal shapes whose whole-tile waves differ (perf-notes v26)
    ("noncausal_b2_8k", 2, 8192, 8192, 32, 32, 128, 128, False),
    ("noncausal_h16_8k", 1, 8192, 8192, 16, 16, 128, 128, False),
    ("noncausal_b4_4k", 4, 4096, 4096, 32, 32, 128, 128, False),
]
DECODE = [  # name, B, Sk, H, Hkv, D
    ("decode_gqa_8k", 16, 8192, 16, 1, 128),
    ("decode_mha_8k", 16, 8192, 16, 16, 128),
]
FP8 = torch.float8_e4m3fn


def bench(fn) -> float:
    """Median µs, launched from Python each time."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def bench_graph(fn) -> float:
    """Median µs of a CUDA-graph replay: the GPU time, without Python launch overhead (decode
    steps run under CUDA graphs in serving engines)."""
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


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


# FA4 (CuTe DSL) sm90 bf16-output TFLOP/s on these shapes, from ../shared/PERF.md (measured on
# PERF.md's card): issue 4's bar for the fused-FP8 kernel.
FA4_SM90_TF = {"prefill_mla_4k": 685, "prefill_mha_4k": 575, "prefill_gqa_8k": 627, "noncausal_mha_8k": 661}


def _fa4(q, k, v, causal):
    """FA4's bf16 forward (flash_attn.cute, the `fa4` package) where it is importable, else None.
    The device image lacks it; docs/perf-notes.md ("Measuring on the lent H100") says how to
    carry it, so that FA4 is timed in the same run as the PERF.md column."""
    try:
        from flash_attn.cute.interface import flash_attn_func
    except Exception:  # noqa: BLE001 - not installed, or its CuTe DSL fails to load here
        return None
    return lambda: flash_attn_func(q, k, v, causal=causal)


def _gluon_fp8(q, k, v, causal, scale):
    """The Hopper kernel with static FP8 output: the call the variant, spread and power tools time."""
    return lambda: aq.flash_attn_func(q, k, v, causal=causal, output_scale=scale, backend="gluon")


def _gluon_format_calls(q, k, v, causal, scale):
    """The Hopper kernel writing bf16, static FP8, per-group FP8 (G = 128, UE8M0) and NVFP4
    (`scale` as its global scale): four calls to time side by side."""
    b, sq, h, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    bscale = torch.empty(b, sq, h * dv // 128, device="cuda")
    fp4_scales = torch.empty(nvfp4_scale_shape(b * sq, h, dv), dtype=FP8, device="cuda")
    g = dict(causal=causal, backend="gluon")
    return (lambda: aq.flash_attn_func(q, k, v, **g),
            lambda: aq.flash_attn_func(q, k, v, output_scale=scale, **g),
            lambda: aq.flash_attn_func(q, k, v, output_block_scale=bscale, ue8m0=True, **g),
            lambda: aq.flash_attn_func(q, k, v, out_dtype="nvfp4", output_scale=scale, output_block_scale=fp4_scales,
                                       **g))


def _prefill_inputs(b, sq, sk, h, hkv, d, dv):
    torch.manual_seed(0)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, sk, hkv, dv, device="cuda", dtype=torch.bfloat16)
    return q, k, v


def _prefill_cases(shapes=()):
    """The PREFILL shapes whose names contain one of `shapes` (all when empty) and the EXTRA_PREFILL
    shapes named in `shapes`, one at a time, as (name, q, k, v, causal, FP8 output scale, FLOPs)
    with fresh inputs."""
    for name, b, sq, sk, h, hkv, d, dv, causal in PREFILL + [s for s in EXTRA_PREFILL if s[0] in shapes]:
        if shapes and not any(x in name for x in shapes):
            continue
        q, k, v = _prefill_inputs(b, sq, sk, h, hkv, d, dv)
        flops = 2 * b * h * sq * sk * (d + dv) / (2 if causal else 1)
        yield name, q, k, v, causal, torch.tensor(0.02, device="cuda"), flops


def prefill_table():
    quant = _quant_fn()
    print("\nprefill (µs, TFLOP/s); 'gluon' = the Hopper warp-specialized kernel, 'portable' = the tl.* kernel")
    print(f"{'prefill shape':<18} {'gluon bf16':>16} {'gluon fp8':>16} {'fp8/bf16':>8} {'gluon grp fp8':>13} "
          f"{'grp/bf16':>8} {'gluon nvfp4':>11} {'fp4/bf16':>8} {'portable fp8':>16} {'SDPA bf16':>22} {'SDPA+quant':>10} {'fp8/SDPA':>8} "
          f"{'fp8/FA4':>7} {'FA4 here':>16} {'fp8/FA4 here':>12}")
    for name, q, k, v, causal, scale, flops in _prefill_cases():
        tf = lambda us: flops / us * 1e-6  # noqa: E731
        cell = lambda us: f"{us:7.0f} ({tf(us):4.0f} TF)"  # noqa: E731
        outs = _gluon_format_calls(q, k, v, causal, scale)
        fa4 = _fa4(q, k, v, causal)
        if fa4:  # FA4 in the same interleaved rounds as our four formats (its first call compiles)
            try:
                fa4()
                outs = outs + (fa4,)
            except Exception as e:  # noqa: BLE001 - FA4 failing on this card or shape: the rest is still timed
                print(f"  (FA4 on {name}: {type(e).__name__}: {str(e)[:120]})")
                fa4 = None
        portable = lambda: aq.flash_attn_func(q, k, v, causal=causal, output_scale=scale, backend="triton")  # noqa: E731
        sdpa, backend = _sdpa(q, k, v, causal)
        sdpa_q = (lambda: quant(sdpa(), scale)) if sdpa else None
        # the outputs alternate over three rounds (median of each) so clock drift hits all
        rounds = [tuple(bench(fn) for fn in outs) for _ in range(3)]
        t_bf16, t_fp8, t_grp, t_fp4, *t_fa4 = (sorted(r[i] for r in rounds)[1] for i in range(len(outs)))
        fa4_cells = f"{cell(t_fa4[0])} {t_fa4[0] / t_fp8:12.2f}" if fa4 else f"{'-':>16} {'-':>12}"
        t_port = bench(portable)
        t_sdpa = bench(sdpa) if sdpa else float("nan")
        t_sdpa_q = bench(sdpa_q) if sdpa else float("nan")
        print(f"{name:<18} {cell(t_bf16)} {cell(t_fp8)} {t_fp8 / t_bf16:8.3f} {t_grp:13.0f} {t_grp / t_bf16:8.3f} "
              f"{t_fp4:11.0f} {t_fp4 / t_bf16:8.3f} {cell(t_port)} {t_sdpa:7.0f} ({tf(t_sdpa):4.0f} TF {backend:>6}) {t_sdpa_q:10.0f} "
              f"{t_sdpa / t_fp8:8.2f} {tf(t_fp8) / FA4_SM90_TF[name]:7.2f} {fa4_cells}")


def _paged(kc, vc, page):
    """The contiguous caches scattered into shuffled pages: (k pages, v pages, block table)."""
    b, sk, hkv, d = kc.shape
    nb = sk // page
    perm = torch.randperm(b * nb, device=kc.device)
    kp = torch.empty(b * nb, page, hkv, d, dtype=kc.dtype, device=kc.device)
    vp = torch.empty_like(kp)
    kp[perm] = kc.reshape(b * nb, page, hkv, d)
    vp[perm] = vc.reshape(b * nb, page, hkv, d)
    return kp, vp, perm.reshape(b, nb).to(torch.int32)


def decode_table(num_splits=0):
    quant = _quant_fn()
    print("\ndecode, CUDA-graph replays (µs, TB/s of K+V); 'eager' = launched from Python")
    print(f"{'decode shape':<16} {'ours bf16':>17} {'ours fused fp8':>17} {'fp8/bf16':>8} {'paged16 fp8':>17} "
          f"{'paged64 fp8':>17} {'SDPA bf16':>16} {'SDPA+quant':>11} {'ours fp8 eager':>14} {'group fp8':>9}")
    for name, b, sk, h, hkv, d in DECODE:
        torch.manual_seed(0)
        q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((b,), sk, dtype=torch.int32, device="cuda")
        scale = torch.tensor(0.02, device="cuda")
        nbytes = 2 * b * sk * hkv * d * 2
        tbs = lambda us: nbytes / us * 1e-6  # noqa: E731
        kw = dict(num_splits=num_splits)
        t_bf16 = bench_graph(lambda: aq.flash_attn_with_kvcache(q, kc, vc, lens, **kw))
        t_fp8 = bench_graph(lambda: aq.flash_attn_with_kvcache(q, kc, vc, lens, output_scale=scale, **kw))
        t_eager = bench(lambda: aq.flash_attn_with_kvcache(q, kc, vc, lens, output_scale=scale, **kw))
        bscale = torch.empty(b, 1, h * d // 128, device="cuda")
        t_grp = bench_graph(lambda: aq.flash_attn_with_kvcache(q, kc, vc, lens, output_block_scale=bscale, **kw))
        t_paged = []
        for page in (16, 64):
            kp, vp, bt = _paged(kc, vc, page)
            t_paged.append(bench_graph(lambda: aq.flash_attn_with_kvcache(q, kp, vp, lens, block_table=bt,
                                                                          output_scale=scale, **kw)))
        sdpa, backend = _sdpa(q, kc, vc, False)
        t_sdpa = bench_graph(sdpa) if sdpa else float("nan")
        t_sdpa_q = bench_graph(lambda: quant(sdpa(), scale)) if sdpa else float("nan")
        cell = lambda us: f"{us:6.1f} ({tbs(us):4.2f} TB/s)"  # noqa: E731
        print(f"{name:<16} {cell(t_bf16):>17} {cell(t_fp8):>17} {t_fp8 / t_bf16:8.3f} {cell(t_paged[0]):>17} "
              f"{cell(t_paged[1]):>17} {t_sdpa:6.1f} ({backend:>7}) {t_sdpa_q:11.1f} {t_eager:14.1f} {t_grp:9.1f}")


SWEEP_PREFILL = [FwdConfig(128, 64, 8, 3, False), FwdConfig(128, 64, 8, 3, True), FwdConfig(128, 128, 8, 3, True),
                 FwdConfig(128, 64, 8, 4, True)]


def sweep():
    print("\nprefill tile sweep (µs, bf16 out / fp8 out)")
    for name, b, sq, sk, h, hkv, d, dv, causal in PREFILL[:3]:
        q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, sk, hkv, dv, device="cuda", dtype=torch.bfloat16)
        scale = torch.tensor(0.02, device="cuda")
        flops = 2 * b * h * sq * sk * (d + dv) / (2 if causal else 1)
        for cfg in SWEEP_PREFILL:
            try:
                t0 = bench(lambda: aq.flash_attn_func(q, k, v, causal=causal, _config=cfg))
                t1 = bench(lambda: aq.flash_attn_func(q, k, v, causal=causal, output_scale=scale, _config=cfg))
                print(f"  {name:<16} {cfg}  {t0:7.0f} {t1:7.0f}  {flops / t1 * 1e-6:4.0f} TF fp8")
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for this tile
                print(f"  {name:<16} {cfg}  failed: {type(e).__name__}: {str(e)[:80]}")
    print("\ndecode split sweep (µs, fp8 out, CUDA-graph replays)")
    for name, b, sk, h, hkv, d in DECODE:
        q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((b,), sk, dtype=torch.int32, device="cuda")
        scale = torch.tensor(0.02, device="cuda")
        for cfg in (FwdConfig(16, 128, 4, 3, False), FwdConfig(16, 128, 4, 3, True), FwdConfig(16, 64, 4, 4, True)):
            res = [bench_graph(lambda: aq.flash_attn_with_kvcache(q, kc, vc, lens, output_scale=scale,
                                                                  num_splits=ns, _config=cfg))
                   for ns in (1, 2, 4, 8, 16)]
            print(f"  {name:<14} {cfg} splits 1/2/4/8/16: " + " ".join(f"{t:6.1f}" for t in res))
        t = bench_graph(lambda: aq.flash_attn_with_kvcache(q, kc, vc, lens, output_scale=scale))
        print(f"  {name:<14} heuristic: {t:6.1f}")
        for page, cfgs in ((16, (FwdConfig(16, 128, 4, 3), FwdConfig(16, 64, 4, 4))),
                           (64, (FwdConfig(16, 64, 4, 5, True), FwdConfig(16, 64, 4, 4, True)))):
            kp, vp, bt = _paged(kc, vc, page)
            for cfg in cfgs:
                res = [bench_graph(lambda: aq.flash_attn_with_kvcache(q, kp, vp, lens, block_table=bt,
                                                                      output_scale=scale, num_splits=ns,
                                                                      _config=cfg))
                       for ns in (4, 8, 16)]
                print(f"  {name:<14} paged{page:<3} {cfg} splits 4/8/16: " + " ".join(f"{t:6.1f}" for t in res))
            t = bench_graph(lambda: aq.flash_attn_with_kvcache(q, kp, vp, lens, block_table=bt, output_scale=scale))
            print(f"  {name:<14} paged{page:<3} heuristic: {t:6.1f}")


def gluon_variants():
    """The Gluon kernel with one feature changed or one stage left out (ABLATE: wrong results,
    timing only): what each part costs, on the PERF.md prefill shapes (fp8 out)."""
    from attnquant.kernels.hopper import launch as hopper

    base_config = hopper.ws_config
    print("\ngluon variants (µs, TFLOP/s; static fp8 out)")
    for name, q, k, v, causal, scale, flops in _prefill_cases():
        base = base_config(q.shape[-1], v.shape[-1])
        variants = {"default": base, "pingpong " + ("off" if base.pingpong else "on"):
                    replace(base, pingpong=not base.pingpong),
                    "persistent " + ("off" if base.persistent else "on"): replace(base, persistent=not base.persistent),
                    "TMA store " + ("off" if base.tma_store else "on"): replace(base, tma_store=not base.tma_store),
                    "PV fence " + ("off" if base.pv_fence else "on"): replace(base, pv_fence=not base.pv_fence),
                    "lazy rescale " + ("off" if base.lazy_rescale else "on"):
                    replace(base, lazy_rescale=not base.lazy_rescale),
                    "L2 sections 4 MB": 4 << 20, "L2 sections 64 MB": 64 << 20,
                    "no softmax (ablate)": replace(base, ablate=1), "no PV gemm (ablate)": replace(base, ablate=2)}
        base_section = hopper.L2_SECTION_BYTES
        for label, variant in variants.items():
            if isinstance(variant, int):
                hopper.L2_SECTION_BYTES = variant
            else:
                hopper.ws_config = lambda d_, dv_, cfg=variant: cfg
            try:
                fn = _gluon_fp8(q, k, v, causal, scale)
                t = bench(fn)
                print(f"  {name:<18} {label:<22} {t:7.0f} ({flops / t * 1e-6:4.0f} TF)", flush=True)
            except Exception as e:  # noqa: BLE001 - e.g. a variant out of shared memory
                print(f"  {name:<18} {label:<22} failed: {type(e).__name__}: {str(e)[:80]}")
            finally:
                hopper.ws_config = base_config
                hopper.L2_SECTION_BYTES = base_section


def _interleaved(fns, rounds=3):
    """Median µs of each fn over `rounds` rounds that run them in turn (the card drifts by a
    few % over seconds: interleaving keeps that out of the comparison)."""
    times = [[bench(fn) for fn in fns] for _ in range(rounds)]
    return [sorted(r[i] for r in times)[rounds // 2] for i in range(len(fns))]


def config_ab(shapes=(), rounds=3, only=()):
    """Gluon tile-config options against the default, interleaved (static fp8 out): whether a
    change to the kernel's schedule is worth it, measured in one run. `shapes`: substrings of
    the PREFILL names to run, `only`: of the config labels besides the default (all when empty)."""
    from attnquant.kernels.hopper import launch as hopper

    print(f"\nconfig A/B (µs; gluon, static fp8 out; median of {rounds} interleaved rounds; ratio to default)")
    for name, q, k, v, causal, scale, flops in _prefill_cases(shapes):
        d, dv = q.shape[-1], v.shape[-1]
        base = hopper.ws_config(d, dv)
        configs = {"default": base}
        for option in ("lazy_rescale", "pingpong", "pv_fence"):
            on = getattr(base, option)
            configs[f"{option.replace('_', ' ')} {'off' if on else 'on'}"] = replace(base, **{option: not on})
        # FA3's whole schedule: the warpgroups' ping-pong and the softmax under its own PV
        configs["pingpong + pv fence flipped"] = replace(base, pingpong=not base.pingpong, pv_fence=not base.pv_fence)
        half = hopper.ws_config(d, dv, block_n=base.block_n // 2)  # (with the stages that then fit)
        configs[f"block_n {half.block_n}, {half.num_stages} stages"] = half
        configs = {label: c for label, c in configs.items()
                   if not only or label == "default" or any(x in label for x in only)}
        fns = [_with_config(hopper, cfg, _gluon_fp8(q, k, v, causal, scale)) for cfg in configs.values()]
        for fn in fns:  # each config's kernel compiled before the timed rounds
            fn()
        t = _interleaved(fns, rounds)
        for label, x in zip(configs, t):
            print(f"  {name:<18} {label:<34} {x:7.0f} ({flops / x * 1e-6:4.0f} TF) {x / t[0]:6.3f}", flush=True)


def _with_config(hopper, cfg, fn):
    """fn, run with hopper.ws_config answering cfg."""
    def run():
        base = hopper.ws_config
        hopper.ws_config = lambda d_, dv_: cfg
        try:
            return fn()
        finally:
            hopper.ws_config = base
    return run


def format_costs():
    """What each output format costs the Gluon kernel, with and without the consumers'
    ping-pong (which staggers the two warpgroups, so one's epilogue can run under the other's
    GEMMs): µs per (config, format), the formats interleaved over three rounds (medians)."""
    from attnquant.kernels.hopper import launch as hopper

    print("\nformat costs (µs; gluon; median of 3 interleaved rounds)")
    print(f"{'shape':<18} {'config':<13} {'bf16':>7} {'fp8':>7} {'grp fp8':>7} {'nvfp4':>7} "
          f"{'fp8/bf16':>8} {'grp/bf16':>8} {'fp4/bf16':>8}")
    for name, q, k, v, causal, scale, _ in _prefill_cases():
        outs = _gluon_format_calls(q, k, v, causal, scale)
        base = hopper.ws_config(q.shape[-1], v.shape[-1])
        for label, cfg in (("default", base), ("pingpong " + ("off" if base.pingpong else "on"),
                                               replace(base, pingpong=not base.pingpong))):
            t = _interleaved([_with_config(hopper, cfg, fn) for fn in outs])
            print(f"{name:<18} {label:<13} " + " ".join(f"{x:7.0f}" for x in t) + " "
                  + " ".join(f"{x / t[0]:8.3f}" for x in t[1:]), flush=True)


def spread():
    """Run-to-run spread of the Gluon kernel (fp8 out) and cuDNN on each prefill shape: four
    do_bench calls each, interleaved (every call's per-launch quantiles, µs), then CUDA-graph
    replay medians. On the lent H100 single launches range over +-10-20 % (perf-notes v9)."""
    import numpy as np

    print("\nspread (µs per launch: min / p10 / median / p90 / max of one do_bench call)")
    for name, q, k, v, causal, scale, _ in _prefill_cases():
        runs = {"gluon fp8": _gluon_fp8(q, k, v, causal, scale),
                "SDPA bf16": _sdpa(q, k, v, causal)[0]}
        for _ in range(4):
            for label, fn in runs.items():
                ts = np.array(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")) * 1e3
                qs = np.percentile(ts, [0, 10, 50, 90, 100])
                print(f"  {name:<18} {label:<10} " + " / ".join(f"{x:6.0f}" for x in qs), flush=True)
        for label, fn in runs.items():
            print(f"  {name:<18} {label:<10} graph replay median {bench_graph(fn):6.0f}", flush=True)


POWER_PLAN = ["prefill_mla_4k:gluon", "prefill_mla_4k:sdpa", "prefill_gqa_8k:gluon", "prefill_gqa_8k:sdpa"]


def power_trace(plan=None, seconds=3.0):
    """Is the spread the card's clock? Each step of `plan` ("shape:gluon|gluon2|gluon64|sdpa[:pause
    s]", a PREFILL or EXTRA_PREFILL name; the Gluon kernel with fp8 out — gluon2: two consumers
    whatever launch.for_problem would pick, gluon64: 64-key blocks and as many stages as fit — or
    SDPA) runs back to back for `seconds` (after an idle pause, if given) while nvidia-smi samples the SM clock, power draw and throttle
    reasons every 50 ms; per 250 ms window: the median launch time next to them."""
    import numpy as np

    from attnquant.kernels.hopper import launch as hopper

    base_config = hopper.ws_config
    fields = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active,clocks.mem"
    shapes = {s[0]: s for s in PREFILL + EXTRA_PREFILL}
    print("\npower trace (per 250 ms window: median µs per launch | SM MHz | W | °C | throttle reasons | mem MHz)")
    for step in plan or POWER_PLAN:
        name, kind, *pause = step.split(":")
        _, b, sq, sk, h, hkv, d, dv, causal = shapes[name]
        q, k, v = _prefill_inputs(b, sq, sk, h, hkv, d, dv)
        scale = torch.tensor(0.02, device="cuda")
        if kind.startswith("gluon"):  # "gluon64": 64-key blocks, as many stages as fit
            config = hopper.ws_config(d, dv, block_n=64 if kind == "gluon64" else None)
            if kind == "gluon2":
                config = replace(config, auto_consumers=False)
            hopper.ws_config = lambda d_, dv_, cfg=config: cfg
            fn = _gluon_fp8(q, k, v, causal, scale)
        else:
            fn = _sdpa(q, k, v, causal)[0]
        try:
            events, samples = _trace(fn, float(pause[0]) if pause else 0.0, seconds, fields)
        finally:
            hopper.ws_config = base_config
        label = f"{kind} (pause {pause[0]} s)" if pause else kind
        # nvidia-smi's timestamps are wall-clock strings: align the samples to the run evenly
        windows = int(seconds / 0.25)
        for w in range(windows):
            ts = [t for when, t in events if w * 0.25 <= when < (w + 1) * 0.25]
            sm = samples[w * len(samples) // windows:max((w + 1) * len(samples) // windows, 1)]
            if not ts or not sm:
                continue
            mhz = np.median([float(x[1]) for x in sm])
            watts = np.median([float(x[2]) for x in sm])
            reasons = sorted({x[4] for x in sm})
            print(f"  {name:<16} {label:<18} {w * 250:5d} ms {np.median(ts):7.0f} µs | {mhz:5.0f} MHz | "
                  f"{watts:4.0f} W | {sm[-1][3]} °C | {' '.join(reasons)} | {sm[-1][5]}", flush=True)


def _trace(fn, pause, seconds, fields):
    """fn once, `pause` s idle, then fn back to back for `seconds` under nvidia-smi sampling:
    ([(host s since start, µs of one launch)], [nvidia-smi sample fields])."""
    import subprocess
    import tempfile
    import time

    fn()
    torch.cuda.synchronize()
    time.sleep(pause)
    with tempfile.NamedTemporaryFile("r", suffix=".csv") as log:
        smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits",
                                "-lms", "50", "-f", log.name])
        time.sleep(0.3)
        events, t0 = [], time.time()
        while time.time() - t0 < seconds:  # launch in chunks, stamp the host time per chunk
            chunk = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                     for _ in range(10)]
            for a, z in chunk:
                a.record()
                fn()
                z.record()
            chunk[-1][1].synchronize()
            now = time.time() - t0
            events += [(now, a.elapsed_time(z) * 1e3) for a, z in chunk]
        smi.terminate()
        smi.wait()
        samples = [line.split(", ") for line in open(log.name).read().splitlines()
                   if line.count(",") == fields.count(",")]
    return events, samples[6:]  # (the samples of the 0.3 s before the first launch dropped)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="tile-config and split sweeps instead of the tables")
    ap.add_argument("--gluon-variants", action="store_true", help="Gluon kernel variants / ablations only")
    ap.add_argument("--spread", action="store_true", help="run-to-run spread of the Gluon kernel and cuDNN")
    ap.add_argument("--configs", nargs="*", metavar="SHAPE",
                    help="Gluon config options vs the default, interleaved (on the PREFILL shapes whose names "
                         "contain a SHAPE; all when none is given)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --configs")
    ap.add_argument("--only", nargs="*", default=(), metavar="LABEL", help="--configs: the configs whose labels "
                    "contain a LABEL (and the default)")
    ap.add_argument("--formats", action="store_true", help="each output format's cost, ping-pong off and on")
    ap.add_argument("--power", nargs="*", metavar="SHAPE:gluon|sdpa[:PAUSE]",
                    help="launch times next to the SM clock and power draw (default plan: POWER_PLAN)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("the benchmark needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if args.sweep:
        sweep()
        return
    if args.gluon_variants:
        gluon_variants()
        return
    if args.spread:
        spread()
        return
    if args.formats:
        format_costs()
        return
    if args.configs is not None:
        config_ab(args.configs, args.rounds, args.only)
        return
    if args.power is not None:
        power_trace(args.power)
        return
    prefill_table()
    decode_table()


if __name__ == "__main__":
    main()
