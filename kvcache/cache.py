"""The paged latent cache: per layer one tensor [num_blocks, block_size, width] in its CacheFormat (a float dtype:
[c_kv | k_pe] values; int8 / fp8: packed bytes, kernels/cache_format.py). Nothing else is cached: no expanded K or
V, no per-head copies."""
import torch

from kernels.cache_format import CacheFormat


class LatentCache:
    """num_blocks blocks for sequences, plus one more, pad_block, that belongs to none: the padding rows of a
    batch padded to a captured CUDA graph's size write and read their latent there (engine/cuda_graphs.py)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, fmt: CacheFormat, device):
        self.num_blocks, self.block_size, self.format = num_blocks, block_size, fmt
        self.pad_block = num_blocks
        # Unwritten slots are never read (attention stops at each sequence's length), so no zero fill.
        self.layers = [torch.empty(num_blocks + 1, block_size, fmt.width, dtype=fmt.dtype, device=device)
                       for _ in range(num_layers)]

    @classmethod
    def from_budget(cls, budget_bytes: int, max_tokens: int, num_layers: int, block_size: int, fmt: CacheFormat,
                    device):
        """As many blocks as the budget allows, but no more than max_tokens ever need."""
        per_block = num_layers * fmt.bytes_per_token * block_size
        num_blocks = min(budget_bytes // per_block - 1, -(-max_tokens // block_size))  # - 1: the padding block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes holds no block of {per_block} bytes")
        return cls(num_layers, int(num_blocks), block_size, fmt, device)

    @property
    def nbytes(self) -> int:
        """Bytes allocated, the padding block included."""
        return sum(t.numel() * t.element_size() for t in self.layers)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size
