"""Small building blocks shared by the attention and MLP code. `ops` is the run's kernel backend
(kernels/backend.py): every product, norm and attention goes through it."""
import torch

import kernels
from kernels import WeightFormat

from .config import ModelConfig
from .parallel import Parallel


def silu_mlp(x: torch.Tensor, w13, w2, ops) -> torch.Tensor:
    """SwiGLU with gate and up fused into one [2I, D] weight (one GEMM instead of two)."""
    return ops.linear(ops.silu_mul(ops.linear(x, w13)), w2)


def fused_rows(w13, I: int) -> tuple:
    """The gate_proj and up_proj halves of a fused [2I, D] weight (float or quantized), for the loader to fill."""
    if isinstance(w13, kernels.QuantWeight):
        return w13.rows(0, I), w13.rows(I, 2 * I)
    return w13[:I], w13[I:]


class DenseMLP:
    """SwiGLU; over several ranks, each holds a share of the intermediate dimension and the outputs are summed."""

    def __init__(self, cfg: ModelConfig, fmt: WeightFormat, par: Parallel = Parallel(), intermediate: int = 0,
                 what: str = "intermediate_size"):
        self.full = intermediate or cfg.intermediate_size
        self.i0, i1 = par.span(self.full, what)
        I, self.par, self.D = i1 - self.i0, par, cfg.hidden_size
        self.w13 = fmt.linear(2 * I, cfg.hidden_size)  # [gate_proj; up_proj]
        self.w2 = fmt.linear(cfg.hidden_size, I)

    def weights(self):
        I, i0, par = self.w2.shape[1], self.i0, self.par
        gate, up = fused_rows(self.w13, I)
        rows = (self.full, self.D)
        return {"gate_proj.weight": par.part(gate, 0, i0, i0 + I, rows), "up_proj.weight": par.part(up, 0, i0, i0 + I, rows),
                "down_proj.weight": par.part(self.w2, 1, i0, i0 + I, (self.D, self.full))}

    def partial(self, x, ops):
        """This rank's share of the output (all of it on one rank)."""
        return silu_mlp(x, self.w13, self.w2, ops)

    def __call__(self, x, ops):
        return self.par.all_reduce(self.partial(x, ops))
