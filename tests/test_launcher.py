"""The launch key (kernels/launcher.py) against Triton's own specialization: a call whose key was
seen launches the kernel compiled for the first call with that key, so two calls that Triton
would compile differently must never share a key. Triton's binder for each kernel is built for
sm_90 on any machine (it runs no GPU code), fed the arguments of real calls captured through the
public API, then those arguments perturbed at random (ints to 1 / multiples of 16 / 64-bit
values, tensors misaligned or of another dtype)."""

import random

import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import JITFunction, create_function_from_signature

import attnquant as aq
from attnquant.kernels import combine
from attnquant.kernels.launcher import Launches
from attnquant.kernels.portable import launch as portable
from attnquant.reference import attention_ref_kvcache

from .helpers import DEVICE, randn

BACKEND = CUDABackend(GPUTarget("cuda", 90, 32))


def triton_specialization(kernel):
    """f(args, constexprs, options) -> what Triton compiles `kernel` for (its binder's
    specialization and options)."""
    dns = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
    jf = JITFunction(kernel.fn, do_not_specialize=dns)
    binder = create_function_from_signature(jf.signature, jf.params, BACKEND)

    def spec(args, constexprs, options):
        _, specialization, opts = binder(*args, **constexprs, **options, debug=False)
        return tuple(specialization), tuple(sorted(opts.items()))
    return spec


def captured_calls(monkeypatch):
    """(launches, args, constexprs, options) of the portable forward and combine kernels in a
    prefill, a split-KV decode (fp8 out, sinks), a paged decode and a varlen call."""
    calls = []

    def recorder(launches):
        def launch(device, grid, args, constexprs, **options):
            calls.append((launches, tuple(args), dict(constexprs), options))
        return launch
    monkeypatch.setattr(portable._FORWARD, "launch", recorder(portable._FORWARD))
    monkeypatch.setattr(combine._COMBINE, "launch", recorder(combine._COMBINE))
    q, k, v = randn(2, 40, 4, 64), randn(2, 50, 2, 64), randn(2, 50, 2, 64)
    aq.flash_attn_func(q, k, v, causal=True)
    scale = torch.tensor(0.05, device=DEVICE)
    # (the launches are recorded, not run: sizes cost nothing; 1024 keys keep 3 splits with the
    # GPU's 128-key decode blocks)
    qd, kc, vc = randn(3, 1, 8, 64), randn(3, 1024, 2, 64), randn(3, 1024, 2, 64)
    lens = torch.tensor([1024, 17, 400], dtype=torch.int32, device=DEVICE)
    sinks = torch.randn(8, device=DEVICE)
    aq.flash_attn_with_kvcache(qd, kc, vc, lens, output_scale=scale, num_splits=3, sinks=sinks)
    table = torch.randperm(12, device=DEVICE, dtype=torch.int32).view(3, 4)
    aq.flash_attn_with_kvcache(qd, randn(12, 16, 2, 64), randn(12, 16, 2, 64), lens.clamp(max=64), block_table=table)
    cu = torch.tensor([0, 5, 30], dtype=torch.int32, device=DEVICE)
    aq.flash_attn_varlen_func(randn(30, 4, 64), randn(30, 2, 64), randn(30, 2, 64), cu, cu, 25, 25)
    assert {c[0] for c in calls} == {portable._FORWARD, combine._COMBINE}, "both kernels' launches captured"
    return calls


def perturb(a, rng):
    if isinstance(a, torch.Tensor):
        if rng.random() < 0.5:
            buf = torch.empty(a.numel() + 16, dtype=a.dtype, device=a.device)
            return buf[1:1 + a.numel()].view(a.shape)  # misaligned by one element
        other = torch.float32 if a.dtype != torch.float32 else torch.float16
        return a.to(other)
    if type(a) is int:
        return rng.choice([0, 1, 2, 16, 17, 48, 2 ** 31 + 16, 2 ** 33 + 1])
    if type(a) is float:
        return rng.choice([0.0, 1.0, 0.125])
    return a


def test_launch_key_covers_triton_specialization(monkeypatch):
    rng = random.Random(torch.randint(0, 2 ** 31, ()).item())
    for launches, args, constexprs, options in captured_calls(monkeypatch):
        spec = triton_specialization(launches.fn)
        base_key = launches.key(0, args, constexprs, options)
        base_spec = spec(args, constexprs, options)
        assert launches.key(0, args, constexprs, options) == base_key  # deterministic
        for _ in range(60):
            new = list(args)
            changed = rng.sample(range(len(args)), rng.choice([1, 1, 2, 3]))
            for i in changed:
                new[i] = perturb(args[i], rng)
            same_key = launches.key(0, new, constexprs, options) == base_key
            same_spec = spec(new, constexprs, options) == base_spec
            assert same_spec or not same_key, (f"{launches.fn.__name__}: arguments {[launches.fn.arg_names[i] for i in changed]} changed so that "
                                             "Triton compiles the call differently, but the launch key is the same")
        # constexprs and options are in the key
        name = next(iter(constexprs))
        assert launches.key(0, args, {**constexprs, name: -7}, options) != base_key
        assert launches.key(0, args, constexprs, {**options, "num_warps": 16}) != base_key


def test_launch_runs_interpreted_function():
    """Under the interpreter (or any non-JIT kernel) a launch goes to the function itself."""
    calls = []

    class Fn:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k))
    launches = Launches(Fn())
    assert not launches.direct
    launches.launch(None, (3,), (1, 2.0), dict(A=4), num_warps=2)
    assert calls == [((3,), (1, 2.0), dict(A=4, num_warps=2))]


def misaligned(t):
    """A copy of t whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    out = buf[1:1 + t.numel()].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("num_splits", [1, 3])
def test_repeated_calls_follow_specialization(num_splits):
    """The same decode call again and again while what Triton specializes on changes between
    calls (q's alignment, then back; the format): each result matches the oracle, so no call
    ran a kernel compiled for another one's arguments. On the GPU the repeats go through the
    direct launch path."""
    q, kc, vc = randn(3, 1, 8, 64), randn(3, 48, 2, 64), randn(3, 48, 2, 64)
    lens = torch.tensor([48, 5, 30], dtype=torch.int32, device=DEVICE)
    ref, _ = attention_ref_kvcache(q, kc, vc, lens, causal=True)
    scale = (ref.abs().max() / 100).float().reshape(())
    for qi, fp8 in ((q, False), (q, False), (misaligned(q), False), (q, False), (misaligned(q), True), (q, True)):
        kw = dict(output_scale=scale) if fp8 else {}
        out, _ = aq.flash_attn_with_kvcache(qi, kc, vc, lens, num_splits=num_splits, **kw)
        got = out.double() * scale.double() if fp8 else out.double()
        tol = 2 ** -3 * ref.abs() + 2e-2 if fp8 else 2 ** -7 * ref.abs() + 2e-3
        assert ((got - ref).abs() <= tol).all(), f"fp8={fp8} aligned={qi.data_ptr() % 16 == 0}"
