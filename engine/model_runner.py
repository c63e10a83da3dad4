"""Turns a scheduled step into tensors (in this one place), runs the model, returns the hidden states."""
import torch

from kvcache import BlockManager, LatentCache
from models.attention import AttnMetadata, SeqGroup
from models.deepseek import DeepseekModel

from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: DeepseekModel, cache: LatentCache, blocks: BlockManager, config: EngineConfig):
        self.model, self.cache, self.blocks = model, cache, blocks
        self.attn_mode, self.mla_threshold = config.attn_mode, config.mla_threshold
        self.device = model.device
        model.rope.reserve(config.max_model_len)  # once, so no forward pass grows (moves) the tables
        self.graphs = None
        # decode steps replay CUDA graphs unless enforce_eager; capturable: the Triton kernels read nothing back
        if (not config.enforce_eager and self.device.type == "cuda" and config.backend == "triton"
                and not self.uses_expanded(1) and config.tensor_parallel_size == 1):
            self.graphs = DecodeGraphs(model, cache, blocks.block_size, config.max_num_seqs,
                                       blocks.blocks_for(config.max_model_len))

    def uses_expanded(self, num_query_tokens: int) -> bool:
        """Expanded attention pays for decompressing the cache once; it wins when many queries share it."""
        if self.attn_mode == "auto":
            return num_query_tokens >= self.mla_threshold
        return self.attn_mode == "expanded"

    def _tensor(self, data, dtype):
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    def _group(self, entries: list[tuple[Sequence, int, int]], num_rows: int) -> SeqGroup | None:
        if not entries:
            return None
        tables = [self.blocks.tables[seq.seq_id] for seq, _, _ in entries]
        width = max(len(t) for t in tables)
        cu = [0]
        rows = []
        for seq, n, row in entries:
            cu.append(cu[-1] + n)
            rows.extend(range(row, row + n))
        in_order = rows == list(range(num_rows))
        return SeqGroup(
            token_index=None if in_order else self._tensor(rows, torch.int64),
            block_tables=self._tensor([t + [0] * (width - len(t)) for t in tables], torch.int32),
            cu_seqlens_q=self._tensor(cu, torch.int32),
            seq_lens=self._tensor([seq.num_cached_tokens + n for seq, n, _ in entries], torch.int32),
            max_q_len=max(n for _, n, _ in entries),
        )

    def forward(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Runs the uncached tokens of each scheduled sequence; returns hidden states [T, D] in batch order."""
        input_ids, positions, slots = [], [], []
        absorbed, expanded = [], []
        for seq, n in batch:
            start = seq.num_cached_tokens
            (expanded if self.uses_expanded(n) else absorbed).append((seq, n, len(input_ids)))
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(self.blocks.slots(seq.seq_id, start, start + n))
        T = len(input_ids)
        if self.graphs is not None and self.graphs.enabled and 0 < T == len(absorbed) <= self.graphs.max_batch:
            hidden = self.graphs.run(input_ids, positions, slots, [self.blocks.tables[s.seq_id] for s, _ in batch],
                                     [p + 1 for p in positions])
            if hidden is not None:
                return hidden
        meta = AttnMetadata(positions=self._tensor(positions, torch.int64),
                            slot_mapping=self._tensor(slots, torch.int64),
                            absorbed=self._group(absorbed, T), expanded=self._group(expanded, T))
        return self.model.forward(self._tensor(input_ids, torch.int64), meta, self.cache)
