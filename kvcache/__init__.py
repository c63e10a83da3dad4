from .block_manager import BlockManager
from .cache import CACHE_DTYPES, LatentCache

__all__ = ["BlockManager", "LatentCache", "CACHE_DTYPES"]
