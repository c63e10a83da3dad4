"""Tensor and expert parallelism over torch.distributed (gloo on CPUs, NCCL on GPUs): the share of each weight a
rank holds, and the collectives of a forward pass.

Per rank: the attention heads H / N (q_proj / q_b_proj and kv_b_proj by head, o_proj by its input columns, then an
all-reduce); the latent projection kv_a_proj_with_mqa and the latent cache are per token, not per head, so every rank
holds them whole; E / N whole routed experts (routing computed identically everywhere), the shared experts and dense
MLPs split by their intermediate dimension, one all-reduce per MLP; embedding and LM head split by vocabulary (an
all-reduce after the lookup, an all-gather of the logits)."""
from dataclasses import dataclass

import torch

from .errors import ModelError


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    size: int = 1

    def span(self, n: int, what: str = "") -> tuple[int, int]:
        """This rank's share [start, stop) of n (heads, experts, rows)."""
        if n % self.size:
            raise ModelError(f"{what}={n} cannot be split over {self.size} ranks (tensor_parallel_size)")
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per

    def part(self, target, dim: int, start: int, stop: int, full_shape: tuple):
        """target as the loader's destination for a checkpoint tensor of full_shape of which it holds
        [start, stop) along dim (itself when one rank holds all)."""
        return target if self.size == 1 else Part(target, dim, start, stop, full_shape)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' x [..., n] side by side: [..., N * n]."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, -1)


class Part:
    """A checkpoint tensor of full_shape, of which this rank stores the slice [start, stop) along dim."""

    def __init__(self, target, dim: int, start: int, stop: int, full_shape: tuple):
        self.target, self.dim, self.start, self.stop, self.shape = target, dim, start, stop, tuple(full_shape)

    @property
    def tensors(self) -> tuple:
        t = self.target
        return (t.qweight, t.scales) if hasattr(t, "qweight") else getattr(t, "tensors", (t,))

    def copy_(self, w: torch.Tensor):
        from kernels.weights import QuantWeight, store
        share = w.narrow(self.dim, self.start, self.stop - self.start)
        t = self.target
        if isinstance(t, QuantWeight) and t.mode == "int8" and self.dim == w.dim() - 1:
            t.store(share, row_absmax=w.abs().amax(-1))  # one scale per whole row, as on one rank (int4's groups
            return                                         # of 128 columns never straddle two ranks' shares)
        store(t, share)
