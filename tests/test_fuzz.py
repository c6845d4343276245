"""Property-based fuzzing (hypothesis) of the four entry points against the float64 oracle.

Each test draws a whole problem (shapes, GQA ratio, head dims, mask, softcap, scale, sinks, split
count, input strides, paged layout, output format, `out=` tensor) plus one integer seed from
which every tensor is drawn (torch.Generator), so a failing example replays exactly; hypothesis
prints it (every draw, labelled) together with a reproduction blob. Results are compared with
attnquant.reference and checked with tests.helpers' SPEC tolerance (check_output, check_lse),
as the hand-written tests do.

A third of the examples are also planned (attnquant.plan) and replayed on copies of their
tensors at other addresses, held to the oracle and to the call's own bits.

Beyond the oracle the tests also hold the kernels to two things the SPEC implies: memory that
the call does not describe (stride padding around q/k/v, cache slots past a sequence's length,
pages no sequence owns, tokens past cu_seqlens_k[-1]) is never read into a result - it is
filled with NaN or large garbage ("poison") - and an `out=` tensor is written in place, through
its strides, without touching its neighbours.

Profiles (ATTNQUANT_FUZZ_PROFILE, default "gpu" when CUDA is available, else "ci"):
"ci" runs a few dozen examples of tiny problems in Triton's CPU interpreter (the whole file in
two to three minutes on two cores); "gpu" runs hundreds of examples with sequences up to 300 tokens and
bf16 inputs as well. ATTNQUANT_FUZZ_EXAMPLES=N scales the example counts (N for the base count;
each test runs a multiple of it, see fuzz()).
"""

import math
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import attnquant as aq
from attnquant import quant
from attnquant.replay import _LEADING
from attnquant.reference import attention_ref_batched, attention_ref_kvcache, attention_ref_varlen, merge_ref

from .helpers import (DEVICE, GLUON, ON_GPU, check_lse, check_nvfp4_scales, check_output, format_kwargs, group_format,
                      logical_block_scale, nvfp4_format)

# The portable kernel's softcap computes tanh as 1 - 2 / (1 + exp2(2x log2 e)): for |x| > ~44 the
# exp2 overflows to inf (numpy warns in the interpreter) and tanh reads +-1 exactly, as it should.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")

# ----------------------------------------------------------------------------------
# Profiles and the problem sizes each one draws from
# ----------------------------------------------------------------------------------

_COMMON = dict(deadline=None, print_blob=True, database=None,  # (no .hypothesis/ folder in the tree)
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# (no explain phase on the CPU: it reruns a failing example hundreds of times, minutes in the interpreter)
settings.register_profile("ci", max_examples=20, phases=[p for p in Phase if p != Phase.explain], **_COMMON)
settings.register_profile("gpu", max_examples=300, **_COMMON)
PROFILE_NAME = os.environ.get("ATTNQUANT_FUZZ_PROFILE", "gpu" if ON_GPU else "ci")
PROFILE = settings.get_profile(PROFILE_NAME)
if os.environ.get("ATTNQUANT_FUZZ_EXAMPLES"):  # a longer (or shorter) hunt with the profile's shapes
    PROFILE = settings(PROFILE, max_examples=int(os.environ["ATTNQUANT_FUZZ_EXAMPLES"]))


@dataclass(frozen=True)
class Limits:
    in_dtypes: tuple  # input dtypes (the interpreter runs bf16 as float32 copies: fp16 only there)
    sq: int  # flash_attn_func: Sq in 1..sq, Sk in 0..sk
    sk: int
    window: int  # window sides in -1 or 0..window
    var_q: int  # flash_attn_varlen_func: each sequence's query / key length
    var_k: int
    dec_q: int  # flash_attn_with_kvcache: Sq in 1..dec_q, cache capacity 0..dec_cap
    dec_cap: int
    merge_t: int  # merge_attn_states: T in 0..merge_t


LIMITS = {
    "ci": Limits((torch.float16,), 40, 48, 20, 30, 40, 4, 64, 30),
    "gpu": Limits((torch.bfloat16, torch.float16), 300, 300, 128, 300, 300, 8, 1024, 300),
}[PROFILE_NAME]


def fuzz(weight):
    """The profile's settings, with `weight` x its example count (cheap entry points get more)."""
    return settings(PROFILE, max_examples=max(1, round(PROFILE.max_examples * weight)))


HEAD_DIMS = [(16, 16), (32, 32), (64, 64), (96, 96), (128, 128), (192, 128), (256, 256), (64, 32)]
GROUP_SIZES = [16, 32, 64, 128]
GROUP_LAYOUTS = ["flat", "heads", "colmajor", "colmajor_tma"]
PAGE_SIZES = [1, 2, 4, 8, 16, 32]
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
NVFP4_OUT = [torch.uint8] + ([torch.float4_e2m1fn_x2] if hasattr(torch, "float4_e2m1fn_x2") else [])
# None: $ATTNQUANT_BACKEND / 'auto' (the Gluon kernel where it applies on sm_90)
BACKENDS = [None, "triton"] + (["gluon"] if GLUON else [])
SENTINEL = 0x7F  # the bytes around an out= slice: NaN in fp16/fp8, 3.4e38 in fp32/bf16, +-6 in e2m1

# ----------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------


@st.composite
def head_counts(draw):
    """(H, Hkv): MHA, GQA or MQA with Hkv in 1..3 and H / Hkv in {1, 2, 4}."""
    hkv = draw(st.integers(1, 3))
    return hkv * draw(st.sampled_from([1, 2, 4])), hkv


@st.composite
def attention_options(draw):
    """causal, window_size (each side -1 or 0..window; causal makes the right side 0), softcap
    (0 or in [1, 30]), softmax_scale (None or in [0.05, 2])."""
    side = st.one_of(st.just(-1), st.integers(0, LIMITS.window))
    return dict(causal=draw(st.booleans()), window_size=(draw(side), draw(side)),
                softcap=draw(st.one_of(st.just(0.0), st.floats(1.0, 30.0))),
                softmax_scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))))


@st.composite
def layouts(draw):
    """How a (..., S, H, D) tensor sits in memory: None (contiguous) or (head_major, extra heads,
    last-dim padding, extra tokens); only the last dim stays contiguous."""
    if not draw(st.booleans()):
        return None
    return draw(st.booleans()), draw(st.integers(0, 2)), draw(st.sampled_from([0, 8, 16])), draw(st.integers(0, 3))


@st.composite
def output_formats(draw, in_dtype, dv):
    """A description of the output format; built by build_format once the reference is known."""
    kind = draw(st.sampled_from(["plain", "static", "group", "nvfp4"]))
    if kind == "plain":
        plain = [in_dtype, torch.float32] + [d for d in LIMITS.in_dtypes if d != in_dtype]
        return "plain", draw(st.sampled_from(plain))
    if kind == "static":  # headroom: max|O| / scale = fp8_max / headroom (0.5 saturates the top half)
        return ("static", draw(st.sampled_from(FP8)), draw(st.sampled_from([4.0, 1.0, 0.5, 64.0])),
                draw(st.booleans()))
    if kind == "group":
        return ("group", draw(st.sampled_from(FP8)), draw(st.sampled_from([g for g in GROUP_SIZES if dv % g == 0])),
                draw(st.sampled_from(GROUP_LAYOUTS)), draw(st.booleans()))
    # NVFP4: gs = factor * 448 * 6 / amax (4 saturates the largest block scales at 448, 1/1024 makes
    # the small ones e4m3 subnormals)
    return "nvfp4", draw(st.sampled_from([1.0, 1 / 1024, 4.0])), draw(st.sampled_from(NVFP4_OUT))


# learnable sinks (gpt-oss): None, or the logits' dtype and spread (randn * spread + 1 per query head)
SINKS = st.one_of(st.none(), st.tuples(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
                                       st.sampled_from([0.5, 2.0, 8.0])))


def make_sinks(gen, h, spec):
    if spec is None:
        return None
    event("sinks")
    return (torch.randn(h, generator=gen) * spec[1] + 1.0).to(spec[0]).to(DEVICE)


def event_options(opts):
    event("causal" if opts["causal"] else "not causal")
    event("window" if opts["window_size"] != (-1, -1) else "no window")
    event("softcap" if opts["softcap"] else "no softcap")


def draw_common(data, dv, in_dtype=None):
    """The output side of a call: format, out= mode, return_lse."""
    common = dict(spec=data.draw(output_formats(in_dtype, dv), label="output format"),
                  out_mode=data.draw(st.sampled_from([None, "alloc", "strided"]), label="out="),
                  return_lse=data.draw(st.booleans(), label="return_lse"),
                  # (a third of the examples: a replay costs a second run of the kernels)
                  replay=data.draw(st.sampled_from([False, False, True]),
                                   label="also planned and replayed on copies (attnquant.plan)"))
    event(f"format {common['spec'][0]}")  # (--hypothesis-show-statistics lists how often)
    return common


# ----------------------------------------------------------------------------------
# Tensors (all drawn from one seeded generator)
# ----------------------------------------------------------------------------------


def randn(gen, *shape, dtype=torch.float16, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def fill_poison(t, poison, gen):
    """Memory no result may depend on: NaN, or garbage large enough to show in any result."""
    if poison == "nan":
        t.fill_(float("nan"))
    else:
        t.copy_(torch.randn(t.shape, generator=gen) * 100)
    return t


def place(values, layout, poison, gen):
    """`values` (..., S, H, D), on DEVICE, inside a buffer laid out as `layout` says, with the
    padding poisoned."""
    values = values.to(DEVICE)
    if layout is None:
        return values
    head_major, extra_h, pad_d, extra_s = layout
    *lead, s, h, d = values.shape
    dims = [s + extra_s, h + extra_h, d + pad_d]
    buf = torch.empty(*lead, *(dims[1], dims[0], dims[2]) if head_major else dims, dtype=values.dtype)
    fill_poison(buf, poison, gen)
    buf = buf.to(DEVICE)
    if head_major:
        buf = buf.transpose(-3, -2)
    off = extra_h // 2
    view = buf[..., :s, off:off + h, :d]
    view.copy_(values)
    assert view.stride(-1) == 1
    return view


def build_format(spec, ref_o):
    """The OutputFormat `spec` describes, scaled to the reference output (..., H, Dv)."""
    *tokens, h, dv = ref_o.shape
    t = math.prod(tokens)
    amax = max(ref_o.abs().max().item() if ref_o.numel() else 0.0, 1e-6)
    if spec[0] == "plain":
        return quant.OutputFormat(quant.PLAIN, spec[1])
    if spec[0] == "static":
        _, dtype, headroom, one_d = spec
        scale = torch.tensor(amax * headroom / quant.fp8_max(dtype), dtype=torch.float32, device=DEVICE)
        return quant.OutputFormat(quant.FP8_STATIC, dtype, scale=scale.reshape(1) if one_d else scale)
    if spec[0] == "group":
        _, dtype, group, layout, ue8m0 = spec
        if t == 0 and layout.startswith("colmajor"):  # (an empty column-major view is not one)
            layout = "flat"
        return group_format(dtype, tuple(tokens), h, dv, group, ue8m0=ue8m0, layout=layout)
    _, factor, dtype = spec
    return nvfp4_format(t, h, dv, torch.tensor(factor * 448 * 6 / amax, dtype=torch.float32), out_dtype=dtype)


def call_kwargs(fmt, out_mode, shape):
    """The format's keyword arguments plus, for out_mode, an out= tensor: 'alloc' a tensor of
    its own, 'strided' a slice (heads 1..H) of a wider one. Both start as SENTINEL bytes.
    Returns (kwargs, out or None, the wider buffer's bytes or None)."""
    kw = format_kwargs(fmt)
    if out_mode is None:
        if fmt.kind == quant.NVFP4 and fmt.dtype != torch.uint8:  # (out_dtype='nvfp4' gives uint8)
            out_mode = "alloc"
        else:
            return kw, None, None
    *lead, h, w = fmt.out_shape(shape)
    size = torch.empty((), dtype=fmt.dtype).element_size()
    extra = 2 if out_mode == "strided" else 0
    wide = torch.full((*lead, h + extra, w * size), SENTINEL, dtype=torch.uint8, device=DEVICE)
    out = wide.view(fmt.dtype)[..., extra // 2:extra // 2 + h, :]
    kw["out"] = out
    return kw, out, (wide if extra else None)


def check_call(res, lse, out, wide, fmt, ref_o, ref_lse, eager_o, softcap, return_lse):
    """The result against the oracle (tests.helpers' SPEC tolerance); an empty problem only
    for shapes and dtypes; out= written in place and nothing beside it."""
    if out is not None:
        assert res.data_ptr() == out.data_ptr() and res.dtype == out.dtype and res.shape == out.shape
    if wide is not None:
        h = out.shape[-2]
        assert (wide[..., 0, :] == SENTINEL).all() and (wide[..., h + 1, :] == SENTINEL).all(), \
            "bytes beside the out= slice were written"
    if return_lse:
        assert lse is not None and lse.dtype == torch.float32 and lse.shape == ref_lse.shape, \
            (None if lse is None else (lse.dtype, lse.shape), ref_lse.shape)
    else:
        assert lse is None
    assert res.dtype == fmt.dtype and tuple(res.shape) == fmt.out_shape(ref_o.shape), (res.dtype, res.shape)
    if ref_o.numel() == 0:
        event("empty output")
        return
    if (ref_o == 0).all():  # no row sees a key (check_output's tolerance needs a nonzero output): exact 0
        event("no row sees a key")
        scales = logical_block_scale(fmt, res) if fmt.kind in (quant.FP8_GROUP, quant.NVFP4) else None
        if fmt.kind == quant.NVFP4:
            check_nvfp4_scales(fmt, scales, ref_o, "fuzz")
        if fmt.kind == quant.FP8_GROUP:  # amax clamps to 1e-10
            _, ref_scales = quant.quantize(ref_o.float(), fmt)
            assert ((scales.double() / ref_scales.double() - 1).abs() < 0.01).all(), (scales, ref_scales)
        assert (quant.dequantize(res, fmt, scales) == 0).all(), "rows that see no key must be 0"
    else:
        check_output(res, fmt, ref_o, eager_o, softcap=softcap, what="fuzz")
    if return_lse:
        check_lse(lse, ref_lse, "fuzz")


def cu_seqlens(lens):
    return torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEVICE)


def to_pages(seqs, dims, dtype, page, spare, width, poison, gen):
    """Each sequence's tensors scattered over shuffled pages of paged caches, one cache per
    entry of `seqs` (a list, per cache, of (L_b, Hkv, D) tensors; dims: (Hkv, D) per cache),
    plus `spare` pages no sequence owns. Returns (caches (num_blocks, page, Hkv, D), block
    table (B, width) int32); table entries past a sequence's pages point at random pages, and
    slots past L_b are poisoned."""
    owned = [-(-t.shape[0] // page) for t in seqs[0]]
    num_blocks = max(sum(owned) + spare, 1)
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.randint(0, num_blocks, (len(owned), width), generator=gen, dtype=torch.int32)
    caches = [fill_poison(torch.empty(num_blocks, page, *dd, dtype=dtype), poison, gen) for dd in dims]
    nxt = 0
    for b, n in enumerate(owned):
        for j in range(n):
            table[b, j] = perm[nxt]
            for cache, per_seq in zip(caches, seqs):
                rows = per_seq[b][j * page:(j + 1) * page]
                cache[perm[nxt], :rows.shape[0]] = rows
            nxt += 1
    return caches, table.to(DEVICE)


def ref_varlen(q, k, v, cu_q, cu_k, used, **kw):
    """attention_ref_varlen, plus the empty batch (no sequences) it does not take."""
    if cu_q.numel() == 1:
        return (torch.zeros(0, q.shape[1], v.shape[-1], dtype=torch.float64, device=DEVICE),
                torch.zeros(q.shape[1], 0, dtype=torch.float64, device=DEVICE))
    return attention_ref_varlen(q, k, v, cu_q, cu_k, used, **kw)


def call_or_gluon_refusal(fn, *args, **kw):
    """fn(*args, **kw); a forced Gluon backend may refuse the call (ValueError saying why):
    returns None then."""
    if kw.get("backend") != "gluon":
        return fn(*args, **kw)
    try:
        return fn(*args, **kw)
    except ValueError as e:
        assert "backend='gluon' cannot run this call" in str(e), e
        return None


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)}:{x.dtype}:stride{x.stride()}:off{x.storage_offset()}"
    return repr(x)


def trace_call(fn, args, kw):
    """With ATTNQUANT_FUZZ_TRACE=FILE, the call about to run is appended (and flushed) to FILE: a
    call that kills the CUDA context (an illegal address) leaves hypothesis nothing to replay, but
    the trace's last line names it."""
    path = os.environ.get("ATTNQUANT_FUZZ_TRACE")
    if path:
        with open(path, "a") as f:
            f.write(f"{fn.__name__}({', '.join(map(_describe, args))}, "
                    f"{', '.join(f'{k}={_describe(v)}' for k, v in kw.items())})\n")
            if isinstance(args[-1], torch.Tensor) and args[-1].dtype == torch.int32:
                f.write(f"  int32 arg: {args[-1].tolist()}\n")
            if isinstance(kw.get("block_table"), torch.Tensor):
                f.write(f"  block_table: {kw['block_table'].tolist()}\n")


def call_and_check(fn, args, call_kw, common, ref_o, ref_lse, eager_o, softcap=0.0, backend=None):
    """fn(*args, **call_kw) in the drawn output format (and out= mode, LSE request, backend),
    checked against the oracle's (ref_o, ref_lse, eager_o) with check_call."""
    fmt = build_format(common["spec"], ref_o)
    kw, out, wide = call_kwargs(fmt, common["out_mode"], ref_o.shape)
    if backend is not None:
        kw["backend"] = backend
    trace_call(fn, args, {**call_kw, **kw})
    got = call_or_gluon_refusal(fn, *args, return_lse=common["return_lse"], **call_kw, **kw)
    if got is not None:
        check_call(*got, out, wide, fmt, ref_o, ref_lse, eager_o, softcap, common["return_lse"])
        if common["replay"]:
            check_replay(fn, args, call_kw, kw, common, got, ref_o, ref_lse, eager_o, softcap)


def twin(t):
    """t's values, strides and storage offset (so its 16-byte alignment) at another address, the
    rest of its storage (the poison around a strided view) copied too."""
    flat = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    return flat.clone().as_strided(t.size(), t.stride(), t.storage_offset())


def check_replay(fn, args, call_kw, kw, common, got, ref_o, ref_lse, eager_o, softcap):
    """The call planned (attnquant.plan), then replayed on copies of its tensors at other
    addresses, with a fresh output format and out=: held to the oracle like the call, and
    bit for bit equal to it."""
    event("replayed")
    planned = aq.plan(fn, *args, return_lse=common["return_lse"], **call_kw, **kw)
    fmt = build_format(common["spec"], ref_o)  # (new scale tensors of the same layouts)
    run_kw, out, wide = call_kwargs(fmt, common["out_mode"], ref_o.shape)
    run_kw = {n: t for n, t in run_kw.items() if n in ("out", "output_scale", "output_block_scale")}
    if call_kw.get("sinks") is not None:
        run_kw["sinks"] = twin(call_kw["sinks"])
    res, lse = planned.run(*[twin(t) for t in args[:len(_LEADING[fn])]], **run_kw)
    check_call(res, lse, out, wide, fmt, ref_o, ref_lse, eager_o, softcap, common["return_lse"])
    assert torch.equal(res.view(torch.uint8), got[0].view(torch.uint8)), "replay and call differ"


def draw_forward(data, dtype):
    """The draws flash_attn_func's and flash_attn_varlen_func's tests share: (H, Hkv), (D, Dv),
    attention options, sinks, num_splits, q/k/v layouts, the poison, the backend, the output
    format's arguments and a seed."""
    draw = data.draw
    h, hkv = draw(head_counts(), label="(H, Hkv)")
    d, dv = draw(st.sampled_from(HEAD_DIMS), label="(D, Dv)")
    opts = draw(attention_options(), label="options")
    sinks_spec = draw(SINKS, label="sinks")
    num_splits = draw(st.sampled_from([0, 1, 2, 3, 4]), label="num_splits")
    lay = [draw(layouts(), label=f"{n} layout") for n in "qkv"]
    poison = draw(st.sampled_from(["garbage", "nan"]), label="poison")
    backend = draw(st.sampled_from(BACKENDS), label="backend")
    return h, hkv, d, dv, opts, sinks_spec, num_splits, lay, poison, backend, draw_common(data, dv, dtype), \
        draw(st.integers(0, 2**31 - 1), label="seed")


# ----------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------


@fuzz(1.25)
@given(data=st.data())
def test_fuzz_flash_attn_func(data):
    draw = data.draw
    dtype = draw(st.sampled_from(LIMITS.in_dtypes), label="dtype")
    b = draw(st.integers(1, 3), label="B")
    sq = draw(st.integers(1, LIMITS.sq), label="Sq")
    sk = draw(st.integers(0, LIMITS.sk), label="Sk")
    h, hkv, d, dv, opts, sinks_spec, num_splits, lay, poison, backend, common, seed = draw_forward(data, dtype)
    q_mag = draw(st.sampled_from([1.0, 3.0]), label="|q| scale")

    event(f"num_splits {num_splits}")
    event_options(opts)
    gen = torch.Generator().manual_seed(seed)
    q = place(randn(gen, b, sq, h, d, dtype=dtype, scale=q_mag), lay[0], poison, gen)
    k = place(randn(gen, b, sk, hkv, d, dtype=dtype), lay[1], poison, gen)
    v = place(randn(gen, b, sk, hkv, dv, dtype=dtype), lay[2], poison, gen)
    opts["sinks"] = make_sinks(gen, h, sinks_spec)
    ref_o, ref_lse = attention_ref_batched(q, k, v, **opts)
    eager_o, _ = attention_ref_batched(q, k, v, eager_dtype=dtype, **opts)
    call_and_check(aq.flash_attn_func, (q, k, v), dict(num_splits=num_splits, **opts), common,
                   ref_o, ref_lse, eager_o, opts["softcap"], backend)


@fuzz(1.25)
@given(data=st.data())
def test_fuzz_flash_attn_varlen_func(data):
    draw = data.draw
    dtype = draw(st.sampled_from(LIMITS.in_dtypes), label="dtype")
    batch = draw(st.integers(0, 4), label="batch")
    lens_q = draw(st.lists(st.integers(0, LIMITS.var_q), min_size=batch, max_size=batch), label="q lengths")
    lens_k = draw(st.lists(st.integers(0, LIMITS.var_k), min_size=batch, max_size=batch), label="k lengths")
    used = None
    if draw(st.booleans(), label="pass seqused_k"):
        used = list(draw(st.tuples(*[st.integers(0, n) for n in lens_k]), label="seqused_k"))
    page = draw(st.one_of(st.none(), st.sampled_from(PAGE_SIZES)), label="page size (None: packed k/v)")
    # paged: cu_seqlens_k alongside seqused_k or not (it is required without seqused_k)
    pass_cu_k = page is None or used is None or draw(st.booleans(), label="paged: cu_seqlens_k too")
    extra = draw(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 2)),
                 label="(max_seqlen_q slack, max_seqlen_k slack, spare tokens / pages / table columns)")
    h, hkv, d, dv, opts, sinks_spec, num_splits, lay, poison, backend, common, seed = draw_forward(data, dtype)

    event("packed k/v" if page is None else "paged k/v")
    event(f"num_splits {num_splits}")
    event_options(opts)
    gen = torch.Generator().manual_seed(seed)
    tq = sum(lens_q)
    q = place(randn(gen, tq, h, d, dtype=dtype), lay[0], poison, gen)
    ks = [randn(gen, n, hkv, d, dtype=dtype) for n in lens_k]
    vs = [randn(gen, n, hkv, dv, dtype=dtype) for n in lens_k]
    kcat = torch.cat(ks) if ks else torch.empty(0, hkv, d, dtype=dtype)
    vcat = torch.cat(vs) if vs else torch.empty(0, hkv, dv, dtype=dtype)
    cq, ck = cu_seqlens(lens_q), cu_seqlens(lens_k)
    used_t = None if used is None else torch.tensor(used, dtype=torch.int32, device=DEVICE)
    opts["sinks"] = make_sinks(gen, h, sinks_spec)
    ref_o, ref_lse = ref_varlen(q, kcat.to(DEVICE), vcat.to(DEVICE), cq, ck, used_t, **opts)
    eager_o, _ = ref_varlen(q, kcat.to(DEVICE), vcat.to(DEVICE), cq, ck, used_t, eager_dtype=dtype, **opts)

    if page is None:  # packed k/v, followed by spare (poisoned) tokens no sequence owns
        spare = fill_poison(torch.empty(extra[2], hkv, d + dv, dtype=dtype), poison, gen)
        k = place(torch.cat([kcat, spare[..., :d]]), lay[1], poison, gen)
        v = place(torch.cat([vcat, spare[..., d:]]), lay[2], poison, gen)
        block_table, capacity = None, k.shape[0]
    else:
        width = max([-(-n // page) for n in lens_k], default=0) + extra[2]
        (kp, vp), block_table = to_pages([ks, vs], [(hkv, d), (hkv, dv)], dtype, page, extra[2], width, poison, gen)
        k, v = place(kp, lay[1], poison, gen), place(vp, lay[2], poison, gen)
        capacity = width * page
    max_q = min(max(lens_q, default=0) + extra[0], tq)
    max_k = min(max(lens_k, default=0) + extra[1], capacity)
    call_and_check(aq.flash_attn_varlen_func, (q, k, v, cq, ck if pass_cu_k else None, max_q, max_k),
                   dict(seqused_k=used_t, block_table=block_table, num_splits=num_splits, **opts), common,
                   ref_o, ref_lse, eager_o, opts["softcap"], backend)


@fuzz(2.5)
@given(data=st.data())
def test_fuzz_flash_attn_with_kvcache(data):
    draw = data.draw
    dtype = draw(st.sampled_from(LIMITS.in_dtypes), label="dtype")
    b = draw(st.integers(1, 3), label="B")
    sq = draw(st.integers(1, LIMITS.dec_q), label="Sq")
    cap = draw(st.integers(0, LIMITS.dec_cap), label="cache capacity")
    as_int = draw(st.booleans(), label="cache_seqlens as one int")
    length = st.integers(0, cap)
    lens = ([draw(length, label="cache_seqlens")] * b if as_int
            else draw(st.lists(length, min_size=b, max_size=b), label="cache_seqlens"))
    page = draw(st.one_of(st.none(), st.sampled_from(PAGE_SIZES)), label="page size (None: contiguous cache)")
    spare = draw(st.tuples(st.integers(0, 2), st.integers(0, 2)), label="(spare pages, spare table columns)")
    h, hkv = draw(head_counts(), label="(H, Hkv)")
    d, dv = draw(st.sampled_from(HEAD_DIMS), label="(D, Dv)")
    opts = draw(attention_options(), label="options")
    sinks_spec = draw(SINKS, label="sinks")
    num_splits = draw(st.sampled_from([0, 1, 3]), label="num_splits")
    lay = [draw(layouts(), label=f"{n} layout") for n in ("q", "k_cache", "v_cache")]
    poison = draw(st.sampled_from(["garbage", "nan"]), label="poison")
    common = draw_common(data, dv, dtype)
    seed = draw(st.integers(0, 2**31 - 1), label="seed")

    event("contiguous cache" if page is None else "paged cache")
    event(f"num_splits {num_splits}")
    event_options(opts)
    gen = torch.Generator().manual_seed(seed)
    q = place(randn(gen, b, sq, h, d, dtype=dtype), lay[0], poison, gen)
    kc, vc = randn(gen, b, cap, hkv, d, dtype=dtype), randn(gen, b, cap, hkv, dv, dtype=dtype)
    for i, n in enumerate(lens):  # the slots past each sequence's length
        fill_poison(kc[i, n:], poison, gen)
        fill_poison(vc[i, n:], poison, gen)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    opts["sinks"] = make_sinks(gen, h, sinks_spec)
    # the oracle reads the logical cache (the first cache_seqlens[b] keys of sequence b)
    ref_o, ref_lse = attention_ref_kvcache(q, kc.to(DEVICE), vc.to(DEVICE), lens_t, **opts)
    eager_o, _ = attention_ref_kvcache(q, kc.to(DEVICE), vc.to(DEVICE), lens_t, eager_dtype=dtype, **opts)
    if page is None:
        k, v, block_table = place(kc, lay[1], poison, gen), place(vc, lay[2], poison, gen), None
    else:
        width = -(-cap // page) + spare[1]
        seqs = [[c[i, :n] for i, n in enumerate(lens)] for c in (kc, vc)]
        (kp, vp), block_table = to_pages(seqs, [(hkv, d), (hkv, dv)], dtype, page, spare[0], width, poison, gen)
        k, v = place(kp, lay[1], poison, gen), place(vp, lay[2], poison, gen)
    call_opts = dict(opts, block_table=block_table, num_splits=num_splits)
    if call_opts["causal"]:
        del call_opts["causal"]  # (the default)
    call_and_check(aq.flash_attn_with_kvcache, (q, k, v, lens[0] if as_int else lens_t), call_opts, common,
                   ref_o, ref_lse, eager_o, opts["softcap"])


@fuzz(5)
@given(data=st.data())
def test_fuzz_merge_attn_states(data):
    draw = data.draw
    dtype = draw(st.sampled_from(LIMITS.in_dtypes + (torch.float32,)), label="partials' dtype")
    t = draw(st.integers(0, LIMITS.merge_t), label="T")
    h = draw(st.integers(1, 4), label="H")
    dv = draw(st.sampled_from([16, 64, 128]), label="Dv")
    p_inf = draw(st.tuples(st.sampled_from([0.0, 0.2, 0.5]), st.sampled_from([0.0, 0.1, 0.3])),
                 label="(P(lse = -inf), P(lse = +inf))")
    lse_mag = draw(st.sampled_from([0.5, 3.0, 30.0]), label="|lse| scale")
    lay = [draw(layouts(), label=f"{n} layout") for n in ("prefix_out", "suffix_out")]
    lse_lay = [draw(st.sampled_from(["contiguous", "transposed", "padded"]), label=f"{n} layout")
               for n in ("prefix_lse", "suffix_lse")]
    poison = draw(st.sampled_from(["garbage", "nan"]), label="poison")
    common = draw_common(data, dv, dtype)
    seed = draw(st.integers(0, 2**31 - 1), label="seed")

    gen = torch.Generator().manual_seed(seed)
    o1 = place(randn(gen, t, h, dv, dtype=dtype), lay[0], poison, gen)
    o2 = place(randn(gen, t, h, dv, dtype=dtype), lay[1], poison, gen)
    lses = []
    for layout in lse_lay:
        lse = torch.randn(h, t, generator=gen) * lse_mag
        r = torch.rand(h, t, generator=gen)
        lse[r < p_inf[0]] = float("-inf")
        lse[(r >= p_inf[0]) & (r < p_inf[0] + p_inf[1])] = float("inf")
        if layout == "transposed":  # a (T, H) tensor's transpose
            lse = lse.t().contiguous().to(DEVICE).t()
        elif layout == "padded":  # a slice of a wider (H, T + 3) buffer
            buf = fill_poison(torch.empty(h, t + 3), poison, gen)
            buf[:, :t] = lse
            lse = buf.to(DEVICE)[:, :t]
        lses.append(lse.to(DEVICE))
    l1, l2 = lses
    ref_o, ref_lse = merge_ref(o1, l1, o2, l2)
    eager_o, _ = merge_ref(o1, l1, o2, l2, eager_dtype=dtype)
    call_and_check(aq.merge_attn_states, (o1, l1, o2, l2), {}, common, ref_o, ref_lse, eager_o)


# GPU profile: ATTNQUANT_FUZZ_PROFILE=gpu python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics
