from kernels.cache_format import CacheFormat

from .block_manager import BlockManager
from .cache import LatentCache

__all__ = ["BlockManager", "LatentCache", "CacheFormat"]
