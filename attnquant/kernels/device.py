"""Device properties the launchers read on every call, each looked up once per device (plain
dicts: torch.compile traces a dict lookup, while it warns about an lru_cache)."""

from contextlib import nullcontext

import torch

_NUM_SMS = {}
_SM90 = {}


def num_sms(device_index: int) -> int:
    """The device's multiprocessor count."""
    if device_index not in _NUM_SMS:
        _NUM_SMS[device_index] = torch.cuda.get_device_properties(device_index).multi_processor_count
    return _NUM_SMS[device_index]


def is_sm90(device_index: int) -> bool:
    """A Hopper GPU (compute capability 9.0): the Gluon kernel's wgmma / TMA / setmaxnreg."""
    if device_index not in _SM90:
        _SM90[device_index] = torch.cuda.get_device_capability(device_index) == (9, 0)
    return _SM90[device_index]


def on_device(device: torch.device):
    """A context that makes `device` current for a launch: none when it already is (entering
    torch.cuda.device costs host time on every call) or when it is the CPU (the interpreter)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return nullcontext()
    return torch.cuda.device(device)
