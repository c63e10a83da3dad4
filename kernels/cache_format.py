"""The latent cache's formats: what one token's row holds, and the plain-torch quantize / dequantize of the packed
ones. One CacheFormat belongs to the cache (kvcache.LatentCache) and is passed to every kernel that writes or reads
it, so no kernel has to work the format out again from a tensor.

Float formats (bfloat16, float16, float32): a row is [c_kv: kv_lora_rank | k_pe: rope_dim] in that dtype.
Packed formats, stored as uint8 rows of bytes_per_token:
  [latent: kv_lora_rank values, int8 or fp8 e4m3 | scales: num_scales float32 | k_pe: rope_dim in the model dtype]
int8: one scale per token (512 + 4 + 128 = 644 B in bf16); fp8: four scales, one per quarter of the latent (128
values at kv_lora_rank 512: 512 + 16 + 128 = 656 B, FlashMLA's layout; 12 values at kv_lora_rank 48). k_pe stays
unquantized: it carries the position and is small."""
from dataclasses import dataclass

import torch

FLOAT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# name -> (latent dtype, scales per token (equal groups of the latent), largest representable magnitude)
PACKED = {"int8": (torch.int8, 1, 127.0), "fp8": (torch.float8_e4m3fn, 4, 448.0)}
NAMES = tuple(FLOAT) + tuple(PACKED)


@dataclass(frozen=True)
class CacheFormat:
    name: str  # one of NAMES
    kv_lora_rank: int
    rope_dim: int
    model_dtype: torch.dtype  # k_pe's dtype in a packed row

    def __post_init__(self):
        if self.name not in NAMES:
            raise ValueError(f"kv cache format {self.name!r}: must be one of {', '.join(NAMES)}")
        if self.packed and self.kv_lora_rank % self.num_scales:
            raise ValueError(f"kv_lora_rank {self.kv_lora_rank} is not a multiple of the {self.name} scale group")
        if self.packed and self.kv_lora_rank % 4:  # the float32 scales follow the latent's bytes
            raise ValueError(f"kv cache {self.name}: kv_lora_rank {self.kv_lora_rank} is not a multiple of 4")

    @property
    def packed(self) -> bool:
        return self.name in PACKED

    @property
    def dtype(self) -> torch.dtype:
        """The cache tensor's dtype."""
        return torch.uint8 if self.packed else FLOAT[self.name]

    @property
    def width(self) -> int:
        """The cache tensor's last dimension: values per token, or bytes per token when packed."""
        if self.packed:
            return self.kv_lora_rank + 4 * self.num_scales + self.rope_dim * self.model_dtype.itemsize
        return self.kv_lora_rank + self.rope_dim

    @property
    def bytes_per_token(self) -> int:
        """Per layer."""
        return self.width * self.dtype.itemsize

    @property
    def latent_dtype(self) -> torch.dtype:
        return PACKED[self.name][0] if self.packed else self.dtype

    @property
    def num_scales(self) -> int:
        return PACKED[self.name][1] if self.packed else 0

    @property
    def qmax(self) -> float:
        return PACKED[self.name][2] if self.packed else 1.0

    def check(self, kv_cache: torch.Tensor, kv_lora_rank: int, rope_dim: int):
        """A kernel's argument check: the cache tensor and the call's widths are this format's."""
        if kv_cache.dtype != self.dtype or kv_cache.shape[-1] != self.width:
            raise ValueError(f"kernel argument: a {self.name} cache must be {self.dtype} [..., {self.width}], got "
                             f"{kv_cache.dtype} [..., {kv_cache.shape[-1]}]")
        if (kv_lora_rank, rope_dim) != (self.kv_lora_rank, self.rope_dim):
            raise ValueError(f"kernel argument: latent {kv_lora_rank} + rope {rope_dim} do not match the cache format's "
                             f"{self.kv_lora_rank} + {self.rope_dim}")

    def views(self, kv_cache: torch.Tensor):
        """(latent [..., R], scales [..., num_scales] float32 or None, k_pe [..., rope]): views, no copies."""
        R = self.kv_lora_rank
        if not self.packed:
            return kv_cache[..., :R], None, kv_cache[..., R:]
        ns = self.num_scales
        return (kv_cache[..., :R].view(self.latent_dtype), kv_cache[..., R:R + 4 * ns].view(torch.float32),
                kv_cache[..., R + 4 * ns:].view(self.model_dtype))


def float_format(kv_cache: torch.Tensor, kv_lora_rank: int, rope_dim: int) -> CacheFormat:
    """The format of a plain float cache tensor (what a kernel assumes when it is given none)."""
    name = str(kv_cache.dtype).removeprefix("torch.")
    if name not in FLOAT:
        raise ValueError(f"kernel argument: a {kv_cache.dtype} cache needs its CacheFormat (packed caches are uint8)")
    return CacheFormat(name, kv_lora_rank, rope_dim, kv_cache.dtype)


def quantize(c_kv: torch.Tensor, fmt: CacheFormat):
    """c_kv [T, R] -> (q [T, R] latent dtype, scales [T, num_scales] float32): symmetric, absmax per group."""
    x = c_kv.float().view(c_kv.shape[0], fmt.num_scales, -1)
    scale = x.abs().amax(-1) / fmt.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale, keep it finite
    y = x / scale[..., None]
    if fmt.name == "int8":
        y = torch.floor(y + 0.5).clamp_(-127, 127)  # round half up: what the Triton write does
    # fp8: torch's conversion rounds to nearest, ties to even, and keeps the sign of zero; the Triton write
    # (kernels/cache_write.py) stores the same bytes
    return y.to(fmt.latent_dtype).view(c_kv.shape), scale


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """q [..., R], scales [..., num_scales] -> [..., R] in dtype."""
    ns = scales.shape[-1]
    x = q.float().view(*q.shape[:-1], ns, -1) * scales[..., None]
    return x.view(q.shape).to(dtype)


def write_latent(kv_cache, slot_mapping, c_kv, k_pe, fmt: CacheFormat):
    """The packed cache write (torch): quantize the new tokens' latent into their slots."""
    latent, scales, rope = (v.reshape(-1, v.shape[-1]) for v in fmt.views(kv_cache))
    q, s = quantize(c_kv, fmt)
    latent[slot_mapping] = q
    scales[slot_mapping] = s
    rope[slot_mapping] = k_pe.to(rope.dtype)


def unpack(kv_cache, block_tables, seq_lens, fmt: CacheFormat, dtype):
    """The blocks the batch reads, dequantized into a compact float cache [n, block_size, R + rope], and the block
    tables renumbered into it: what the float references run on."""
    BS = kv_cache.shape[1]
    n = (seq_lens.long() + BS - 1) // BS
    valid = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < n[:, None]
    used, inv = torch.unique(block_tables.long()[valid], return_inverse=True)
    latent, scales, rope = fmt.views(kv_cache[used])
    dense = torch.cat((dequantize(latent, scales, dtype), rope.to(dtype)), -1)
    tables = torch.zeros_like(block_tables)
    tables[valid] = inv.to(block_tables.dtype)
    return dense, tables
