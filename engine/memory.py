"""The memory plan of a resolved EngineConfig: the bytes its weights, its workspace and its least KV cache take, and
the cache budget that fits beside them in what the device has available (MemAvailable on the CPU, free memory on
CUDA). EngineConfig.resolve() sets the budget with plan_memory(); `mla plan` (tools/plan.py) counts the same bytes for
a device that is not here."""
import ctypes
import ctypes.util
import os
import sys
from dataclasses import replace

import torch

from models.errors import ModelError

from .config import QUANT_WEIGHT_DTYPES, EngineConfig

CPU_CACHE_GIB = 4.0  # default KV cache budget on the CPU
CUDA_CACHE_FRACTION = 0.85  # default on CUDA: this share of what is free after the weights and workspace
# The default CPU budget shrinks to at most this share of what is left after the weights and workspace: the rest
# stays for what the plan does not count (the process itself, the tokenizer, the allocator's slack, other programs).
CPU_CACHE_SHARE_OF_LEFT = 0.9
# The least default cache holds one sequence of this many tokens (or the whole context, if shorter): below that a
# default budget is refused rather than serving only short prompts. An explicit budget is the user's to size.
LEAST_CACHE_TOKENS = 4096


def plan_memory(c: EngineConfig) -> EngineConfig:
    """c with its cache budget set, after the check that weights, workspace and cache fit in what the device has
    available. The default CPU budget shrinks to what is left, and says so."""
    from models.loader import available_memory
    device = c.torch_device
    free = available_memory(device)
    weights, work, least = weight_bytes(c), workspace_bytes(c), least_cache_bytes(c)
    left = free - weights - work
    gib = c.kv_cache_memory_gib
    if c.kv_cache_tokens is not None:
        gib = cache_bytes(c, c.kv_cache_tokens) / 2**30
    elif gib is None:
        if device.type == "cuda":
            gib = CUDA_CACHE_FRACTION * left / 2**30
        else:
            gib = min(CPU_CACHE_GIB, CPU_CACHE_SHARE_OF_LEFT * left / 2**30)
            if least <= gib * 2**30 < CPU_CACHE_GIB * 2**30 and c.progress:
                print(f"mla: KV cache {gib:.2f} GiB, what is left after the weights (the default is "
                      f"{CPU_CACHE_GIB:g} GiB)", file=sys.stderr)
    explicit = c.kv_cache_memory_gib is not None or c.kv_cache_tokens is not None  # the user's to size
    small = not explicit and gib * 2**30 < least
    if small or weights + work + gib * 2**30 > free:
        raise ModelError(_does_not_fit(c, free, least))
    return replace(c, kv_cache_memory_gib=gib)


def _does_not_fit(c: EngineConfig, free: int, least: int) -> str:
    def need(x: EngineConfig) -> float:
        return (weight_bytes(x) + workspace_bytes(x) + least) / 2**30
    name = os.path.basename(os.path.normpath(c.model))
    msg = (f"{name} needs {need(c):.1f} GiB in {c.dtype}"
           f"{f' with {c.weight_dtype} weights' if c.weight_dtype else ''} (weights, workspace and the "
           f"least KV cache), {free / 2**30:.1f} GiB available on {c.device}")
    others = [f"--weight-dtype {w} needs {need(replace(c, weight_dtype=w)):.1f} GiB" for w in QUANT_WEIGHT_DTYPES
              if w != c.weight_dtype]
    return msg + ("; " + ", ".join(others) if others else "")


def cache_bytes_per_token(c: EngineConfig) -> int:
    """One token's latent in every layer's cache (every rank holds all of it: the latent is per token, not per head)."""
    return c.model_config.num_hidden_layers * c.cache_format.bytes_per_token


def cache_blocks(c: EngineConfig, tokens: int) -> int:
    return -(-tokens // c.block_size)


def cache_bytes(c: EngineConfig, tokens: int) -> int:
    """A cache of this many tokens: whole blocks, and the padding block."""
    return (cache_blocks(c, tokens) + 1) * c.block_size * cache_bytes_per_token(c)


def least_cache_bytes(c: EngineConfig) -> int:
    """The least default cache: one sequence of up to LEAST_CACHE_TOKENS tokens (or the whole context, if shorter)."""
    tokens = -(-min(c.max_model_len, LEAST_CACHE_TOKENS) // c.block_size) * c.block_size + c.block_size  # + pad
    return tokens * cache_bytes_per_token(c)


def weight_bytes(c: EngineConfig) -> int:
    """The model's weights in their stored form, counted on the meta device (nothing allocated)."""
    from models.deepseek import DeepseekModel
    from models.parallel import Parallel
    meta = replace(c.weight_format, device=torch.device("meta"))
    return DeepseekModel(c.model_config, meta, Parallel(0, c.tensor_parallel_size)).nbytes()  # per rank


def workspace_bytes(c: EngineConfig) -> int:
    """A bound on the activations of one forward pass of max_num_batched_tokens tokens: the routed experts'
    gathered rows and their gate/up outputs (k + 1 per token), the hidden state and its residuals, in float32."""
    cfg = c.model_config
    T, k = c.max_num_batched_tokens, max(cfg.num_experts_per_tok, 1)
    inter = max(cfg.intermediate_size, cfg.moe_intermediate_size * k)
    return T * ((k + 4) * cfg.hidden_size + 3 * inter) * 4


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
# glibc's own largest dynamic trim threshold (twice its 32 MiB mmap one): a smaller workspace keeps at least that
LEAST_KEPT = 64 << 20
USER_THRESHOLDS = {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"}


def keep_workspace_on_heap(c: EngineConfig):
    """Have glibc's malloc serve a forward pass's temporaries (up to workspace_bytes) from its heap and keep them
    there once freed. By default it maps any block above its dynamic threshold (at most 32 MiB; one MoE layer's
    products of a 512-token prompt are more) and gives the heap's freed top back to the system, so a prompt faulted
    tens of MB of fresh pages in, layer after layer (bench/results/cpu-kernel-notes.md). What stays is what the plan
    counts as workspace. Called once, after the weights and the cache are allocated (they stay mapped, released
    whole). Thresholds the user set (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES) are left alone,
    as is another C library."""
    libc = _glibc()
    if libc is None or USER_THRESHOLDS & os.environ.keys():
        return
    size = min(max(workspace_bytes(c), LEAST_KEPT), 2**31 - 1)
    libc.mallopt(M_MMAP_THRESHOLD, size)
    libc.mallopt(M_TRIM_THRESHOLD, size)


def trim_heap():
    """Give the heap's free memory back to the system (glibc's malloc_trim): what keep_workspace_on_heap kept from
    the last prompts, once a server has gone idle."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    """The process's C library if it is glibc (the only one whose malloc these settings are for), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version, libc.mallopt, libc.malloc_trim
        return libc
    except (OSError, TypeError, AttributeError):
        return None
