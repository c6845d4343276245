"""attnquant.plan: one call recorded, replayed per layer on fresh tensors of the same shapes.
Each replay is checked against the oracle and against the eager call on the same tensors
(bit-identical: the same kernels with the same arguments)."""

import pytest
import torch

import attnquant as aq
from attnquant import quant
from attnquant.kernels import launcher
from attnquant.reference import attention_ref, attention_ref_batched, attention_ref_kvcache, attention_ref_varlen

from .helpers import (BACKENDS, DEVICE, DTYPES, ON_GPU, check_lse, check_output, format_kwargs, make_format,
                      randn)
from .test_kvcache import to_paged

KINDS = ["plain", torch.float8_e4m3fn, "group", "nvfp4"]
LAYERS = 2  # replays after the planning call, each on new tensors


def same_bits(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() == 1 else torch.equal(a, b)


def per_run(fmt):
    """The per-layer format tensors a run takes (a fresh scale tensor of the plan's layout)."""
    kw = format_kwargs(fmt)
    kw.pop("out_dtype")
    kw.pop("ue8m0", None)
    return kw


def check_replay(out, lse, fmt, ref_o, ref_lse, eager_dtype_o, eager_call, what):
    """The replay against the oracle, then bit for bit against the eager call on its tensors."""
    check_output(out, fmt, ref_o, eager_dtype_o, what=what)
    if lse is not None:
        check_lse(lse, ref_lse, what)
    scales = fmt.block_scale.clone() if fmt.block_scale is not None else None
    if scales is not None:  # NaN again, so the eager call must write every scale itself
        if fmt.block_scale.dtype == torch.float32:  # (per-group scales: any strides, no byte view)
            fmt.block_scale.fill_(float("nan"))
        else:
            fmt.block_scale.view(torch.uint8).fill_(0xFF)
    eager_out, eager_lse = eager_call()
    assert same_bits(out, eager_out), f"{what}: replay and eager call differ"
    if lse is not None:
        assert torch.equal(lse, eager_lse), f"{what}: LSEs differ"
    if scales is not None:
        assert same_bits(scales, fmt.block_scale), f"{what}: block scales differ"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_replay_prefill(kind, backend):
    dtype = DTYPES[0]
    b, sq, sk, h, hkv, d = 2, 130 if ON_GPU else 19, 200 if ON_GPU else 33, 4, 2, 64

    def layer():
        q, k, v = randn(b, sq, h, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
        ref_o, ref_lse = attention_ref_batched(q, k, v, causal=True)
        eager_o, _ = attention_ref_batched(q, k, v, causal=True, eager_dtype=dtype)
        return (q, k, v), make_format(kind, dtype, ref_o), ref_o, ref_lse, eager_o

    (q, k, v), fmt, ref_o, ref_lse, eager_o = layer()
    opts = dict(causal=True, return_lse=True, backend=backend)
    planned = aq.plan(aq.flash_attn_func, q, k, v, **opts, **format_kwargs(fmt))
    assert planned.direct, "a plain prefill call replays its launches"
    check_output(planned.result[0], fmt, ref_o, eager_o, what="planning call")
    for i in range(LAYERS):
        inputs, fmt, ref_o, ref_lse, eager_o = layer()
        out, lse = planned.run(*inputs, **per_run(fmt))
        check_replay(out, lse, fmt, ref_o, ref_lse, eager_o,
                     lambda: aq.flash_attn_func(*inputs, **opts, **format_kwargs(fmt)), f"layer {i}")


@pytest.mark.parametrize("kind", KINDS, ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_replay_kvcache(paged, kind):
    """Decode over a cache with split-KV (partials and combine replayed), sinks per layer, and
    the cache lengths updated in place between runs, as a serving step does."""
    dtype = DTYPES[0]
    b, sk, h, hkv, d, page = 3, 96 if ON_GPU else 40, 8, 2, 64, 16
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    lens = torch.tensor([sk, 1, sk // 2 + 3], dtype=torch.int32, device=DEVICE)

    def layer():
        q = randn(b, 1, h, d, dtype=dtype)
        k, v = randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
        sinks = torch.randn(h, device=DEVICE) + 1.0
        ref_kw = dict(causal=True, sinks=sinks)
        ref_o, ref_lse = attention_ref_kvcache(q, k, v, lens, **ref_kw)
        eager_o, _ = attention_ref_kvcache(q, k, v, lens, eager_dtype=dtype, **ref_kw)
        return q, k, v, sinks, make_format(kind, dtype, ref_o), ref_o, ref_lse, eager_o

    perm = None

    def caches(k, v):
        if not paged:
            return k, v
        kp, _ = to_paged(k, page, torch.Generator().manual_seed(perm))
        vp, _ = to_paged(v, page, torch.Generator().manual_seed(perm))
        return kp, vp

    perm = int(torch.randint(0, 2 ** 31, (), generator=gen))
    table = to_paged(torch.zeros(b, sk, 1, 1, device=DEVICE), page, torch.Generator().manual_seed(perm))[1] \
        if paged else None
    q, k, v, sinks, fmt, ref_o, ref_lse, eager_o = layer()
    opts = dict(block_table=table, num_splits=3, return_lse=True)
    planned = aq.plan(aq.flash_attn_with_kvcache, q, *caches(k, v), lens, sinks=sinks, **opts, **format_kwargs(fmt))
    assert planned.direct
    check_output(planned.result[0], fmt, ref_o, eager_o, what="planning call")
    for i in range(LAYERS):
        lens.copy_(torch.randint(1, sk + 1, (b,), generator=gen).to(torch.int32))  # the next step's lengths
        q, k, v, sinks, fmt, ref_o, ref_lse, eager_o = layer()
        kc, vc = caches(k, v)
        out, lse = planned.run(q, kc, vc, sinks=sinks, **per_run(fmt))
        check_replay(out, lse, fmt, ref_o, ref_lse, eager_o, lambda: aq.flash_attn_with_kvcache(
            q, kc, vc, lens, sinks=sinks, **opts, **format_kwargs(fmt)), f"layer {i}")


def test_replay_varlen_with_empty_sequence():
    dtype = DTYPES[0]
    h, hkv, d = 4, 1, 64
    lq, lk = [5, 0, 9], [12, 0, 20]
    cu_q = torch.tensor([0, 5, 5, 14], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 12, 12, 32], dtype=torch.int32, device=DEVICE)
    opts = dict(causal=True, return_lse=True)

    def layer():
        q, k, v = randn(14, h, d, dtype=dtype), randn(32, hkv, d, dtype=dtype), randn(32, hkv, d, dtype=dtype)
        ref_o, ref_lse = attention_ref_varlen(q, k, v, cu_q, cu_k, causal=True)
        eager_o, _ = attention_ref_varlen(q, k, v, cu_q, cu_k, causal=True, eager_dtype=dtype)
        return (q, k, v), ref_o, ref_lse, eager_o

    inputs, *_ = layer()
    planned = aq.plan(aq.flash_attn_varlen_func, *inputs, cu_q, cu_k, max(lq), max(lk), **opts)
    assert planned.direct
    fmt = quant.OutputFormat(quant.PLAIN, dtype)
    for i in range(LAYERS):
        inputs, ref_o, ref_lse, eager_o = layer()
        out, lse = planned.run(*inputs)
        check_replay(out, lse, fmt, ref_o, ref_lse, eager_o, lambda: aq.flash_attn_varlen_func(
            *inputs, cu_q, cu_k, max(lq), max(lk), **opts), f"layer {i}")


def test_replay_merge():
    t, h, dv = 7, 3, 32
    ref_q, ref_k, ref_v = (torch.randn(t, h, 32, dtype=torch.float64, device=DEVICE),
                           torch.randn(20, h, 32, dtype=torch.float64, device=DEVICE),
                           torch.randn(20, h, dv, dtype=torch.float64, device=DEVICE))

    def parts():
        k, v = ref_k.normal_(), ref_v.normal_()
        o1, l1 = attention_ref(ref_q, k[:9], v[:9])
        o2, l2 = attention_ref(ref_q, k[9:], v[9:])
        ref_o, _ = attention_ref(ref_q, k, v)
        return (o1.float(), l1.float(), o2.float(), l2.float()), ref_o

    (p1, l1, p2, l2), _ = parts()
    planned = aq.plan(aq.merge_attn_states, p1, l1, p2, l2)
    assert planned.direct
    for _ in range(LAYERS):
        inputs, ref_o = parts()
        out, _ = planned.run(*inputs)
        eager, _ = aq.merge_attn_states(*inputs)
        assert (out.double() - ref_o).abs().max() < 1e-5
        assert torch.equal(out, eager)


def test_replay_aliased_inputs_replay_the_whole_call():
    """k and v one tensor: the addresses cannot tell them apart, so runs call the function."""
    dtype = DTYPES[0]
    q, kv = randn(1, 9, 2, 32, dtype=dtype), randn(1, 12, 2, 32, dtype=dtype)
    planned = aq.plan(aq.flash_attn_func, q, kv, kv)
    assert not planned.direct
    q, kv = randn(1, 9, 2, 32, dtype=dtype), randn(1, 12, 2, 32, dtype=dtype)
    out, _ = planned.run(q, kv, kv)
    ref_o, _ = attention_ref_batched(q, kv, kv)
    eager_o, _ = attention_ref_batched(q, kv, kv, eager_dtype=dtype)
    check_output(out, quant.OutputFormat(quant.PLAIN, dtype), ref_o, eager_o)


def test_replay_keeps_no_input_alive():
    """A plan holds the planning call's output (`result`) but none of its inputs."""
    import gc
    import weakref

    dtype = DTYPES[0]
    q, k, v = randn(1, 9, 2, 32, dtype=dtype), randn(1, 12, 2, 32, dtype=dtype), randn(1, 12, 2, 32, dtype=dtype)
    planned = aq.plan(aq.flash_attn_func, q, k, v, causal=True)
    refs = [weakref.ref(t) for t in (q, k, v)]
    del q, k, v
    gc.collect()
    assert planned.direct and all(r() is None for r in refs)


def test_replay_empty_batch():
    dtype = DTYPES[0]
    planned = aq.plan(aq.flash_attn_func, randn(0, 5, 2, 32, dtype=dtype), randn(0, 7, 2, 32, dtype=dtype),
                      randn(0, 7, 2, 32, dtype=dtype), return_lse=True)
    out, lse = planned.run(randn(0, 5, 2, 32, dtype=dtype), randn(0, 7, 2, 32, dtype=dtype),
                           randn(0, 7, 2, 32, dtype=dtype))
    assert out.shape == (0, 5, 2, 32) and lse.shape == (0, 2, 5)


def test_replay_rejects_what_the_plan_was_not_made_for():
    """A tensor unlike the plan's raises ValueError naming it, and nothing is written."""
    dtype = DTYPES[0]
    q, k, v = randn(1, 9, 2, 32, dtype=dtype), randn(1, 12, 2, 32, dtype=dtype), randn(1, 12, 2, 32, dtype=dtype)
    planned = aq.plan(aq.flash_attn_func, q, k, v)
    out = torch.full((1, 9, 2, 32), 7.0, dtype=dtype, device=DEVICE)
    for name, args, kw in (("k", (q, randn(1, 13, 2, 32, dtype=dtype), v), {}),
                           ("v", (q, k, randn(1, 12, 2, 64, dtype=dtype)[..., :32]), {}),
                           ("q", (q.float(), k, v), {}),
                           ("sinks", (q, k, v), dict(sinks=torch.zeros(2, device=DEVICE)))):
        with pytest.raises(ValueError, match=name):
            planned.run(*args, out=out, **kw)
        assert (out == 7).all()
    with pytest.raises(TypeError, match="softcap"):
        planned.run(q, k, v, softcap=1.0)
    for leading in ((q, k, v, q), (q, k)):
        with pytest.raises(TypeError, match="leading"):
            planned.run(*leading)
    with pytest.raises(TypeError, match="public attention functions"):
        aq.plan(torch.matmul, q, k)
    with pytest.raises(ValueError, match="softmax_scale"):  # the planning call validates as always
        aq.plan(aq.flash_attn_func, q, k, v, softmax_scale=float("nan"))
    assert not launcher.RECORDERS


def test_replay_compiled_launch_arguments():
    """The GPU's replay path, with a stand-in compiled kernel: the run's addresses go in as ints
    where the recorded launch had the plan's tensors, TMA descriptors are rebuilt over the run's
    tensors, everything else is passed as recorded."""
    from attnquant.kernels.hopper.launch import _descriptor, descriptor_params
    from attnquant.replay import _Launch

    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append((grid, args))

    class FakeLaunches:
        direct = True

        def compiled(self, key):
            return Compiled() if key == "key" else None

    planned_q, planned_k, scratch = (torch.empty(64, 2, 32, dtype=torch.float16) for _ in range(3))
    desc = _descriptor(planned_k, 16, 64, 32)
    args = (desc, planned_q, scratch, 5, 0.5)
    step = _Launch(FakeLaunches(), "key", (7,), args, dict(A=1, B=True), {}, slots=[(1, 0, torch.float16)],
                   descs=[(0, 1, descriptor_params(desc))])
    q, k = torch.empty_like(planned_q), torch.empty_like(planned_k)
    step([q, k], [q.data_ptr(), k.data_ptr()])
    (grid, got), = calls
    assert grid == (7, 1, 1)
    assert got[1] == q.data_ptr() and got[2] is scratch and got[3:] == (5, 0.5, 1, True)
    assert got[0].base.data_ptr() == k.data_ptr() and got[0].base.dtype == torch.float16
    assert (list(got[0].shape), list(got[0].strides), list(got[0].block_shape)) == \
        (list(desc.shape), list(desc.strides), list(desc.block_shape))


def test_replay_gets_a_gluon_workspace_of_its_own():
    """The Gluon kernel's tile counter is shared by the eager calls of one stream; a plan's
    replays may run on another stream, so the planning call takes a private one."""
    from types import SimpleNamespace

    from attnquant.kernels.hopper.launch import _WORKSPACES, workspace
    from attnquant.replay import _Recorder

    stream = SimpleNamespace(cuda_stream=-12345)  # (a stream id no real call uses)
    launcher.RECORDERS.append(_Recorder())
    try:
        private = [workspace(DEVICE, stream, 8) for _ in range(2)]
    finally:
        launcher.RECORDERS.pop()
    assert private[0].data_ptr() != private[1].data_ptr() and not any(t.any() for t in private)
    assert all(t is not s for t in private for s in _WORKSPACES.values())
    if ON_GPU:  # (outside a plan: the stream's shared buffer; the capture check needs CUDA)
        shared = workspace(DEVICE, stream, 8)
        assert workspace(DEVICE, stream, 8) is shared and shared is _WORKSPACES[(DEVICE, -12345)]
        del _WORKSPACES[(DEVICE, -12345)]
