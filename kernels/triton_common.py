"""Small helpers shared by the Triton kernels: tile widths, device facts, dot precision."""
import functools
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pow2(n: int, least: int = 16) -> int:
    """Register tile width for a dimension of n values: a power of two, and at least 16 (tl.dot's minimum)."""
    return max(least, triton.next_power_of_2(max(1, n)))


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; under the interpreter (CPU) a small stand-in so splits stay few."""
    if device.type != "cuda":
        return 4
    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    # float32 operands: full precision (tf32 would lose ~3 digits and break the float32 engine tests on GPU)
    return "ieee" if dtype == torch.float32 else "tf32"
