"""Decode path: flash_attn_with_kvcache (contiguous and paged caches), split-KV, paged varlen."""

import pytest
import torch

import attnquant as aq
from attnquant.reference import attention_ref_kvcache, attention_ref_varlen

from .helpers import DEVICE, DTYPES, FP8, ON_GPU, check_lse, check_output, format_kwargs, make_format, randn

B = 4
SK_MAX = 1000 if ON_GPU else 70
LENS = [SK_MAX, 0, 137 if ON_GPU else 13, SK_MAX - 31]  # includes an empty sequence
PAGES = [16, 64, 256] if ON_GPU else [8, 32]  # pages smaller and larger than a key block


def to_paged(cache, page, gen):
    """Scatter a contiguous (B, Sk, Hkv, D) cache into shuffled pages + a block table."""
    b, sk = cache.shape[:2]
    nb = -(-sk // page)
    padded = torch.zeros(b, nb * page, *cache.shape[2:], dtype=cache.dtype, device=cache.device)
    padded[:, :sk] = cache
    perm = torch.randperm(b * nb, generator=gen).to(cache.device)
    paged = torch.empty(b * nb + 3, page, *cache.shape[2:], dtype=cache.dtype, device=cache.device)
    paged.normal_()  # pages no sequence owns hold garbage
    paged[perm] = padded.reshape(b * nb, page, *cache.shape[2:])
    return paged, perm.reshape(b, nb).to(torch.int32)


def decode_inputs(dtype, sq, heads, dims=(128, 128), lens=LENS):
    (h, hkv), (d, dv) = heads, dims
    q = randn(B, sq, h, d, dtype=dtype)
    kc, vc = randn(B, SK_MAX, hkv, d, dtype=dtype), randn(B, SK_MAX, hkv, dv, dtype=dtype)
    return q, kc, vc, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("kind", ["plain"] + FP8 + ["group", "group_ue8m0", "nvfp4"], ids=str)
@pytest.mark.parametrize("num_splits", [1, 4, 0])
@pytest.mark.parametrize("sq", [1, 2, 4])
@pytest.mark.parametrize("heads", [(8, 1), (4, 4)], ids=["gqa8", "mha"])
def test_kvcache_contiguous(heads, sq, num_splits, kind):
    dtype = DTYPES[0]
    q, kc, vc, lens = decode_inputs(dtype, sq, heads)
    ref_o, ref_lse = attention_ref_kvcache(q, kc, vc, lens, causal=True)
    eager_o, _ = attention_ref_kvcache(q, kc, vc, lens, causal=True, eager_dtype=dtype)
    fmt = make_format(kind, dtype, ref_o)
    out, lse = aq.flash_attn_with_kvcache(q, kc, vc, lens, num_splits=num_splits, return_lse=True,
                                         **format_kwargs(fmt))
    check_output(out, fmt, ref_o, eager_o, what=f"sq={sq} splits={num_splits} {fmt.dtype}")
    check_lse(lse, ref_lse)


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("kind", ["plain", torch.float8_e4m3fn, "group"], ids=str)
def test_paged_bit_identical_to_contiguous(page, num_splits, kind):
    """Same tile config and split count: the paged address path computes exactly what the
    contiguous one does. (By default the two may pick different tiles, see config.py.)"""
    from attnquant.kernels.portable.config import forward_config

    dtype = DTYPES[0]
    gen = torch.Generator().manual_seed(page + num_splits)
    q, kc, vc, lens = decode_inputs(dtype, 2, (8, 2), dims=(64, 64))
    kp, bt = to_paged(kc, page, gen)
    vp, _ = to_paged(vc, page, torch.Generator().manual_seed(page + num_splits))
    ref_o, _ = attention_ref_kvcache(q, kc, vc, lens, causal=True)
    fmt = make_format(kind, dtype, ref_o)
    cfg = forward_config(64, 64, 2 * 4, not ON_GPU, page)  # the paged path's default tile
    kw = dict(num_splits=num_splits, return_lse=True, _config=cfg, **format_kwargs(fmt))
    a, la = aq.flash_attn_with_kvcache(q, kc, vc, lens, **kw)
    scales_a = None if fmt.block_scale is None else fmt.block_scale.clone()
    b, lb = aq.flash_attn_with_kvcache(q, kp, vp, lens, block_table=bt, **kw)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert torch.equal(la, lb)
    if scales_a is not None:  # the per-group scales too (written again by the paged call)
        assert torch.equal(scales_a, fmt.block_scale)
    eager_o, _ = attention_ref_kvcache(q, kp, vp, lens, block_table=bt, causal=True, eager_dtype=dtype)
    check_output(b, fmt, ref_o, eager_o)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_matches_no_split(num_splits):
    """Float32 output. Each split rounds P to the input dtype relative to its own running max,
    so the two paths differ by that rounding (averaged over the keys), far below one unit of
    the input dtype at the output's magnitude; the LSEs agree to float32 rounding."""
    dtype = DTYPES[0]
    q, kc, vc, lens = decode_inputs(dtype, 1, (8, 2))
    a, la = aq.flash_attn_with_kvcache(q, kc, vc, lens, num_splits=1, return_lse=True, out_dtype=torch.float32)
    b, lb = aq.flash_attn_with_kvcache(q, kc, vc, lens, num_splits=num_splits, return_lse=True,
                                       out_dtype=torch.float32)
    tol = torch.finfo(dtype).eps * a.abs().max().item() / 4
    assert (a - b).abs().max().item() <= tol, ((a - b).abs().max(), tol)
    assert torch.equal(torch.isinf(la), torch.isinf(lb))
    fin = torch.isfinite(la)
    assert torch.allclose(la[fin], lb[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["plain", torch.float8_e4m3fn, "nvfp4"], ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_split_combine_as_dependent_launch(paged, kind):
    """FwdConfig.pdl: the split combine launched as a programmatic dependent of the forward
    (the forward triggers it as it starts, the combine waits for its results): the same bits
    as the ordered launches, and the oracle's answer. (The interpreter has no PDL: there the
    flag changes nothing, and this holds trivially.)"""
    from dataclasses import replace

    from attnquant.kernels.portable.config import forward_config

    dtype = DTYPES[0]
    q, kc, vc, lens = decode_inputs(dtype, 1, (8, 2), dims=(64, 64))
    bt = None
    if paged:
        kc, bt = to_paged(kc, 16, torch.Generator().manual_seed(4))
        vc, _ = to_paged(vc, 16, torch.Generator().manual_seed(4))
    ref_o, ref_lse = attention_ref_kvcache(q, kc, vc, lens, block_table=bt)
    eager_o, _ = attention_ref_kvcache(q, kc, vc, lens, block_table=bt, eager_dtype=dtype)
    fmt = make_format(kind, dtype, ref_o)
    cfg = forward_config(64, 64, 8, not ON_GPU, 16 if paged else 0)
    kw = dict(block_table=bt, num_splits=3, return_lse=True, **format_kwargs(fmt))
    a, la = aq.flash_attn_with_kvcache(q, kc, vc, lens, _config=cfg, **kw)
    scales = None if fmt.block_scale is None else fmt.block_scale.clone()
    b, lb = aq.flash_attn_with_kvcache(q, kc, vc, lens, _config=replace(cfg, pdl=True), **kw)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) and torch.equal(la, lb)
    if scales is not None:
        assert torch.equal(scales.view(torch.uint8), fmt.block_scale.view(torch.uint8))
    check_output(b, fmt, ref_o, eager_o)
    check_lse(lb, ref_lse)


@pytest.mark.parametrize("window", [(20, -1), (5, 0)], ids=str)
def test_kvcache_window_softcap(window):
    dtype = DTYPES[0]
    q, kc, vc, lens = decode_inputs(dtype, 4, (4, 2))
    kw = dict(causal=True, window_size=window, softcap=3.0)
    ref_o, ref_lse = attention_ref_kvcache(q, kc, vc, lens, **kw)
    eager_o, _ = attention_ref_kvcache(q, kc, vc, lens, eager_dtype=dtype, **kw)
    fmt = make_format(torch.float8_e4m3fn, dtype, ref_o)
    out, lse = aq.flash_attn_with_kvcache(q, kc, vc, lens, num_splits=3, return_lse=True, **kw,
                                         **format_kwargs(fmt))
    check_output(out, fmt, ref_o, eager_o, softcap=3.0)
    check_lse(lse, ref_lse)


def test_kvcache_int_seqlens_non_causal():
    dtype = DTYPES[0]
    q, kc, vc, _ = decode_inputs(dtype, 3, (4, 4))
    n = SK_MAX - 5
    lens = torch.full((B,), n, dtype=torch.int32, device=DEVICE)
    ref_o, _ = attention_ref_kvcache(q, kc, vc, lens, causal=False)
    eager_o, _ = attention_ref_kvcache(q, kc, vc, lens, causal=False, eager_dtype=dtype)
    out, _ = aq.flash_attn_with_kvcache(q, kc, vc, n, causal=False)
    check_output(out, make_format("plain", dtype, ref_o), ref_o, eager_o)


@pytest.mark.parametrize("page", PAGES)
def test_varlen_paged(page):
    """flash_attn_varlen_func with block_table + seqused_k: chunked prefill against a paged cache."""
    dtype = DTYPES[0]
    lens_q = [3, 0, 7, 1]
    q = randn(sum(lens_q), 4, 64, dtype=dtype)
    _, kc, vc, lens = decode_inputs(dtype, 1, (4, 2), dims=(64, 64))
    gen = torch.Generator().manual_seed(page)
    kp, bt = to_paged(kc, page, gen)
    vp, _ = to_paged(vc, page, torch.Generator().manual_seed(page))
    cq = torch.tensor([0, 3, 3, 10, 11], dtype=torch.int32, device=DEVICE)
    # the reference sees the same keys as contiguous sequences
    lens_l = lens.tolist()
    kcat = torch.cat([kc[b, :n] for b, n in enumerate(lens_l)])
    vcat = torch.cat([vc[b, :n] for b, n in enumerate(lens_l)])
    ck = torch.tensor([0] + torch.tensor(lens_l).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    ref_o, ref_lse = attention_ref_varlen(q, kcat, vcat, cq, ck, causal=True)
    eager_o, _ = attention_ref_varlen(q, kcat, vcat, cq, ck, causal=True, eager_dtype=dtype)
    fmt = make_format(torch.float8_e4m3fn, dtype, ref_o)
    out, lse = aq.flash_attn_varlen_func(q, kp, vp, cq, None, max(lens_q), SK_MAX, seqused_k=lens,
                                         block_table=bt, causal=True, return_lse=True, **format_kwargs(fmt))
    check_output(out, fmt, ref_o, eager_o)
    check_lse(lse, ref_lse)


@pytest.mark.parametrize("paged", [False, True])
def test_long_context(paged):
    """>= 32k keys on the GPU (a few hundred in the interpreter), heuristic split count."""
    dtype = DTYPES[0]
    sk = 40000 if ON_GPU else 300
    q = randn(2, 1, 16, 128, dtype=dtype)
    kc, vc = randn(2, sk, 2, 128, dtype=dtype), randn(2, sk, 2, 128, dtype=dtype)
    lens = torch.tensor([sk, sk * 33 // 40], dtype=torch.int32, device=DEVICE)
    ref_o, ref_lse = attention_ref_kvcache(q, kc, vc, lens)
    eager_o, _ = attention_ref_kvcache(q, kc, vc, lens, eager_dtype=dtype)
    fmt = make_format(torch.float8_e4m3fn, dtype, ref_o)
    kw = dict(return_lse=True, **format_kwargs(fmt))
    if paged:
        gen = torch.Generator().manual_seed(0)
        kp, bt = to_paged(kc, 64, gen)
        vp, _ = to_paged(vc, 64, torch.Generator().manual_seed(0))
        out, lse = aq.flash_attn_with_kvcache(q, kp, vp, lens, block_table=bt, **kw)
    else:
        out, lse = aq.flash_attn_with_kvcache(q, kc, vc, lens, **kw)
    check_output(out, fmt, ref_o, eager_o)
    check_lse(lse, ref_lse)


if ON_GPU:  # CUDA graphs and sync detection exist only on the GPU

    @pytest.mark.parametrize("num_splits", [1, 0])
    def test_cuda_graph_capture_no_sync(num_splits):
        """The decode call with FP8 output records into a CUDA graph (no host sync) and its
        replay matches an eager call on new inputs."""
        dtype = torch.bfloat16
        q, kc, vc, lens = decode_inputs(dtype, 1, (8, 1))
        scale = torch.tensor(0.01, device=DEVICE)
        run = lambda: aq.flash_attn_with_kvcache(q, kc, vc, lens, output_scale=scale, num_splits=num_splits,  # noqa
                                                 return_lse=True)
        run()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out, lse = run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        q.copy_(randn(*q.shape, dtype=dtype))
        scale.fill_(0.02)
        g.replay()
        ref_out, ref_lse = run()
        assert torch.equal(out.view(torch.uint8), ref_out.view(torch.uint8))
        assert torch.equal(lse, ref_lse)


def test_pages_past_2_pow_31_elements():
    """64-bit offsets: on the GPU the pages in use sit past element 2**31 of a 4.3 GB cache."""
    dtype = DTYPES[0]
    page, d, hkv = 64, 128, 1
    num_blocks = (2**31 // (page * hkv * d) + 64) if ON_GPU else 40
    kp = torch.empty(num_blocks, page, hkv, d, dtype=dtype, device=DEVICE)
    vp = torch.empty_like(kp)
    lens = torch.tensor([1000, 517] if ON_GPU else [70, 33], dtype=torch.int32, device=DEVICE)
    per_seq = -(-int(lens.max()) // page)
    bt = (num_blocks - 2 * per_seq + torch.arange(2 * per_seq, device=DEVICE)).reshape(2, per_seq).to(torch.int32)
    used = bt.flatten().long()
    kp[used] = randn(len(used), page, hkv, d, dtype=dtype)
    vp[used] = randn(len(used), page, hkv, d, dtype=dtype)
    q = randn(2, 2, 8, d, dtype=dtype)
    ref_o, ref_lse = attention_ref_kvcache(q, kp, vp, lens, block_table=bt, causal=True)
    eager_o, _ = attention_ref_kvcache(q, kp, vp, lens, block_table=bt, causal=True, eager_dtype=dtype)
    fmt = make_format(torch.float8_e4m3fn, dtype, ref_o)
    out, lse = aq.flash_attn_with_kvcache(q, kp, vp, lens, block_table=bt, return_lse=True, **format_kwargs(fmt))
    check_output(out, fmt, ref_o, eager_o)
    check_lse(lse, ref_lse)
