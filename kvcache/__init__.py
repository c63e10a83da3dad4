from .block_manager import BlockManager
from .cache import CACHE_DTYPES, PACKED_CACHE_DTYPES, LatentCache, packed_bytes_per_token

__all__ = ["BlockManager", "LatentCache", "CACHE_DTYPES", "PACKED_CACHE_DTYPES", "packed_bytes_per_token"]
