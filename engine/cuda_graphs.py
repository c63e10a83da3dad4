"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, every bucket captured when the engine
starts (a failure there turns graphs off before the first request, never in the middle of serving).

A decode step (every sequence runs one token on the absorbed path) launches hundreds of small kernels (per layer:
norms, projections, RoPE, cache write, attention, router, experts); at small batches the GPU finishes each before
Python has issued the next. A captured graph replays them all with one launch. What changes between steps lives in
static buffers that the graph reads: token ids, positions, cache slots, block tables, sequence lengths. A batch is
padded up to its bucket; a padding row runs token 0 at position 0 with length 1 in the cache's padding block
(LatentCache.pad_block), so it touches no sequence's cache, and its output is dropped.

Capture needs every shape and every host-computed kernel argument to be fixed per bucket: the block tables are as
wide as max_model_len needs (the decode kernel sizes its KV splits from that width, and each split stops at its
sequence's length), the RoPE tables are reserved for max_model_len up front, and no kernel reads a device value back
on the host (the grouped MoE sizes its grid from a bound, not from the experts' token counts). Should a capture
fail all the same, graphs turn off with a one-line warning and the engine decodes eagerly. What changes between
steps is staged in pinned host buffers, so that its copy to the device is asynchronous."""
import contextlib
import sys

import torch

from models.attention import AttnMetadata, SeqGroup

# Batch sizes that get a graph: a batch runs in the smallest bucket that holds it.
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def use_graphs(config, one_token_expanded: bool) -> bool:
    """Whether decode steps replay graphs: on CUDA with the Triton kernels (which read nothing back on the host, so
    they can be captured), one rank, decode on the absorbed path, unless enforce_eager."""
    return (not config.enforce_eager and config.torch_device.type == "cuda" and config.backend == "triton"
            and config.tensor_parallel_size == 1 and not one_token_expanded)


class DecodeGraphs:
    def __init__(self, model, cache, block_size: int, max_batch: int, max_blocks: int, capture: bool = True):
        """capture=False replays by running the forward pass on the static buffers: the same padding and buffers
        without CUDA, which is how the CPU tests check everything but the capture itself."""
        self.device = dev = model.device
        self.model, self.cache, self.capture = model, cache, capture
        self.pad_block = pad_block = cache.pad_block
        self.block_size = block_size
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        i64, i32 = dict(dtype=torch.int64, device=dev), dict(dtype=torch.int32, device=dev)
        self.tokens = torch.zeros(3, max_batch, **i64)  # input ids, positions, slots
        self.tokens[2].fill_(pad_block * block_size)  # what a capture's warm-up writes goes to the padding block
        self.block_tables = torch.full((max_batch, max_blocks), pad_block, **i32)
        self.seq_lens = torch.ones(max_batch, **i32)
        pin = dev.type == "cuda"
        self.host_tokens = torch.zeros(3, max_batch, dtype=torch.int64, pin_memory=pin)
        self.host_tables = torch.full((max_batch, max_blocks), pad_block, dtype=torch.int32, pin_memory=pin)
        self.host_seq_lens = torch.ones(max_batch, dtype=torch.int32, pin_memory=pin)
        self.cu_seqlens_q = torch.arange(max_batch + 1, **i32)  # one query per sequence, for good
        self.replays = {}  # bucket -> function that runs the step and returns its hidden states [bucket, D]
        # One memory pool for all graphs. A later capture may place its tensors where an earlier graph keeps its
        # intermediates (or output), which is safe because graphs never run at the same time and the engine uses a
        # step's hidden states before the next replay.
        self.pool = None

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def capture_all(self) -> bool:
        """Capture every bucket (on the padding block: no sequence's cache is touched). False, with a one-line
        warning, if any capture fails: the engine then decodes eagerly."""
        stream = torch.cuda.current_stream(self.device) if self.capture else None
        try:
            with self._on_device():
                for bucket in self.buckets:
                    self.replays[bucket] = self._capture(bucket)
        except Exception as e:
            if stream is not None:  # a failed capture can leave its capture stream current
                torch.cuda.set_stream(stream)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"CUDA graphs off, decoding eagerly: capture failed ({reason})", file=sys.stderr)
            return False
        return True

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            seq_lens: list[int]) -> torch.Tensor:
        """Hidden states [B, D] of a decode step of B <= max_batch sequences."""
        B = len(input_ids)
        bucket = next(b for b in self.buckets if b >= B)
        width = max(len(t) for t in tables)
        pad = bucket - B  # padding rows: token 0 at position 0, written into the padding block, length 1
        tokens, host_tables, lens = self.host_tokens[:, :bucket], self.host_tables[:bucket, :width], \
            self.host_seq_lens[:bucket]
        tokens.copy_(torch.tensor([input_ids + [0] * pad, positions + [0] * pad,
                                   slots + [self.pad_block * self.block_size] * pad]))
        host_tables.copy_(torch.tensor([t + [self.pad_block] * (width - len(t)) for t in tables]
                                       + [[self.pad_block] * width] * pad))
        lens.copy_(torch.tensor(seq_lens + [1] * pad))
        self.tokens[:, :bucket].copy_(tokens, non_blocking=True)
        self.block_tables[:bucket, :width].copy_(host_tables, non_blocking=True)
        self.seq_lens[:bucket].copy_(lens, non_blocking=True)
        with self._on_device():
            return self.replays[bucket]()[:B]

    def _on_device(self):
        """Streams, capture and replay belong to the current CUDA device: make it the model's (cuda:1 too)."""
        return torch.cuda.device(self.device) if self.capture else contextlib.nullcontext()

    def _capture(self, bucket: int):
        ids, positions, slots = self.tokens[:, :bucket]
        group = SeqGroup(token_index=None, block_tables=self.block_tables[:bucket],
                         cu_seqlens_q=self.cu_seqlens_q[:bucket + 1], seq_lens=self.seq_lens[:bucket])
        meta = AttnMetadata(positions=positions, slot_mapping=slots, absorbed=group, expanded=None)

        def step():
            return self.model.forward(ids, meta, self.cache)

        if not self.capture:
            return step
        # Warm up outside the capture (Triton compiles its kernels, the allocator settles) on a side stream, as
        # capture wants. It runs this step's real inputs, so its cache writes are the ones the replay repeats.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = step()
        self.pool = graph.pool()

        def replay():
            graph.replay()
            return hidden

        return replay
