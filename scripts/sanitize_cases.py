"""Small calls through every kernel path, for compute-sanitizer (memcheck, racecheck, synccheck):

    compute-sanitizer --tool racecheck python scripts/sanitize_cases.py

The Gluon kernel (sm_90): causal and not, head dims 64 / 128 / 192-128, 2 and 3 consumer
warpgroups, varlen, the split last wave (a small non-causal batched call splits its tiles over
the idle SMs), every output format; the portable kernel: decode against contiguous and paged
caches with split-KV, windows and softcap, varlen; merge_attn_states; plan/run replays. Shapes are tiny: the
sanitizers run the kernels 10-100x slower. Every result is checked against the float64
reference loosely (a sanitizer run is not a numerics test; this catches a call that silently
did nothing), and the script exits non-zero if one is off.
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attnquant as aq  # noqa: E402
from attnquant import quant  # noqa: E402
from attnquant.kernels.hopper.config import ws_config  # noqa: E402
from attnquant.reference import attention_ref_batched, attention_ref_kvcache, attention_ref_varlen  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU: Triton's interpreter, portable paths only)
BF16 = torch.bfloat16
failures = []


def randn(*shape):
    return torch.randn(*shape, device=DEV).to(BF16)


def formats(ref):
    """kwargs of each output format for an output like `ref` (..., H, Dv)."""
    *tok, h, dv = ref.shape
    t = 1
    for n in tok:
        t *= n
    amax = ref.abs().max().float()
    return {
        "bf16": {},
        "fp8": dict(output_scale=(amax / 100).reshape(())),
        "group": dict(output_block_scale=torch.empty(*tok, h * dv // 64, device=DEV)),
        "nvfp4": dict(out_dtype="nvfp4", output_scale=(448 * 6 / amax).reshape(()),
                      output_block_scale=torch.empty(quant.nvfp4_scale_shape(t, h, dv), device=DEV,
                                                     dtype=torch.float8_e4m3fn)),
    }


def check(name, out, kw, ref):
    """out dequantized against ref: within 8 % of max|ref| (NVFP4: 20 %; its top step is a third of
    a block's max)."""
    if "out_dtype" in kw:  # NVFP4
        *tok, h, half = out.shape
        t = 1
        for n in tok:
            t *= n
        sf = quant.unswizzle_block_scale(kw["output_block_scale"], t, h * half // 8).reshape(*tok, h, -1)
        deq = quant.dequantize_e2m1(out) * sf.double().repeat_interleave(16, -1) / kw["output_scale"].double()
    elif "output_block_scale" in kw:
        deq = out.double() * kw["output_block_scale"].double().unflatten(-1, (out.shape[-2], -1)).repeat_interleave(
            64, -1)
    elif "output_scale" in kw:
        deq = out.double() * kw["output_scale"].double()
    else:
        deq = out.double()
    err = (deq - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    ok = err < (0.2 if "out_dtype" in kw else 0.08)
    print(f"{name:<58} max err / max|ref| {err:.3f} {'ok' if ok else 'OFF'}", flush=True)
    if not ok:
        failures.append(name)


def prefill(name, b, sq, sk, h, hkv, d, dv, causal, backend, fmts=("bf16", "fp8", "group", "nvfp4"), config=None):
    q, k, v = randn(b, sq, h, d), randn(b, sk, hkv, d), randn(b, sk, hkv, dv)
    ref, _ = attention_ref_batched(q, k, v, causal=causal)
    for fmt, kw in formats(ref).items():
        if fmt in fmts:
            out, _ = aq.flash_attn_func(q, k, v, causal=causal, backend=backend, _config=config, **kw)
            check(f"{name} {fmt}", out, kw, ref)


def three_consumers(d, dv):
    """The 3-consumer, serial 128-key-block config the launcher picks for large non-causal calls."""
    return replace(ws_config(d, dv, 128, consumers=3), intra_overlap=False, auto_consumers=False)


def main():
    torch.manual_seed(0)
    if DEV == "cuda" and torch.cuda.get_device_capability() == (9, 0):
        prefill("gluon causal d128 gqa", 1, 200, 200, 4, 2, 128, 128, True, "gluon")
        prefill("gluon non-causal d64 (last wave split)", 2, 130, 300, 2, 1, 64, 64, False, "gluon")
        prefill("gluon causal d192-128 mqa", 1, 150, 150, 4, 1, 192, 128, True, "gluon", ("fp8", "group", "nvfp4"))
        prefill("gluon non-causal d128, 3 consumers (split)", 1, 200, 260, 2, 2, 128, 128, False, "gluon",
                config=three_consumers(128, 128))
        lens_q, lens_k = [70, 0, 130], [90, 5, 130]
        cq = torch.tensor([0, 70, 70, 200], dtype=torch.int32, device=DEV)
        ck = torch.tensor([0, 90, 95, 225], dtype=torch.int32, device=DEV)
        q, k, v = randn(200, 4, 64), randn(225, 2, 64), randn(225, 2, 64)
        ref, _ = attention_ref_varlen(q, k, v, cq, ck, causal=True)
        kw = formats(ref)["fp8"]
        out, _ = aq.flash_attn_varlen_func(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=True, backend="gluon",
                                           **kw)
        check("gluon varlen causal d64 fp8", out, kw, ref)
    prefill("portable window+softcap d96", 1, 40, 70, 4, 2, 96, 96, False, "triton", ("bf16", "fp8"))
    # decode: contiguous and paged (page 16: the per-key gather; page 64: block pointers), split-KV
    b, h, hkv, d = 3, 8, 2, 128
    seqlens = torch.tensor([700, 33, 1024], dtype=torch.int32, device=DEV)
    q = randn(b, 1, h, d)
    kc, vc = randn(b, 1024, hkv, d), randn(b, 1024, hkv, d)
    ref, _ = attention_ref_kvcache(q, kc, vc, seqlens)
    for fmt, kw in formats(ref).items():
        out, _ = aq.flash_attn_with_kvcache(q, kc, vc, seqlens, num_splits=4, **kw)
        check(f"decode contiguous split-KV {fmt}", out, kw, ref)
    for page in (16, 64):
        pages = b * 1024 // page
        perm = torch.randperm(pages, device=DEV)
        table = perm.reshape(b, -1).to(torch.int32)
        kp = torch.empty(pages, page, hkv, d, device=DEV, dtype=BF16)
        vp = torch.empty_like(kp)
        kp[perm] = kc.reshape(pages, page, hkv, d)  # sequence b's i-th page lives at table[b, i]
        vp[perm] = vc.reshape(pages, page, hkv, d)
        kw = formats(ref)["fp8"]
        out, _ = aq.flash_attn_with_kvcache(q, kp, vp, seqlens, block_table=table, **kw)
        check(f"decode paged page {page} fp8", out, kw, ref)
    # FP8 (e4m3) K/V cache with per-(batch, KV head) descales, split-KV
    kq, kd = quant.quantize_kv_fp8(kc)
    vq, vd = quant.quantize_kv_fp8(vc)
    ref8, _ = attention_ref_kvcache(q, quant.dequantize_kv_fp8(kq, kd), quant.dequantize_kv_fp8(vq, vd), seqlens)
    kw = formats(ref8)["fp8"]
    out, _ = aq.flash_attn_with_kvcache(q, kq, vq, seqlens, num_splits=4, k_descale=kd, v_descale=vd, **kw)
    check("decode fp8 KV cache split-KV fp8", out, kw, ref8)
    # learnable sinks: decode with split-KV (counted once, in the combine) and, on sm_90, Gluon prefill
    sinks = torch.randn(h, device=DEV)
    ref, _ = attention_ref_kvcache(q, kc, vc, seqlens, sinks=sinks)
    kw = formats(ref)["fp8"]
    out, _ = aq.flash_attn_with_kvcache(q, kc, vc, seqlens, num_splits=4, sinks=sinks, **kw)
    check("decode sinks split-KV fp8", out, kw, ref)
    if DEV == "cuda" and torch.cuda.get_device_capability() == (9, 0):
        qs, ks, vs = randn(1, 200, 4, 64), randn(1, 200, 2, 64), randn(1, 200, 2, 64)
        sinks = torch.randn(4, device=DEV)
        ref, _ = attention_ref_batched(qs, ks, vs, causal=True, sinks=sinks)
        kw = formats(ref)["fp8"]
        out, _ = aq.flash_attn_func(qs, ks, vs, causal=True, sinks=sinks, backend="gluon", **kw)
        check("gluon sinks causal d64 fp8", out, kw, ref)
    # plan/run: replays pass raw addresses and rebuilt TMA descriptors (memcheck's to check)
    ref, _ = attention_ref_kvcache(q, kc, vc, seqlens)
    kw = formats(ref)["nvfp4"]
    step = aq.plan(aq.flash_attn_with_kvcache, q, kc, vc, seqlens, num_splits=4, **kw)
    q2, kc2, vc2 = randn(b, 1, h, d), randn(b, 1024, hkv, d), randn(b, 1024, hkv, d)
    ref, _ = attention_ref_kvcache(q2, kc2, vc2, seqlens)
    kw = formats(ref)["nvfp4"]
    out, _ = step.run(q2, kc2, vc2, output_scale=kw["output_scale"], output_block_scale=kw["output_block_scale"])
    check("plan.run decode split-KV nvfp4", out, kw, ref)
    if DEV == "cuda" and torch.cuda.get_device_capability() == (9, 0):
        step = aq.plan(aq.flash_attn_func, qs, ks, vs, causal=True, backend="gluon")
        qs, ks, vs = randn(1, 200, 4, 64), randn(1, 200, 2, 64), randn(1, 200, 2, 64)
        ref, _ = attention_ref_batched(qs, ks, vs, causal=True)
        out, _ = step.run(qs, ks, vs)
        check("plan.run gluon causal d64 bf16", out, {}, ref)
    t, dv = 50, 128
    pre, suf = randn(t, h, dv), randn(t, h, dv)
    lp, ls = torch.randn(h, t, device=DEV), torch.randn(h, t, device=DEV)
    w = torch.softmax(torch.stack([lp, ls]).double(), 0).transpose(1, 2)[..., None]
    ref = pre.double() * w[0] + suf.double() * w[1]
    for fmt, kw in formats(ref).items():
        out, _ = aq.merge_attn_states(pre, lp, suf, ls, **kw)
        check(f"merge_attn_states {fmt}", out, kw, ref)
    if DEV == "cuda":
        torch.cuda.synchronize()
    if failures:
        sys.exit(f"off: {failures}")
    print("all calls ran and match the reference")


if __name__ == "__main__":
    main()
