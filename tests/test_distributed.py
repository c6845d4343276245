"""Context parallelism (attnquant.distributed) in real multi-process groups: gloo on the CPU
(the interpreter kernels), NCCL on GPUs when a machine has several. Each rank checks its own
output against float64 attention of the whole sequence (the SPEC bound, every output
format), so a wrong merge, mask, shard order or a partial quantized too early fails there.

One spawn per world size runs every case (starting processes costs more than the cases).
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnquant import distributed as cp
from attnquant.reference import attention_ref_batched, attention_ref_kvcache

from .helpers import DTYPES, ON_GPU, check_lse, check_output, format_kwargs, make_format

KINDS = ["plain", torch.float8_e4m3fn, "group", "nvfp4"]
NCCL = ON_GPU and torch.cuda.device_count() >= 2


def _inputs(seed, shape, dtype, device):
    g = torch.Generator().manual_seed(seed)  # the same global tensors on every rank
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def _ring_cases(world, rank, dtype, device):
    """context_parallel_attention: zig-zag causal and not; contiguous shards with an empty one."""
    b, h, hkv, d = 2, 4, 2, 64
    cases = [("zigzag", True, 6 * world, None), ("zigzag", False, 4 * world, None),
             ("contiguous", True, None, [5, 0, 7, 3][:world])]
    for layout, causal, total, lens in cases:
        total = total or sum(lens)
        q = _inputs(1, (b, total, h, d), dtype, device)
        k = _inputs(2, (b, total, hkv, d), dtype, device)
        v = _inputs(3, (b, total, hkv, d), dtype, device)
        ref, ref_lse = attention_ref_batched(q, k, v, causal=causal)
        eager, _ = attention_ref_batched(q, k, v, causal=causal, eager_dtype=dtype)
        if layout == "zigzag":
            shard = lambda x, dim=1: cp.zigzag_shard(x, world, rank, dim)  # noqa: E731
        else:
            start = sum(lens[:rank])
            shard = lambda x, dim=1: x.narrow(dim, start, lens[rank])  # noqa: E731
        ref_local, eager_local = shard(ref), shard(eager)
        empty = ref_local.shape[1] == 0  # (a rank with no tokens still relays the K/V shards)
        for kind in KINDS:
            fmt = make_format(kind, dtype, ref_local)
            out, lse = cp.context_parallel_attention(shard(q), shard(k), shard(v), causal=causal, layout=layout,
                                                     shard_lens=lens, return_lse=True, **format_kwargs(fmt))
            what = f"ring world={world} rank={rank} {layout} causal={causal} out={kind}"
            if empty:
                assert out.shape == fmt.out_shape((b, 0, h, d)) and lse.shape == (b, h, 0), what
            else:
                check_output(out, fmt, ref_local, eager_local, what=what)
                check_lse(lse, shard(ref_lse, 2), what)
    # a NaN key reaches every query of its sequence on every rank (non-causal), in every format
    q = _inputs(1, (2, 4 * world, 4, 64), dtype, device)
    k = _inputs(2, (2, 4 * world, 2, 64), dtype, device)
    k[0, 4 * world - 1, 0, 0] = float("nan")  # (the last chunk: rank 0's second half)
    for kw in ({}, dict(output_scale=torch.tensor(0.01, device=device))):
        out, lse = cp.context_parallel_attention(cp.zigzag_shard(q, world, rank), cp.zigzag_shard(k, world, rank),
                                                 cp.zigzag_shard(k, world, rank), return_lse=True, **kw)
        o = out.float()
        assert o[0, :, :2].isnan().all() and lse[0, :2].isnan().all(), f"ring rank {rank}: NaN key hidden"
        assert o[1].isfinite().all() and o[0, :, 2:].isfinite().all(), f"ring rank {rank}: NaN spread"
    # the zig-zag helpers are each other's inverse
    x = _inputs(4, (2, 4 * world, 3), dtype, device)
    shards = [cp.zigzag_shard(x, world, r) for r in range(world)]
    assert torch.equal(cp.zigzag_unshard(shards), x)


def _dcp_cases(world, rank, dtype, device):
    """dcp_decode on vLLM's interleaved layout; one sequence short enough that some ranks hold
    none of its tokens, one with no tokens at all (LSE -inf, output 0)."""
    b, h, hkv, d, s = 4, 8, 2, 64, 40
    q = _inputs(5, (b, 1, h, d), dtype, device)
    kc = _inputs(6, (b, s, hkv, d), dtype, device)
    vc = _inputs(7, (b, s, hkv, d), dtype, device)
    seqlens = torch.tensor([s, 1, 17, 0], dtype=torch.int32, device=device)
    ref, ref_lse = attention_ref_kvcache(q, kc, vc, seqlens)
    eager, _ = attention_ref_kvcache(q, kc, vc, seqlens, eager_dtype=dtype)
    k_local, lens = cp.interleave_kv_cache(kc, seqlens, world, rank)
    v_local, _ = cp.interleave_kv_cache(vc, seqlens, world, rank)
    assert int(lens.sum()) == sum((int(n) - rank + world - 1) // world for n in seqlens if n > rank)
    q_nan = q.clone()
    q_nan[1, 0, 3, 0] = float("nan")  # one query head of sequence 1 (whose cache lives on rank 0 only)
    for kw in ({}, dict(output_scale=torch.tensor(0.01, device=device))):
        out, lse = cp.dcp_decode(q_nan, k_local, v_local, lens, return_lse=True, **kw)
        o = out.float()
        assert o[1, 0, 3].isnan().all() and lse[1, 3].isnan().all(), f"dcp rank {rank}: NaN query hidden"
        o[1, 0, 3] = 0
        assert o.isfinite().all(), f"dcp rank {rank}: NaN spread"
    for kind in KINDS:
        fmt = make_format(kind, dtype, ref)
        out, lse = cp.dcp_decode(q, k_local, v_local, lens, return_lse=True, **format_kwargs(fmt))
        what = f"dcp world={world} rank={rank} out={kind}"
        check_output(out, fmt, ref, eager, what=what)
        check_lse(lse, ref_lse, what)


def _worker(rank, world, init_file, backend):
    """backend 'gloo' (CPU tensors), 'nccl' (a GPU a rank) or 'gloo-cuda' (every rank's kernels
    on the one GPU, the transport through gloo: what a one-GPU machine can check)."""
    device = torch.device("cuda", rank if backend == "nccl" else 0) if backend != "gloo" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend.split("-")[0], init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for dtype in DTYPES:
            _ring_cases(world, rank, dtype, device)
            _dcp_cases(world, rank, dtype, device)
    finally:
        dist.destroy_process_group()


# (gloo with CPU tensors needs the interpreter kernels: machines without a GPU; on a GPU machine
# the same cases run with CUDA tensors over gloo, and over NCCL where there are several GPUs)
@pytest.mark.parametrize("backend", (["gloo-cuda"] if ON_GPU else ["gloo"]) + (["nccl"] if NCCL else []))
@pytest.mark.parametrize("world", [2, 3])
def test_context_parallel(world, backend):
    if backend == "nccl" and torch.cuda.device_count() < world:
        pytest.skip(f"{world} GPUs needed")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), backend), nprocs=world, join=True)


def test_errors():
    """Argument checks that need no process group."""
    x = torch.zeros(1, 6, 2, 16)
    with pytest.raises(ValueError, match="divisible by 2 x world"):
        cp.zigzag_shard(x, 2, 0)
