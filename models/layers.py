"""Small building blocks shared by the attention and MLP code."""
import torch

import kernels
from kernels import WeightFormat

from .config import ModelConfig
from .parallel import Parallel


rms_norm = kernels.rms_norm  # normalised in float32, rounded to x's dtype, times the weight (as DeepSeek does)
linear = kernels.linear  # x @ w.T, float or weight-only quantized weight (which knows its kernel)


def silu_mlp(x: torch.Tensor, w13, w2) -> torch.Tensor:
    """SwiGLU with gate and up fused into one [2I, D] weight (one GEMM instead of two)."""
    return linear(kernels.silu_mul(linear(x, w13)), w2)


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

    def partial(self, x):
        """This rank's share of the output (all of it on one rank)."""
        return silu_mlp(x, self.w13, self.w2)

    def __call__(self, x):
        return self.par.all_reduce(self.partial(x))
