"""`record`: a Triton aggregate whose constructor takes its annotated fields in order (Triton 3.6's
aggregates want an __init__ spelled out; the kernels' records have nothing more to say). Both
kernels use it: the Gluon kernel's partitions and the portable kernel's helpers receive records
instead of long argument lists.

A Python number given for a field becomes a constexpr, and a field annotated as a tensor also
takes a constexpr: an int kernel argument equal to 1 reaches the kernel as a constexpr (Triton
specializes on it; the Gluon kernel's num_heads = 1 did) and the constructor sees it unwrapped.
Under the interpreter, records work as plain objects; keep their functions free (a @triton.jit
method on an aggregate is not found by the interpreter)."""

from triton.language import core
from triton.runtime.jit import constexpr_function

# a field that is a runtime value, or a constexpr where Triton specialized it (an int == 1)
value = (core.tensor, core.constexpr)


def record(cls):
    """cls as an aggregate with __init__(self, *fields) in annotation order (a constexpr
    function: it runs while the kernel is traced)."""
    names = tuple(cls.__annotations__)
    for name, kind in cls.__annotations__.items():
        if kind is core.tensor:
            cls.__annotations__[name] = value

    def __init__(self, *values):
        assert len(values) == len(names), f"{cls.__name__} takes {names}"
        for name, v in zip(names, values):
            setattr(self, name, v if isinstance(v, core.base_value) else core.constexpr(v))
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = constexpr_function(__init__)
    return core._aggregate(cls)
