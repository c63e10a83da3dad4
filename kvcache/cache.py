"""The paged latent cache: per layer one tensor [num_blocks, block_size, kv_lora_rank + rope_dim]. Nothing else
is cached: no expanded K or V, no per-head copies."""
import torch

CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Packed formats: per token kv_lora_rank quantized latent bytes, float32 scales, then k_pe in the model dtype, stored
# as uint8 rows (kernels/quant.py holds the layout and tells the format from the row width).
PACKED_CACHE_DTYPES = {"int8": 1, "fp8": 4}  # name -> float32 scales per token


def packed_bytes_per_token(name: str, kv_lora_rank: int, rope_dim: int, model_dtype: torch.dtype) -> int:
    """int8: 512 + 4 + 128 = 644 B, fp8: 512 + 16 + 128 = 656 B per token per layer for DeepSeek in bf16."""
    return kv_lora_rank + 4 * PACKED_CACHE_DTYPES[name] + rope_dim * torch.empty(0, dtype=model_dtype).element_size()


class LatentCache:
    """num_blocks blocks for sequences, plus one more, pad_block, that belongs to none: the padding rows of a
    batch padded to a captured CUDA graph's size write and read their latent there (engine/cuda_graphs.py)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, width: int, dtype: torch.dtype, device):
        self.num_blocks, self.block_size, self.width, self.dtype = num_blocks, block_size, width, dtype
        self.pad_block = num_blocks
        # Unwritten slots are never read (attention stops at each sequence's length), so no zero fill.
        self.layers = [torch.empty(num_blocks + 1, block_size, width, dtype=dtype, device=device)
                       for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, width: int, dtype: torch.dtype) -> int:
        return num_layers * width * torch.empty(0, dtype=dtype).element_size()

    @classmethod
    def from_budget(cls, budget_bytes: int, max_tokens: int, num_layers: int, block_size: int, width: int, dtype, device):
        """As many blocks as the budget allows, but no more than max_tokens ever need."""
        per_block = cls.bytes_per_token(num_layers, width, dtype) * block_size
        num_blocks = min(budget_bytes // per_block - 1, -(-max_tokens // block_size))  # - 1: the padding block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes holds no block of {per_block} bytes")
        return cls(num_layers, int(num_blocks), block_size, width, dtype, device)

    @property
    def nbytes(self) -> int:
        """Bytes allocated, the padding block included."""
        return sum(t.numel() * t.element_size() for t in self.layers)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size
