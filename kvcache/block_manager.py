"""Block bookkeeping for the paged cache: which blocks each sequence owns. No tensors here."""
from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_blocks = deque(range(num_blocks))
        self.tables: dict[int, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        have = len(self.tables.get(seq_id, ()))
        return self.blocks_for(num_tokens) - have <= len(self.free_blocks)

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow the sequence's table to hold num_tokens tokens."""
        table = self.tables.setdefault(seq_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self.free_blocks):
            raise RuntimeError(f"KV cache full: sequence {seq_id} needs {need} more blocks, {len(self.free_blocks)} free")
        table.extend(self.free_blocks.popleft() for _ in range(max(0, need)))
        return table

    def free(self, seq_id: int):
        self.free_blocks.extend(self.tables.pop(seq_id, ()))

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Flat cache slots of positions start..end-1: one range per block, so a long prompt costs no per-token
        Python."""
        table, bs, out = self.tables[seq_id], self.block_size, []
        for i in range(start // bs, (end - 1) // bs + 1):
            base = table[i] * bs
            out.extend(range(base + max(start - i * bs, 0), base + min(end - i * bs, bs)))
        return out
