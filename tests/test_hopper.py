"""The Hopper Gluon fast path: backend selection, and the cases the shared matrix (test_forward,
test_varlen: every case there runs on both backends on an sm_90 GPU) does not reach:
sequences long enough to wrap the K/V ring many times, CTAs that walk many tiles (the
persistent schedule), packed qkv layouts, the dispatch rule."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import attnquant as aq
from attnquant import dispatch, quant
from attnquant.kernels.hopper import config as hcfg, launch as hopper
from attnquant.problem import Attention, make_problem
from attnquant.reference import attention_ref_batched, attention_ref_varlen

from .helpers import DEVICE, DTYPES, GLUON, check_lse, check_output, format_kwargs, make_format, randn

needs_gluon = pytest.mark.skipif(not GLUON, reason="the Gluon kernel runs on sm_90 GPUs only")


def small_inputs(dtype=DTYPES[0], sq=40, sk=40, h=4, hkv=2, d=64):
    return randn(2, sq, h, d, dtype=dtype), randn(2, sk, hkv, d, dtype=dtype), randn(2, sk, hkv, d, dtype=dtype)


@pytest.mark.parametrize("backend,exc,msg", [("fast", ValueError, "backend must be one of"),
                                             (1, TypeError, "backend must be a str")], ids=str)
def test_backend_argument_rejected(backend, exc, msg):
    q, k, v = small_inputs()
    with pytest.raises(exc, match=msg):
        aq.flash_attn_func(q, k, v, backend=backend)


def test_backend_env_rejected(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "cudnn")
    q, k, v = small_inputs()
    with pytest.raises(ValueError, match=dispatch.BACKEND_ENV):
        aq.flash_attn_func(q, k, v)


@pytest.mark.parametrize("kw,msg", [
    (dict(window_size=(8, 0)), "sliding windows"),
    (dict(softcap=3.0), "softcap"),
    (dict(num_splits=2), "split-KV"),
], ids=["window", "softcap", "splits"])
def test_forced_gluon_refuses_with_reason(kw, msg):
    """backend='gluon' never falls back silently: it runs or says why not (on the CPU: no GPU)."""
    q, k, v = small_inputs()
    with pytest.raises(ValueError, match="backend='gluon' cannot run this call: " + ("" if GLUON else "it needs")):
        aq.flash_attn_func(q, k, v, backend="gluon", **kw)
    if GLUON:
        with pytest.raises(ValueError, match=msg):
            aq.flash_attn_func(q, k, v, backend="gluon", **kw)


def test_env_forces_portable_kernel(monkeypatch):
    """ATTNQUANT_BACKEND=triton keeps calls off the Gluon kernel; 'auto' takes it for prefill
    tiles on sm_90 and leaves decode-sized ones to the portable kernel (dispatch.plan)."""
    q, k, v = small_inputs(sq=200, sk=200)
    attn = Attention(0.125, True)

    def gluon_planned(q):
        return dispatch.plan(make_problem(q, k, v, q.shape[1], k.shape[1]), attn, 0, None).gluon
    monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
    a, _ = aq.flash_attn_func(q, k, v, causal=True)
    assert not gluon_planned(q)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "auto")
    b, _ = aq.flash_attn_func(q, k, v, causal=True)
    assert gluon_planned(q) == GLUON
    assert not gluon_planned(q[:, :8])  # 8 x 2 packed rows: decode-sized
    assert (a.float() - b.float()).abs().max() < 0.05 * a.float().abs().max()


def _check(q, k, v, causal, kind, **kw):
    ref_o, ref_lse = attention_ref_batched(q, k, v, causal=causal)
    eager_o, _ = attention_ref_batched(q, k, v, causal=causal, eager_dtype=q.dtype)
    fmt = make_format(kind, q.dtype, ref_o)
    out, lse = aq.flash_attn_func(q, k, v, causal=causal, return_lse=True, backend="gluon", **format_kwargs(fmt), **kw)
    what = f"gluon {tuple(q.shape)} {tuple(k.shape)} causal={causal} {fmt.dtype}"
    check_output(out, fmt, ref_o, eager_o, what=what)
    check_lse(lse, ref_lse, what)


@needs_gluon
@pytest.mark.parametrize("kind", ["plain", torch.float8_e4m3fn, "group_ue8m0", "nvfp4"], ids=str)
@pytest.mark.parametrize("sq,sk", [(1100, 1100), (700, 1500), (1500, 700)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(128, 128), (192, 128)], ids=str)
def test_long_sequences(dims, causal, sq, sk, kind):
    """Many key blocks (the K/V ring wraps, the two consumers' turn barriers cycle), Sk < Sq
    (causal rows with no key) and Sk > Sq."""
    (d, dv), dtype = dims, DTYPES[0]
    q, k, v = randn(1, sq, 4, d, dtype=dtype), randn(1, sk, 2, d, dtype=dtype), randn(1, sk, 2, dv, dtype=dtype)
    _check(q, k, v, causal, kind)


@needs_gluon
def test_packed_qkv_layout():
    """q/k/v slices of one (B, S, H + 2 Hkv, D) projection output: token stride > H * D."""
    dtype = DTYPES[0]
    qkv = randn(2, 300, 8 + 2 * 2, 128, dtype=dtype)
    q, k, v = qkv[:, :, :8], qkv[:, :, 8:10], qkv[:, :, 10:]
    _check(q, k, v, True, torch.float8_e4m3fn)


def small_grid(cfg, ctas, kv_heads_per_section, sk, d, dv, dtype):
    """cfg on `ctas` persistent CTAs (each walks many tiles), with L2 sections of
    `kv_heads_per_section` KV heads."""
    kv_head_bytes = sk * (d + dv) * torch.tensor([], dtype=dtype).element_size()
    return replace(cfg, ctas=ctas, l2_section_bytes=kv_heads_per_section * kv_head_bytes)


@needs_gluon
@pytest.mark.parametrize("ctas", [1, 7], ids=lambda n: f"{n}ctas")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(128, 128), (192, 128)], ids=str)
def test_persistent_schedule(dims, causal, ctas):
    """Each CTA takes many tiles (60 tiles on 1 or 7 CTAs, from the shared counter): the
    K/V ring, the Q buffers, the tile-id ring and every barrier phase run on from tile to
    tile, and L2 sections of 10 batch*heads leave a partial last section (of 12)."""
    (d, dv), dtype = dims, DTYPES[0]
    b, sq, sk, h, hkv = 3, 600, 700, 4, 2
    cfg = small_grid(hcfg.ws_config(d, dv), ctas, 5, sk, d, dv, dtype)
    shape = SimpleNamespace(num_heads=h, group=h // hkv, max_seqlen_k=sk, head_dim=d, head_dim_v=dv, batch=b,
                            k=torch.empty(0, dtype=dtype))
    assert hcfg.l2_section(shape, cfg.l2_section_bytes) == 10
    q, k, v = randn(b, sq, h, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, dv, dtype=dtype)
    _check(q, k, v, causal, torch.float8_e4m3fn if ctas == 1 else "group_ue8m0", _config=cfg)


@needs_gluon
@pytest.mark.parametrize("causal", [False, True])
def test_persistent_schedule_varlen(causal):
    """Varlen on 3 CTAs: tiles past a sequence's end (the tile space covers max_seqlen_q for
    every sequence) and an empty sequence are skipped by the producer, never published."""
    dtype, (h, hkv), d = DTYPES[0], (4, 2), 128
    lens_q, lens_k = [300, 0, 900, 130, 5], [300, 0, 1000, 100, 40]
    cfg = small_grid(hcfg.ws_config(d, d), 3, 1, max(lens_k), d, d, dtype)
    cq, ck = (torch.tensor([0] + list(torch.tensor(n).cumsum(0)), dtype=torch.int32, device=DEVICE)
              for n in (lens_q, lens_k))
    q, k, v = (randn(sum(lens_q), h, d, dtype=dtype), randn(sum(lens_k), hkv, d, dtype=dtype),
               randn(sum(lens_k), hkv, d, dtype=dtype))
    ref_o, ref_lse = attention_ref_varlen(q, k, v, cq, ck, None, causal=causal)
    eager_o, _ = attention_ref_varlen(q, k, v, cq, ck, None, causal=causal, eager_dtype=dtype)
    fmt = make_format(torch.float8_e4m3fn, dtype, ref_o)
    out, lse = aq.flash_attn_varlen_func(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=causal, return_lse=True,
                                         backend="gluon", _config=cfg, **format_kwargs(fmt))
    check_output(out, fmt, ref_o, eager_o, what=f"gluon varlen, 3 CTAs, causal={causal}")
    check_lse(lse, ref_lse, "gluon varlen, 3 CTAs")


@needs_gluon
@pytest.mark.parametrize("dims", [(128, 128), (192, 128)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_pingpong_option(causal, dims):
    """WsConfig.pingpong (off by default: measured no faster): the consumers take turns
    issuing wgmmas through two named barriers. Every arrive must meet a sync across all
    the tiles of a CTA (3 CTAs here) or the kernel hangs or races."""
    (d, dv), dtype = dims, DTYPES[0]
    cfg = small_grid(replace(hcfg.ws_config(d, dv), pingpong=True), 3, 1, 700, d, dv, dtype)
    q, k, v = randn(2, 600, 4, d, dtype=dtype), randn(2, 700, 2, d, dtype=dtype), randn(2, 700, 2, dv, dtype=dtype)
    _check(q, k, v, causal, torch.float8_e4m3fn, _config=cfg)


@needs_gluon
@pytest.mark.parametrize("serial", [False, True], ids=["overlap", "serial"])
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (192, 128)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_three_consumers(causal, dims, serial):
    """WsConfig.consumers = 3: 192-row tiles (Sq = 600: three whole tiles and one of 24 rows,
    causal diagonals through three warpgroups' rows), every K/V slot released by three
    warpgroups, GQA, 3 CTAs walking several tiles each; 64-key blocks with FA3's intra-warpgroup
    overlap, or 128-key blocks (64 at d=192: shared memory) each waited for in turn."""
    (d, dv), dtype = dims, DTYPES[0]
    if serial:
        cfg = replace(hcfg.ws_config(d, dv, 128 if d <= 128 else 64, consumers=3), intra_overlap=False)
    else:
        cfg = hcfg.ws_config(d, dv, consumers=3)
    cfg = small_grid(cfg, 3, 1, 700, d, dv, dtype)
    q, k, v = randn(2, 600, 4, d, dtype=dtype), randn(2, 700, 2, d, dtype=dtype), randn(2, 700, 2, dv, dtype=dtype)
    _check(q, k, v, causal, torch.float8_e4m3fn if serial else "plain", _config=cfg)


def test_for_problem_rule():
    """Non-causal batched calls with head dims <= 128 take 3 consumers with serial 128-key blocks
    where whole-tile waves favor them (the four non-causal shapes measured, on
    132 SMs); causal, varlen, d=192, ping-pong and configs that opt out keep theirs."""
    def pick(b, h, s, causal=False, d=128, varlen=False, **options):
        cfg = replace(hcfg.ws_config(d, 128), **options)
        p = SimpleNamespace(head_dim=d, head_dim_v=128, varlen=varlen, batch=b, num_heads=h, max_seqlen_q=s,
                            max_seqlen_k=s)
        return hcfg.for_problem(cfg, p, causal, 132)
    three = pick(2, 32, 8192)
    assert (three.consumers, three.block_n, three.intra_overlap, three.block_m) == (3, 128, False, 192)
    # B1 H16 8k: 5 1/4 waves of 192 rows (the last wave's 28 tiles split in 4) against 8 of 128;
    # without the split, 6 against 8 (3 % slower, measured)
    assert [pick(1, 32, 8192).consumers, pick(1, 16, 8192).consumers, pick(4, 32, 4096).consumers] == [3, 3, 3]
    assert pick(1, 16, 8192, split_tail=False).consumers == 2
    base = hcfg.ws_config(128, 128)
    assert pick(2, 32, 8192, causal=True) == base
    assert pick(2, 32, 8192, varlen=True) == base
    assert pick(2, 32, 8192, d=192) == hcfg.ws_config(192, 128)
    assert pick(2, 32, 8192, pingpong=True) == replace(base, pingpong=True)
    assert pick(2, 32, 8192, auto_consumers=False) == replace(base, auto_consumers=False)
    assert pick(2, 32, 8192, lazy_rescale=False).lazy_rescale is False  # (the other options carry over)


def test_tail_split_rule():
    """The last wave's tiles are cut into as many parts as fit the CTAs that wave leaves idle
    (at most MAX_SPLIT, at most one key block a part); whole waves are never split."""
    assert hcfg.tail_split(1376, 132, 64) == (1320, 2)  # B1 H32 8k, 192-row tiles: 56 tiles left
    assert hcfg.tail_split(2048, 132, 64) == (2048, 1)  # 68 left: no room for 2 parts each
    assert hcfg.tail_split(688, 132, 64) == (660, 4)
    assert hcfg.tail_split(1320, 132, 64) == (1320, 1)  # whole waves
    assert hcfg.tail_split(20, 132, 6) == (0, 6)  # one partial wave: every tile split, by its 6 blocks
    assert hcfg.tail_split(10, 132, 64) == (0, hcfg.MAX_SPLIT)
    assert hcfg.tail_split(5, 132, 1) == (5, 1)
    assert hcfg.waves(1376, 132, 64) == 10.5 and hcfg.waves(2048, 132, 64) == 16
    assert hcfg.waves(1376, 132, 1) == 11 and hcfg.waves(1320, 132, 64) == 10


@needs_gluon
@pytest.mark.parametrize("consumers,ctas,parts", [(2, 8, 2), (2, 9, 4), (2, 40, 2), (3, 5, 5), (3, 7, 3)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("dims", [(128, 128), (192, 128)], ids=str)
def test_split_tail(dims, consumers, ctas, parts):
    """Non-causal: the last wave's tiles run as `parts` units over shares of the keys, and each
    tile's last part merges the others' partial results (B1, H4, Sq 600 / Sk 700 on `ctas` CTAs:
    20 tiles of 128 rows or 16 of 192; 40 CTAs: every tile split). Two calls, so that the second
    reads a workspace that may hold the first's partials; the output starts as NaN."""
    (d, dv), dtype = dims, DTYPES[0]
    if consumers == 3:
        cfg = replace(hcfg.ws_config(d, dv, 128 if d <= 128 else 64, consumers=3), intra_overlap=False)
    else:  # (for_problem could pick the 3-consumer kernel)
        cfg = replace(hcfg.ws_config(d, dv), auto_consumers=False)
    cfg = small_grid(cfg, ctas, 1, 700, d, dv, dtype)
    for kind in (torch.float8_e4m3fn, "group_ue8m0"):
        q, k, v = randn(1, 600, 4, d, dtype=dtype), randn(1, 700, 2, d, dtype=dtype), randn(1, 700, 2, dv, dtype=dtype)
        sched = hcfg.schedule(make_problem(q, k, v, 600, 700), cfg, False, 132)
        tiles = 4 * (5 if consumers == 2 else 4)
        assert (sched.num_tiles, sched.split_from, sched.parts) == (tiles, tiles - tiles % ctas, parts)
        out = torch.full((1, 600, 4, dv), float("nan"), device=DEVICE).to(torch.float8_e4m3fn)  # (a row not written fails)
        _check(q, k, v, False, kind, out=out, _config=cfg)


@needs_gluon
@pytest.mark.parametrize("causal", [False, True])
def test_workspace_left_zero(causal):
    """The unit counter and the split flags live in one buffer per stream that each call leaves
    zero (no fill kernel per call): three calls in a row (7 CTAs, many tiles each; non-causal
    with the last wave split) all match the reference, share the buffer, and leave it zero."""
    d, dtype = 128, DTYPES[0]
    cfg = small_grid(replace(hcfg.ws_config(d, d), auto_consumers=False), 7, 1, 700, d, d, dtype)
    stream = torch.cuda.current_stream()
    for _ in range(3):
        q, k, v = randn(2, 600, 4, d, dtype=dtype), randn(2, 700, 2, d, dtype=dtype), randn(2, 700, 2, d, dtype=dtype)
        _check(q, k, v, causal, torch.float8_e4m3fn, _config=cfg)
        buf = hopper.workspace(q.device, stream, 1)
        torch.cuda.synchronize()
        assert int(buf.abs().sum()) == 0
        assert buf.data_ptr() == hopper.workspace(q.device, stream, 1).data_ptr()


@needs_gluon
def test_cuda_graph_replay():
    """A captured Gluon call (its unit counter is the graph's own, zeroed in the graph) replays
    with new inputs copied in, and eager calls on the capturing stream still run right after."""
    d, dtype = 192, DTYPES[0]
    q, k, v = randn(2, 500, 4, d, dtype=dtype), randn(2, 500, 1, d, dtype=dtype), randn(2, 500, 1, 128, dtype=dtype)
    fmt = quant.OutputFormat(quant.FP8_STATIC, torch.float8_e4m3fn, scale=torch.tensor(0.03, device=DEVICE))
    call = lambda: aq.flash_attn_func(q, k, v, causal=True, backend="gluon", **format_kwargs(fmt))[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # (compiled outside the capture)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = call()
        for _ in range(2):
            for t in (q, k, v):
                t.copy_(randn(*t.shape, dtype=dtype))
            graph.replay()
            eager = call()
            ref_o, _ = attention_ref_batched(q, k, v, causal=True)
            eager_o, _ = attention_ref_batched(q, k, v, causal=True, eager_dtype=dtype)
            check_output(out, fmt, ref_o, eager_o, what="graph replay")
            check_output(eager, fmt, ref_o, eager_o, what="eager call after a replay")
    torch.cuda.current_stream().wait_stream(stream)


@needs_gluon
def test_noncausal_takes_three_consumers():
    """The launcher's own choice (for_problem, here on 7 CTAs: 48 tiles of 192 rows in 7 waves, the
    last one 6 tiles, too full to split, against 72 of 128 in 10 1/3) runs and matches the
    reference."""
    dtype, d = DTYPES[0], 128
    cfg = small_grid(hcfg.ws_config(d, d), 7, 1, 1100, d, d, dtype)
    q, k, v = randn(2, 1100, 4, d, dtype=dtype), randn(2, 1100, 2, d, dtype=dtype), randn(2, 1100, 2, d, dtype=dtype)
    sched = hcfg.schedule(make_problem(q, k, v, 1100, 1100), cfg, False, 132)
    assert (sched.cfg.consumers, sched.cfg.intra_overlap, sched.parts) == (3, False, 1)
    _check(q, k, v, False, torch.float8_e4m3fn, _config=cfg)


@needs_gluon
@pytest.mark.parametrize("dims", [(128, 128), (192, 128)], ids=str)
def test_launch_cache(monkeypatch, dims):
    """After the first call of a launch key the compiled kernel is launched directly (Triton's
    JIT dispatch skipped) with descriptors from the cache: fresh tensors of the same shapes
    still get their own results, and no call goes back through the JIT."""
    from attnquant.kernels.hopper import kernel as gluon_fwd

    (d, dv), dtype = dims, DTYPES[0]
    shapes = ((2, 300, 4, d), (2, 333, 2, d), (2, 333, 2, dv))
    _check(*(randn(*s, dtype=dtype) for s in shapes), True, torch.float8_e4m3fn)  # (the key's first call)
    kernel = gluon_fwd.attn_fwd_ws_kernel
    jit_calls = []
    monkeypatch.setattr(kernel, "run", lambda *a, **kw: jit_calls.append(1) or type(kernel).run(kernel, *a, **kw))
    for _ in range(2):
        _check(*(randn(*s, dtype=dtype) for s in shapes), True, torch.float8_e4m3fn)
    assert jit_calls == []


@needs_gluon
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(32, 32), (128, 128), (192, 128)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_lazy_rescale_option(causal, dims, dtype):
    """WsConfig.lazy_rescale flipped from its default. Keys scaled up along the sequence, and
    a few spikes, make the row maxima rise in many blocks by less and by more than the 2^8
    threshold: the kept-max path (P up to 256), the moved-max path, and warps that skip O's
    rescale next to warps that do it (Dv = 32 takes the 16-value asm blocks)."""
    d, dv = dims
    base = hcfg.ws_config(d, dv)
    cfg = replace(base, lazy_rescale=not base.lazy_rescale)
    b, s, h, hkv = 2, 1100, 4, 2
    k = randn(b, s, hkv, d, dtype=torch.float32) * torch.linspace(0.3, 3.0, s, device=DEVICE)[None, :, None, None]
    k[:, torch.randperm(s, device=DEVICE)[:12]] *= 4.0
    q, v = randn(b, s, h, d, dtype=dtype), randn(b, s, hkv, dv, dtype=dtype)
    _check(q, k.to(dtype), v, causal, torch.float8_e4m3fn, _config=cfg)


@needs_gluon
@pytest.mark.parametrize("dims,kind,room", [((128, 128), "plain", True), ((128, 128), torch.float8_e4m3fn, True),
                                            ((192, 128), "plain", False), ((192, 128), "group_ue8m0", True),
                                            ((128, 128), "nvfp4", True), ((192, 128), "nvfp4", True),
                                            ((64, 64), "nvfp4", True)],
                         ids=str)
@pytest.mark.parametrize("out_layout", ["contiguous", "strided"])
def test_output_epilogue_paths(dims, kind, room, out_layout):
    """Whole 64-row tiles go out through shared memory and a TMA store where the staging tile
    fits (not next to d=192's K/V ring in 16 bits; NVFP4's packed codes are half an FP8 tile)
    and `out` reads as a 2-D (tokens, H * Dv) view (not a slice of a wider buffer); everything
    else, and the rows of a tile cut by the sequence end (Sq = 300: tiles of 64 whole rows, and
    a last one of 44), store from registers."""
    (d, dv), dtype = dims, DTYPES[0]
    b, sq, h, hkv = 2, 300, 4, 2
    q, k, v = randn(b, sq, h, d, dtype=dtype), randn(b, sq, hkv, d, dtype=dtype), randn(b, sq, hkv, dv, dtype=dtype)
    ref_o, ref_lse = attention_ref_batched(q, k, v, causal=True)
    eager_o, _ = attention_ref_batched(q, k, v, causal=True, eager_dtype=dtype)
    fmt = make_format(kind, dtype, ref_o)
    cols = fmt.out_shape((dv,))[-1]  # (NVFP4: two codes a byte)
    out = torch.empty(b, sq, h, cols * (1 if out_layout == "contiguous" else 2), dtype=fmt.dtype, device=DEVICE)
    out = out[..., :cols]
    res, lse = aq.flash_attn_func(q, k, v, causal=True, return_lse=True, backend="gluon", out=out,
                                  **format_kwargs(fmt))
    assert res.data_ptr() == out.data_ptr()
    p = make_problem(q, k, v, sq, sq)
    assert hopper.tma_store_applies(p, hcfg.schedule(p, hcfg.ws_config(d, dv), True, 132).cfg, out) == (
        room and out_layout == "contiguous")
    check_output(res, fmt, ref_o, eager_o, what=f"gluon {dims} {fmt.dtype} out {out_layout}")
    check_lse(lse, ref_lse, "gluon epilogue paths")
