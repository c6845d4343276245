"""Demo: one causal GQA prefill attention whose output leaves the kernel as FP8, then as NVFP4.

    python -m attnquant.demo

On a GPU it runs a real-sized attention and also times (CUDA-graph replays) the fused FP8
output against our bf16 output followed by a separate (torch.compile'd) quantization, and the
fused NVFP4 output. Without a GPU it runs a small case on the CPU through Triton's interpreter.
"""

import torch

import attnquant as aq  # without a GPU, this selects Triton's interpreter
from attnquant import quant
from attnquant.reference import attention_ref_batched


def main():
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float16  # the interpreter's bf16 dot is wrong
    b, s, h, hkv, d = (2, 2048, 32, 8, 128) if gpu else (1, 64, 4, 2, 64)
    torch.manual_seed(0)
    q = torch.randn(b, s, h, d, device=dev, dtype=dtype)
    k = torch.randn(b, s, hkv, d, device=dev, dtype=dtype)
    v = torch.randn(b, s, hkv, d, device=dev, dtype=dtype)
    scale = torch.tensor(0.01, device=dev)  # static dequant scale (calibrated offline in practice): out * scale ~ O

    out, lse = aq.flash_attn_func(q, k, v, causal=True, output_scale=scale, return_lse=True)
    print(f"{'GPU ' + torch.cuda.get_device_name() if gpu else 'CPU (Triton interpreter)'}: "
          f"q {tuple(q.shape)} {dtype}, k/v {tuple(k.shape)}, causal, out {out.dtype}")

    n = 1 if gpu else b  # the float64 reference on a slice keeps the demo quick
    ref, _ = attention_ref_batched(q[:n], k[:n], v[:n], causal=True)
    fmt = quant.OutputFormat(quant.FP8_STATIC, torch.float8_e4m3fn, scale=scale)
    deq = quant.dequantize(out[:n], fmt)
    ref_q = quant.dequantize(quant.quantize(ref.float(), fmt)[0], fmt)
    rel = lambda x: ((x - ref).norm() / ref.norm()).item()  # noqa: E731
    print(f"relative error vs float64 reference: fused FP8 {rel(deq):.3e}  "
          f"(the FP8 rounding of the exact output alone: {rel(ref_q):.3e})")

    # NVFP4: gs = 448 * 6 / amax (vLLM's convention; amax calibrated, here on a bf16 run), block
    # scales written by the kernel in the swizzled layout FP4 GEMMs read
    gs = (448 * 6 / aq.flash_attn_func(q, k, v, causal=True)[0].abs().max()).float()
    sf = torch.empty(quant.nvfp4_scale_shape(b * s, h, d), dtype=torch.float8_e4m3fn, device=dev)
    fp4, _ = aq.flash_attn_func(q, k, v, causal=True, out_dtype="nvfp4", output_scale=gs, output_block_scale=sf)
    fmt4 = quant.OutputFormat(quant.NVFP4, torch.uint8, scale=gs, block_scale=sf)
    sf_rows = quant.unswizzle_block_scale(sf, b * s, h * d // quant.NVFP4_BLOCK).view(b, s, h, -1)
    deq4 = quant.dequantize(fp4[:n], fmt4, sf_rows[:n])
    q4, sf4 = quant.quantize(ref.float(), fmt4)
    ref4 = quant.dequantize(q4, fmt4, sf4)
    print(f"NVFP4 out {tuple(fp4.shape)} {fp4.dtype}: relative error {rel(deq4):.3e}  "
          f"(the NVFP4 rounding of the exact output alone: {rel(ref4):.3e})")

    if gpu:
        from attnquant.bench import bench_graph

        @torch.compile
        def separate_quant(o, s):
            return (o.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)

        # CUDA-graph replays: the GPU time. Launched eagerly from Python, a call of this size
        # (~0.1-0.2 ms of GPU work) measures mostly the host side, and the comparison is noise.
        t_fused = bench_graph(lambda: aq.flash_attn_func(q, k, v, causal=True, output_scale=scale))
        t_bf16 = bench_graph(lambda: aq.flash_attn_func(q, k, v, causal=True))
        t_two = bench_graph(lambda: separate_quant(aq.flash_attn_func(q, k, v, causal=True)[0], scale))
        t_fp4 = bench_graph(lambda: aq.flash_attn_func(q, k, v, causal=True, out_dtype="nvfp4", output_scale=gs,
                                                       output_block_scale=sf))
        print(f"GPU time (CUDA-graph replays): fused FP8 output {t_fused:.0f} us | bf16 output {t_bf16:.0f} us | "
              f"bf16 + separate quantization {t_two:.0f} us | fused NVFP4 output {t_fp4:.0f} us")

if __name__ == "__main__":
    main()
