"""One rank of an engine: build_rank assembles it (kernel backend, model, latent cache, runner), and the ModelRunner
turns a scheduled step into tensors (in this one place), runs the model, and returns the hidden states."""
import dataclasses
import os

import torch

from kernels import FEW_ROWS, make_backend
from kvcache import BlockManager, LatentCache
from models.attention import AttnMetadata, SeqGroup
from models.deepseek import DeepseekModel
from models.loader import load_model
from models.parallel import Parallel

from . import memory
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs, use_graphs
from .sequence import Sequence


def build_rank(config: EngineConfig, par: Parallel = Parallel(), device: torch.device | None = None, wrap=None):
    """(model, cache, runner) of one rank: its kernel backend chosen once (kernels.make_backend, which builds the
    C++ CPU kernels the first time), its share of the weights loaded, its latent cache allocated. device: this
    rank's (default: the config's); wrap(model): what rank 0 runs instead (engine/parallel.py announces each call)."""
    device = device or config.torch_device
    if device.type == "cpu" and (config.threads or par.size > 1):  # else torch's default: every core
        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // par.size))
    ops = make_backend(config.backend, device, config.torch_dtype, config.cache_format,
                       narrow_weights=config.weight_dtype is not None, int8_prefill=config.prefill_gemm == "int8")
    fmt = dataclasses.replace(config.weight_format, device=device)
    model = load_model(config.model, fmt, config.model_config, config.progress and par.rank == 0,
                       dummy=config.load_format == "dummy", par=par, ops=ops)
    layers = config.model_config.num_hidden_layers
    if config.kv_cache_tokens is not None:
        cache = LatentCache(layers, memory.cache_blocks(config, config.kv_cache_tokens), config.block_size,
                            config.cache_format, device)
    else:
        cache = LatentCache.from_budget(int(config.kv_cache_memory_gib * 2**30),
                                        config.max_num_seqs * config.max_model_len, layers, config.block_size,
                                        config.cache_format, device)
    if device.type == "cpu":
        memory.keep_workspace_on_heap(config)
    runner = ModelRunner(wrap(model) if wrap else model, cache, config)
    return model, cache, runner


class ModelRunner:
    def __init__(self, model: DeepseekModel, cache: LatentCache, config: EngineConfig):
        self.model, self.cache = model, cache
        fmt = config.cache_format  # what else changes the cached values, beside the tokens
        self.blocks = BlockManager(cache.num_blocks, config.block_size, config.enable_prefix_caching,
                                   salt=f"{fmt.name}/{fmt.model_dtype}")
        self.attn_mode, self.mla_threshold = config.attn_mode, config.mla_threshold
        self.device = model.device
        self.pin = self.device.type == "cuda"  # host data staged in pinned memory: an unpinned copy is synchronous
        model.rope.reserve(config.max_model_len)  # once, so no forward pass grows (moves) the tables
        # The layers of a decode step, picked once: the backend's fused decoder layer where it has one (the C++
        # layer on the CPU), else the Python layers.
        self.decode_layers = model.fused_decode_layers()
        self.graphs = None
        if use_graphs(config, self.uses_expanded(1)):  # every batch-size bucket captured now, not while serving
            self.graphs = DecodeGraphs(model, cache, config.block_size, config.max_num_seqs,
                                       self.blocks.blocks_for(config.max_model_len))
            if not self.graphs.capture_all():
                self.graphs = None

    def uses_expanded(self, num_query_tokens: int) -> bool:
        """Expanded attention pays for decompressing the cache once; it wins when many queries share it."""
        if self.attn_mode == "auto":
            return num_query_tokens >= self.mla_threshold
        return self.attn_mode == "expanded"

    def _tensor(self, data, dtype):
        return torch.tensor(data, dtype=dtype, pin_memory=self.pin).to(self.device, non_blocking=True)

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
        if self.graphs is not None and 0 < T == len(absorbed) <= self.graphs.max_batch:  # one token per sequence
            return self.graphs.run(input_ids, positions, slots, [self.blocks.tables[s.seq_id] for s, _ in batch],
                                   [p + 1 for p in positions])
        meta = AttnMetadata(positions=self._tensor(positions, torch.int64),
                            slot_mapping=self._tensor(slots, torch.int64),
                            absorbed=self._group(absorbed, T), expanded=self._group(expanded, T))
        decode = bool(absorbed) and not expanded and T <= FEW_ROWS and meta.absorbed.max_q_len <= FEW_ROWS
        layers = self.decode_layers if decode else None
        return self.model.forward(self._tensor(input_ids, torch.int64), meta, self.cache, layers)
