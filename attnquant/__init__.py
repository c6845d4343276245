"""attnquant: flash-attention forward whose output leaves the kernel already quantized.

See SPEC.md (the contract) and README.md.
"""

import os as _os

import torch as _torch

# Without a GPU the kernels can only run in Triton's interpreter, and Triton picks
# interpreter or compiler when a kernel is decorated, i.e. at import: decide here.
if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .api import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, merge_attn_states  # noqa: E402

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "merge_attn_states"]
__version__ = "0.1.0"
