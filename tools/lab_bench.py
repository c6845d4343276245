"""The lab's measurements of the kernels (the product's benchmark is `python -m attnquant.bench`):

    python tools/lab_bench.py --sweep            # portable-kernel tile / split sweeps (kernels/portable/config.py)
    python tools/lab_bench.py --fp8-kv-sweep     # the same for decode against an FP8 cache
    python tools/lab_bench.py --configs [SHAPE]  # Gluon WsConfig options vs the default, interleaved (d64: 3 consumers)
    python tools/lab_bench.py --formats          # each output format's cost, ping-pong off / on
    python tools/lab_bench.py --spread           # per-launch spread, Gluon kernel vs cuDNN
    python tools/lab_bench.py --power            # launch times next to the SM clock and power draw
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attnquant as aq  # noqa: E402
from attnquant.bench import (DECODE, EXTRA_PREFILL, PREFILL, _sdpa, bench, bench_graph, format_call,  # noqa: E402
                             interleaved, paged, prefill_cases, prefill_inputs)
from attnquant.kernels.hopper.config import ws_config  # noqa: E402
from attnquant.kernels.portable.config import FwdConfig  # noqa: E402

FORMATS = ("bf16", "fp8", "group", "nvfp4")


def _gluon_fp8(q, k, v, causal, scale, cfg=None):
    """The Hopper kernel with static FP8 output (and config `cfg`, else its own)."""
    return lambda: aq.flash_attn_func(q, k, v, causal=causal, output_scale=scale, backend="gluon", _config=cfg)


SWEEP_PREFILL = [FwdConfig(128, 64, 8, 3, False), FwdConfig(128, 64, 8, 3, True), FwdConfig(128, 128, 8, 3, True),
                 FwdConfig(128, 64, 8, 4, True)]


def sweep():
    print("\nprefill tile sweep (µs, bf16 out / fp8 out; the portable kernel)")
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
        for cfg in (FwdConfig(16, 128, 4, 3, False), FwdConfig(16, 128, 4, 3, True), FwdConfig(16, 64, 4, 4, True),
                    FwdConfig(16, 128, 4, 3, True, pdl=True)):  # (pdl: the split combine as a dependent launch)
            res = [bench_graph(lambda: aq.flash_attn_with_kvcache(q, kc, vc, lens, output_scale=scale,
                                                                  num_splits=ns, _config=cfg))
                   for ns in (1, 2, 4, 8, 16)]
            print(f"  {name:<14} {cfg} splits 1/2/4/8/16: " + " ".join(f"{t:6.1f}" for t in res))
        t = bench_graph(lambda: aq.flash_attn_with_kvcache(q, kc, vc, lens, output_scale=scale))
        print(f"  {name:<14} heuristic: {t:6.1f}")
        for page, cfgs in ((16, (FwdConfig(16, 128, 4, 3), FwdConfig(16, 64, 4, 4))),
                           (64, (FwdConfig(16, 64, 4, 5, True), FwdConfig(16, 64, 4, 4, True)))):
            kp, bt = paged(kc, page)
            vp, _ = paged(vc, page)
            for cfg in cfgs:
                res = [bench_graph(lambda: aq.flash_attn_with_kvcache(q, kp, vp, lens, block_table=bt,
                                                                      output_scale=scale, num_splits=ns,
                                                                      _config=cfg))
                       for ns in (4, 8, 16)]
                print(f"  {name:<14} paged{page:<3} {cfg} splits 4/8/16: " + " ".join(f"{t:6.1f}" for t in res))
            t = bench_graph(lambda: aq.flash_attn_with_kvcache(q, kp, vp, lens, block_table=bt, output_scale=scale))
            print(f"  {name:<14} paged{page:<3} heuristic: {t:6.1f}")


FP8_KV_CONFIGS = [FwdConfig(16, 128, 4, 3, True), FwdConfig(16, 128, 4, 5, True),
                  FwdConfig(16, 128, 4, 3, True, f16_dots=True), FwdConfig(16, 128, 4, 5, True, f16_dots=True),
                  FwdConfig(16, 64, 4, 6, True), FwdConfig(16, 256, 4, 3, True)]


def fp8_kv_sweep():
    """Decode against an FP8 cache: tile configs (bf16 or fp16 dots: FwdConfig.f16_dots) x key
    splits, contiguous and in shuffled pages of 16 (CUDA-graph replays, fp8 out). Its blocks are
    half a bf16 block's bytes (kernels/portable/config.py picks from this)."""
    print("\nFP8-KV decode sweep (µs, fp8 out, CUDA-graph replays)")
    for name, b, sk, h, hkv, d in DECODE:
        q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
        kq, kd = aq.quantize_kv_fp8(torch.randn(b, sk, hkv, d, device="cuda"))
        vq, vd = aq.quantize_kv_fp8(torch.randn(b, sk, hkv, d, device="cuda"))
        lens = torch.full((b,), sk, dtype=torch.int32, device="cuda")
        scale = torch.tensor(0.02, device="cuda")
        # K and V in the same shuffled pages (one seed); as bytes, which indexing takes
        kp, table = paged(kq.view(torch.uint8), 16, torch.Generator(device="cuda").manual_seed(0))
        vp, _ = paged(vq.view(torch.uint8), 16, torch.Generator(device="cuda").manual_seed(0))
        for layout, (kc, vc, bt) in (("contiguous", (kq, vq, None)),
                                     ("page 16", (kp.view(kq.dtype), vp.view(vq.dtype), table))):
            kw = dict(output_scale=scale, k_descale=kd, v_descale=vd, block_table=bt)
            for cfg in FP8_KV_CONFIGS:
                try:
                    res = [bench_graph(lambda: aq.flash_attn_with_kvcache(q, kc, vc, lens, num_splits=ns, _config=cfg,
                                                                          **kw)) for ns in (0, 2, 4, 8, 16)]
                    print(f"  {name:<14} {layout:<10} {cfg} splits heur/2/4/8/16: "
                          + " ".join(f"{t:6.1f}" for t in res), flush=True)
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory or registers for this tile
                    print(f"  {name:<14} {layout:<10} {cfg} failed: {type(e).__name__}: {str(e)[:80]}")
            t = bench_graph(lambda: aq.flash_attn_with_kvcache(q, kc, vc, lens, **kw))
            print(f"  {name:<14} {layout:<10} default: {t:6.1f}")


def config_ab(shapes=(), rounds=3, only=()):
    """Gluon tile-config options against the default, interleaved (static fp8 out): whether a
    change to the kernel's schedule is worth it, measured in one run. `shapes`: substrings of
    the PREFILL names to run, `only`: of the config labels besides the default (all when empty)."""
    print(f"\nconfig A/B (µs; gluon, static fp8 out; median of {rounds} interleaved rounds; ratio to default)")
    for name, q, k, v, causal, scale, flops in prefill_cases(shapes):
        d, dv = q.shape[-1], v.shape[-1]
        base = ws_config(d, dv)
        configs = {"default": base}
        for option in ("lazy_rescale", "pingpong", "tma_store", "persistent"):
            on = getattr(base, option)
            configs[f"{option.replace('_', ' ')} {'off' if on else 'on'}"] = replace(base, **{option: not on})
        configs["L2 sections 4 MB"] = replace(base, l2_section_bytes=4 << 20)
        configs["L2 sections 64 MB"] = replace(base, l2_section_bytes=64 << 20)
        half = ws_config(d, dv, block_n=base.block_n // 2)  # (with the stages that then fit)
        configs[f"block_n {half.block_n}, {half.num_stages} stages"] = half
        # 192-row tiles (FA3's for d 64): three consumers, 64-key blocks, or at d <= 64 (O in 32
        # registers a thread) 128-key blocks with the intra-warpgroup overlap, which compile
        # without spills in the key-block loops (scripts/compile_sm90.py)
        three = replace(ws_config(d, dv, consumers=3), auto_consumers=False)
        configs[f"3 consumers, block_n {three.block_n}, {three.num_stages} stages"] = three
        if max(d, dv) <= 64:
            wide = replace(ws_config(d, dv, block_n=128, consumers=3), auto_consumers=False, intra_overlap=True)
            configs[f"3 consumers, block_n 128, {wide.num_stages} stages"] = wide
        configs = {label: c for label, c in configs.items()
                   if not only or label == "default" or any(x in label for x in only)}
        fns = [_gluon_fp8(q, k, v, causal, scale, cfg) for cfg in configs.values()]
        outs = [fn()[0].float() * scale for fn in fns]  # (each config compiled before the timed rounds)
        amax = outs[0].abs().max().item()
        t = interleaved(fns, rounds)
        for label, x, o in zip(configs, t, outs):
            off = (o - outs[0]).abs().max().item() / max(amax, 1e-6)  # a config that computes wrong is flagged
            print(f"  {name:<18} {label:<40} {x:7.0f} ({flops / x * 1e-6:4.0f} TF) {x / t[0]:6.3f}"
                  f"{'' if off < 0.05 else f'   OUTPUT OFF by {off:.2f} of max|O|'}", flush=True)


def format_costs():
    """What each output format costs the Gluon kernel, with and without the consumers'
    ping-pong (which staggers the two warpgroups, so one's epilogue can run under the other's
    GEMMs): µs per (config, format), the formats interleaved over three rounds (medians)."""
    print("\nformat costs (µs; gluon; median of 3 interleaved rounds)")
    print(f"{'shape':<18} {'config':<13} {'bf16':>7} {'fp8':>7} {'grp fp8':>7} {'nvfp4':>7} "
          f"{'fp8/bf16':>8} {'grp/bf16':>8} {'fp4/bf16':>8}")
    for name, q, k, v, causal, scale, _ in prefill_cases():
        base = ws_config(q.shape[-1], v.shape[-1])
        for label, cfg in (("default", base), ("pingpong " + ("off" if base.pingpong else "on"),
                                               replace(base, pingpong=not base.pingpong))):
            t = interleaved([format_call(aq, fmt, q, k, v, causal, scale, backend="gluon", _config=cfg)
                             for fmt in FORMATS])
            print(f"{name:<18} {label:<13} " + " ".join(f"{x:7.0f}" for x in t) + " "
                  + " ".join(f"{x / t[0]:8.3f}" for x in t[1:]), flush=True)


def spread():
    """Run-to-run spread of the Gluon kernel (fp8 out) and cuDNN on each prefill shape: four
    do_bench calls each, interleaved (every call's per-launch quantiles, µs), then CUDA-graph
    replay medians. Single launches range over +-10-20 % on an H100."""
    import numpy as np

    print("\nspread (µs per launch: min / p10 / median / p90 / max of one do_bench call)")
    for name, q, k, v, causal, scale, _ in prefill_cases():
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

    fields = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active,clocks.mem"
    shapes = {s[0]: s for s in PREFILL + EXTRA_PREFILL}
    print("\npower trace (per 250 ms window: median µs per launch | SM MHz | W | °C | throttle reasons | mem MHz)")
    for step in plan or POWER_PLAN:
        name, kind, *pause = step.split(":")
        _, b, sq, sk, h, hkv, d, dv, causal = shapes[name]
        q, k, v = prefill_inputs(b, sq, sk, h, hkv, d, dv)
        scale = torch.tensor(0.02, device="cuda")
        if kind.startswith("gluon"):  # "gluon64": 64-key blocks, as many stages as fit
            config = ws_config(d, dv, block_n=64 if kind == "gluon64" else None)
            if kind == "gluon2":
                config = replace(config, auto_consumers=False)
            fn = _gluon_fp8(q, k, v, causal, scale, config)
        else:
            fn = _sdpa(q, k, v, causal)[0]
        events, samples = _trace(fn, float(pause[0]) if pause else 0.0, seconds, fields)
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
    ap.add_argument("--sweep", action="store_true", help="the portable kernel's tile-config and split sweeps")
    ap.add_argument("--fp8-kv-sweep", action="store_true", help="tile configs x splits of FP8-cache decode")
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
        sys.exit("the lab's measurements need a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if args.sweep:
        sweep()
    if args.fp8_kv_sweep:
        fp8_kv_sweep()
    if args.spread:
        spread()
    if args.formats:
        format_costs()
    if args.configs is not None:
        config_ab(args.configs, args.rounds, args.only)
    if args.power is not None:
        power_trace(args.power)


if __name__ == "__main__":
    main()
