"""Small building blocks shared by the attention and MLP code."""
import torch

import kernels


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
