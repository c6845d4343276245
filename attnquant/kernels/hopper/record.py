"""`record`: a Gluon aggregate whose constructor takes its annotated fields in order (Triton 3.6's
aggregates want an __init__ spelled out; the kernel's records have nothing more to say)."""

from triton.experimental import gluon
from triton.language.core import _aggregate as aggregate


def record(cls):
    """cls as an aggregate with __init__(self, *fields) in annotation order (a constexpr
    function: it runs while the kernel is traced)."""
    names = tuple(cls.__annotations__)

    def __init__(self, *values):
        assert len(values) == len(names), f"{cls.__name__} takes {names}"
        for name, value in zip(names, values):
            setattr(self, name, value)
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = gluon.constexpr_function(__init__)
    return aggregate(cls)
