"""Quantized latent cache formats and their plain-torch references.

A packed cache layer is one uint8 tensor [num_blocks, block_size, bytes_per_token]; per token:
  [latent: kv_lora_rank values, int8 or fp8 e4m3 | scales: num_scales float32 | k_pe: rope_dim in the model dtype]
int8: one scale per token (512 + 4 + 128 = 644 B in bf16); fp8: four scales, one per quarter (128 values) of the
latent (512 + 16 + 128 = 656 B, FlashMLA's layout). k_pe stays unquantized: it carries the position and is small.
The format is recovered from the tensor itself (uint8 = packed) and the widths the call already knows
(kv_lora_rank, rope_dim, the model dtype): the byte count left for scales tells int8 (4) from fp8 (16)."""
from dataclasses import dataclass

import torch

# name -> (latent dtype, scales per token (equal groups of the latent: 128 values each for fp8 at rank 512),
#          largest representable magnitude)
FORMATS = {"int8": (torch.int8, 1, 127.0), "fp8": (torch.float8_e4m3fn, 4, 448.0)}


@dataclass(frozen=True)
class PackedFormat:
    name: str
    kv_lora_rank: int
    rope_dim: int
    rope_dtype: torch.dtype

    @property
    def latent_dtype(self):
        return FORMATS[self.name][0]

    @property
    def num_scales(self) -> int:
        return FORMATS[self.name][1]

    @property
    def qmax(self) -> float:
        return FORMATS[self.name][2]

    @property
    def bytes_per_token(self) -> int:
        return self.kv_lora_rank + 4 * self.num_scales + self.rope_dim * torch.empty(0, dtype=self.rope_dtype).element_size()


def packed_format(name: str, kv_lora_rank: int, rope_dim: int, rope_dtype) -> PackedFormat:
    if name not in FORMATS:
        raise ValueError(f"kv cache format {name!r}: must be one of {', '.join(FORMATS)}")
    fmt = PackedFormat(name, kv_lora_rank, rope_dim, rope_dtype)
    if fmt.kv_lora_rank % fmt.num_scales:
        raise ValueError(f"kv_lora_rank {kv_lora_rank} is not a multiple of the {name} scale group")
    return fmt


def infer_format(kv_cache: torch.Tensor, kv_lora_rank: int, rope_dim: int, rope_dtype) -> PackedFormat | None:
    """None for a float cache; the packed format whose token size matches the uint8 cache's last dimension."""
    if kv_cache.dtype != torch.uint8:
        return None
    for name in FORMATS:
        try:
            fmt = packed_format(name, kv_lora_rank, rope_dim, rope_dtype)
        except ValueError:
            continue
        if fmt.bytes_per_token == kv_cache.shape[-1]:
            return fmt
    raise ValueError(f"kernel argument: a uint8 cache of {kv_cache.shape[-1]} bytes per token matches no packed format "
                     f"for kv_lora_rank {kv_lora_rank}, rope {rope_dim} in {rope_dtype}")


def views(kv_cache: torch.Tensor, fmt: PackedFormat):
    """(latent [..., R] int8/fp8, scales [..., num_scales] float32, k_pe [..., rope] rope dtype): views, no copies."""
    R, ns = fmt.kv_lora_rank, fmt.num_scales
    latent = kv_cache[..., :R].view(fmt.latent_dtype)
    scales = kv_cache[..., R:R + 4 * ns].view(torch.float32)
    k_pe = kv_cache[..., R + 4 * ns:].view(fmt.rope_dtype)
    return latent, scales, k_pe


def quantize(c_kv: torch.Tensor, fmt: PackedFormat):
    """c_kv [T, R] -> (q [T, R] latent dtype, scales [T, num_scales] float32): symmetric, absmax per group."""
    x = c_kv.float().view(c_kv.shape[0], fmt.num_scales, -1)
    scale = x.abs().amax(-1) / fmt.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale, keep it finite
    y = x / scale[..., None]
    if fmt.name == "int8":
        y = torch.floor(y + 0.5).clamp_(-127, 127)  # round half up: what the Triton write does
    return y.to(fmt.latent_dtype).view(c_kv.shape), scale


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """q [..., R], scales [..., num_scales] -> [..., R] in dtype."""
    ns = scales.shape[-1]
    x = q.float().view(*q.shape[:-1], ns, -1) * scales[..., None]
    return x.view(q.shape).to(dtype)


def write_latent(kv_cache, slot_mapping, c_kv, k_pe, fmt: PackedFormat):
    latent, scales, rope = (v.reshape(-1, v.shape[-1]) for v in views(kv_cache, fmt))
    q, s = quantize(c_kv, fmt)
    latent[slot_mapping] = q
    scales[slot_mapping] = s
    rope[slot_mapping] = k_pe.to(rope.dtype)


def unpack(kv_cache, block_tables, seq_lens, fmt: PackedFormat, dtype):
    """The blocks the batch reads, dequantized into a compact float cache [n, block_size, R + rope], and the block
    tables renumbered into it: what the float references run on."""
    BS = kv_cache.shape[1]
    n = (seq_lens.long() + BS - 1) // BS
    valid = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < n[:, None]
    used, inv = torch.unique(block_tables.long()[valid], return_inverse=True)
    latent, scales, rope = views(kv_cache[used], fmt)
    dense = torch.cat((dequantize(latent, scales, dtype), rope.to(dtype)), -1)
    tables = torch.zeros_like(block_tables)
    tables[valid] = inv.to(block_tables.dtype)
    return dense, tables
