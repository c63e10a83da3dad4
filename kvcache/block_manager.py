"""Block bookkeeping for the paged cache: which blocks each sequence owns, how many sequences use each block, and
(prefix caching) which full blocks hold which tokens. No tensors here.

A full block is named by a hash chained over the token ids of every block before it and its own (and a salt: the
cache format, anything else that changes the cached values), as vLLM's automatic prefix caching does. A sequence
that starts with the same tokens takes those blocks by reference instead of computing them. A block whose last
user is gone stays findable in the free queue until its space is needed: blocks are reused least recently freed
first, blocks that hold nothing findable before any that do. A block is written only by the one sequence that owns
it alone: a shared block is full and never rewritten."""
import hashlib
from collections import OrderedDict
from array import array


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False, salt: str = ""):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.salt = salt.encode()
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block holding those tokens
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front: reused first
        self.tables: dict[int, list[int]] = {}
        self.hashes: dict[int, list[bytes]] = {}  # seq_id -> hashes of its leading full blocks, as registered

    # ---- sizes ----------------------------------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks no sequence uses (those that still hold a cached prefix included: they are evictable)."""
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """The share of blocks that running or kept sequences use."""
        return 1 - self.num_free / self.num_blocks

    # ---- prefix caching -------------------------------------------------------------------------------------------
    def _hash(self, parent: bytes, tokens) -> bytes:
        return hashlib.sha256(parent + self.salt + array("q", tokens).tobytes()).digest()

    def match_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        """Give a new sequence the longest run of cached full blocks its tokens start with; returns how many tokens
        they hold. At least one token is left to compute (its logits are needed), and the block it goes into is
        never a shared one, so the run stops at the last full block before the final token."""
        assert seq_id not in self.tables
        table, hashes, parent, bs = [], [], b"", self.block_size
        if self.enable_prefix_caching:
            for i in range((len(token_ids) - 1) // bs):
                h = self._hash(parent, token_ids[i * bs:(i + 1) * bs])
                block = self.cached.get(h)
                if block is None:
                    break
                table.append(block)
                hashes.append(h)
                parent = h
            for block in table:
                self._take(block)
        self.tables[seq_id], self.hashes[seq_id] = table, hashes
        return len(table) * bs

    def register_full_blocks(self, seq_id: int, token_ids: list[int], num_computed: int):
        """Make the sequence's blocks that are now full and computed findable by later sequences."""
        if not self.enable_prefix_caching:
            return
        table, hashes, bs = self.tables[seq_id], self.hashes[seq_id], self.block_size
        for i in range(len(hashes), num_computed // bs):
            h = self._hash(hashes[-1] if hashes else b"", token_ids[i * bs:(i + 1) * bs])
            hashes.append(h)
            block = table[i]
            if h not in self.cached and self.block_hash[block] is None:  # a twin computed first keeps the name
                self.cached[h] = block
                self.block_hash[block] = h

    def _uncache(self, block: int):
        h = self.block_hash[block]
        if h is not None:
            del self.cached[h]
            self.block_hash[block] = None

    # ---- owning blocks --------------------------------------------------------------------------------------------
    def _take(self, block: int):
        if self.ref_count[block] == 0:
            del self.free_blocks[block]
        self.ref_count[block] += 1

    def _release(self, block: int):
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free_blocks[block] = None
            if self.block_hash[block] is None:  # nothing to find in it: reuse it before the cached ones
                self.free_blocks.move_to_end(block, last=False)

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        have = len(self.tables.get(seq_id, ()))
        return self.blocks_for(num_tokens) - have <= self.num_free

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the sequence's table to hold num_tokens tokens, evicting cached blocks no one uses, least recently
        freed first; False (and nothing taken) if there are not enough."""
        table = self.tables.setdefault(seq_id, [])
        self.hashes.setdefault(seq_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            return False
        for _ in range(need):
            block = next(iter(self.free_blocks))
            self._uncache(block)
            self._take(block)
            table.append(block)
        return True

    def free(self, seq_id: int):
        """Release the sequence's blocks; the last blocks of a sequence are evicted before its first ones."""
        for block in reversed(self.tables.pop(seq_id, ())):
            self._release(block)
        self.hashes.pop(seq_id, None)

    def keep_prefix(self, seq_id: int, num_tokens: int) -> int:
        """Shrink a kept sequence's table (a chat session taken over by its next turn) to the blocks of its first
        num_tokens tokens, so that the next turn writes only blocks it owns alone; returns the tokens kept. The
        block the next token goes into is kept only if no one else uses it; its cached name is dropped, since its
        content is about to change."""
        table, bs = self.tables[seq_id], self.block_size
        full = num_tokens // bs
        keep = full + (1 if num_tokens % bs and self.ref_count[table[full]] == 1 else 0)
        for block in reversed(table[keep:]):
            self._release(block)
        del table[keep:]
        if keep > full:
            self._uncache(table[full])
        self.hashes[seq_id] = self.hashes[seq_id][:full]
        return num_tokens if keep > full else full * bs

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Flat cache slots of positions start..end-1: one range per block, so a long prompt costs no per-token
        Python."""
        table, bs, out = self.tables[seq_id], self.block_size, []
        for i in range(start // bs, (end - 1) // bs + 1):
            base = table[i] * bs
            out.extend(range(base + max(start - i * bs, 0), base + min(end - i * bs, bs)))
        return out

    def check(self):
        """Every invariant of the bookkeeping (tests call it after every step)."""
        users = [0] * self.num_blocks
        for table in self.tables.values():
            for block in table:
                users[block] += 1
        assert users == self.ref_count, "reference counts disagree with the tables"
        assert set(self.free_blocks) == {b for b in range(self.num_blocks) if users[b] == 0}, "free list"
        assert all(self.block_hash[b] == h for h, b in self.cached.items()), "cached names"
        assert sum(h is not None for h in self.block_hash) == len(self.cached), "cached names"
