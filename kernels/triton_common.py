"""Small helpers shared by the Triton kernels: tile widths, the target the launchers configure for, dot precision."""
import contextlib
import functools
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Target:
    """What a launcher sizes its tiles and grid for: a GPU with num_sms SMs, or Triton's interpreter on the CPU
    (gpu False: small tiles, few programs)."""
    gpu: bool
    num_sms: int


_COMPILE_FOR: list[Target] = []  # set by compiling_for: the launchers configure for a GPU that is not here


def target(device: torch.device) -> Target:
    if _COMPILE_FOR:
        return _COMPILE_FOR[-1]
    if device.type == "cuda":
        return Target(True, sm_count(device.index if device.index is not None else torch.cuda.current_device()))
    return Target(False, 4)


@contextlib.contextmanager
def compiling_for(t: Target):
    """Launchers called inside choose what they would on a GPU of t's kind (tools/gpu_check.py compiles that)."""
    _COMPILE_FOR.append(t)
    try:
        yield
    finally:
        _COMPILE_FOR.pop()


def pow2(n: int, least: int = 16) -> int:
    """Register tile width for a dimension of n values: a power of two, and at least 16 (tl.dot's minimum)."""
    return max(least, triton.next_power_of_2(max(1, n)))


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    # float32 operands: full precision (tf32 would lose ~3 digits and break the float32 engine tests on GPU)
    return "ieee" if dtype == torch.float32 else "tf32"
