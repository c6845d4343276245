"""attnquant: flash-attention forward whose output leaves the kernel already quantized.

See docs/spec.md (the contract; the authoritative copy is SPEC.md in the shared folder)
and README.md.
"""

import os as _os

import torch as _torch

def _check_interpreter_numpy():
    """Without a GPU the kernels run in Triton's interpreter, which needs numpy < 2.3 (3.6's
    interpreter breaks on later releases): fail at import with one line saying what to
    install, not deep inside a kernel launch."""
    import re

    try:
        import numpy
    except ImportError:
        found = "numpy is not installed"
    else:
        m = re.match(r"(\d+)\.(\d+)", numpy.__version__)
        if m is None or (int(m[1]), int(m[2])) < (2, 3):
            return  # (an unparseable version is let through rather than guessed at)
        found = f"found numpy {numpy.__version__}"
    raise ImportError("attnquant without a GPU runs its kernels in Triton's interpreter, which needs "
                      f"numpy<2.3 ({found}): pip install 'attnquant[interpret]' or 'numpy<2.3'")


# Without a GPU the kernels can only run in Triton's interpreter, and Triton picks
# interpreter or compiler when a kernel is decorated, i.e. at import: decide here.
# With a GPU numpy is not needed, and not imported here.
if not _torch.cuda.is_available():
    _check_interpreter_numpy()
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .api import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, merge_attn_states  # noqa: E402
from .quant import hadamard_rotation, quantize_kv_fp8, quantize_qkv_fp8  # noqa: E402
from .replay import CallPlan, plan  # noqa: E402  (plan once, run per layer)
from . import blocks  # noqa: E402  (the attention block: attention -> FP8 o_proj GEMM)
from .blocks import quantize_weight_fp8  # noqa: E402

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "merge_attn_states", "plan",
           "CallPlan", "quantize_kv_fp8", "quantize_qkv_fp8", "hadamard_rotation", "quantize_weight_fp8", "blocks"]
__version__ = "0.1.0"
