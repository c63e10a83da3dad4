"""Which sequences run in the next forward pass and how many of their tokens. Bookkeeping only.

A request starts as soon as its next prompt chunk fits (after the leading blocks the prefix cache already holds);
blocks are taken as a sequence grows. When a running sequence needs a block and none is free, the most recently
admitted running sequence is preempted: its blocks are released and it goes back to the front of the queue, to be
recomputed later (its prompt and what it has generated so far; the prefix cache makes that mostly free)."""
from collections import deque

from kvcache import BlockManager

from .sequence import Sequence


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in the order they were admitted
        self.num_preemptions = 0
        self.prefix_queried_tokens = self.prefix_hit_tokens = 0  # prompt tokens looked up / found cached

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
        """[(sequence, number of its uncached tokens to run)]: decodes first, then prompt chunks under the budget."""
        batch: list[tuple[Sequence, int]] = []
        for seq in sorted(self.running, key=lambda s: s.in_prefill):  # decodes (1 token) before prompt chunks
            budget = self.max_num_batched_tokens - sum(n for _, n in batch)
            n = min(len(seq) - seq.num_cached_tokens, budget)
            if seq in self.running and n > 0 and self._grow(seq, n, batch):
                batch.append((seq, n))
        budget = self.max_num_batched_tokens - sum(n for _, n in batch)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            looked_up = seq.seq_id not in self.blocks.tables  # new or preempted (a chat turn brings its blocks)
            if looked_up:
                seq.num_cached_tokens = self._cached_prefix(seq)
            n = min(len(seq) - seq.num_cached_tokens, budget)
            if not self.blocks.allocate(seq.seq_id, seq.num_cached_tokens + n):
                if looked_up:  # waiting holds no blocks: the next try looks the prefix up again
                    self.blocks.free(seq.seq_id)
                    seq.num_cached_tokens = 0
                break
            if looked_up:
                self.prefix_queried_tokens += len(seq)
                self.prefix_hit_tokens += seq.num_cached_tokens
            if seq.num_prefix_cached is None:
                seq.num_prefix_cached = seq.num_cached_tokens
            self.running.append(self.waiting.popleft())
            batch.append((seq, n))
            budget -= n
        return batch

    def _cached_prefix(self, seq: Sequence) -> int:
        """Tokens of seq the prefix cache holds (its blocks now shared); 0 for a request that needs the logits of
        its whole prompt (prompt logprobs), which computes it all, as vLLM does."""
        whole = seq.params.prompt_logprobs is not None or seq.prompt_logits is not None
        return self.blocks.match_prefix(seq.seq_id, [] if whole else seq.token_ids)

    def _grow(self, seq: Sequence, n: int, batch: list) -> bool:
        """Blocks for n more tokens of a running sequence, preempting the most recently admitted ones until they fit;
        False if seq itself had to go."""
        while not self.blocks.allocate(seq.seq_id, seq.num_cached_tokens + n):
            victim = self.running[-1]
            self.preempt(victim)
            batch[:] = [(s, k) for s, k in batch if s is not victim]
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence):
        """Release a running sequence's blocks and queue it first, to be recomputed."""
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_cached_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def computed(self, batch: list[tuple[Sequence, int]]):
        """A step ran: its tokens are cached now, and the blocks they filled can be found by later requests."""
        for seq, n in batch:
            seq.num_cached_tokens += n
            self.blocks.register_full_blocks(seq.seq_id, seq.token_ids, seq.num_cached_tokens)

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
