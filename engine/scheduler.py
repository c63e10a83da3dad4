"""Which sequences run in the next forward pass and how many of their tokens. Bookkeeping only."""
from collections import deque

from kvcache import BlockManager

from .sequence import Sequence


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # stays 0 while admission reserves a request's whole max_len (nothing is preempted)

    def check(self, seq: Sequence):
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if seq.max_len > capacity:
            raise ValueError(f"request needs {seq.max_len} tokens of KV cache but the cache holds {capacity}; "
                             "lower max_tokens or raise the KV cache memory")

    def add(self, seq: Sequence):
        self.check(seq)
        self.waiting.append(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, number of its uncached tokens to run)]: decodes first, then prompt chunks under the budget.
        A sequence is admitted only when the blocks for its whole max_len can be reserved, so decoding never
        runs out of cache and nothing is ever preempted."""
        budget = self.max_num_batched_tokens
        batch = []
        for seq in sorted(self.running, key=lambda s: s.in_prefill):  # decodes (1 token) before prompt chunks
            n = min(len(seq) - seq.num_cached_tokens, budget)
            if n > 0:
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq.seq_id, seq.max_len):
                break
            self.blocks.allocate(seq.seq_id, seq.max_len)
            self.running.append(self.waiting.popleft())
            n = min(len(seq) - seq.num_cached_tokens, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def finish(self, seq: Sequence):
        """A running sequence is done."""
        self.running.remove(seq)
        self._release(seq)

    def abort(self, seq: Sequence):
        """Drop a sequence wherever it is, waiting or running."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence):
        if not seq.keep_cache:
            self.blocks.free(seq.seq_id)
