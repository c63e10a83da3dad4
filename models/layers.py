"""Small building blocks shared by the attention and MLP code."""
import torch
import torch.nn.functional as F

import kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and cast back before the weight, exactly as DeepSeek's RMSNorm does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


linear = kernels.linear  # x @ w.T, float or weight-only quantized weight (which knows its kernel)


def silu_mlp(x: torch.Tensor, w13, w2) -> torch.Tensor:
    """SwiGLU with gate and up fused into one [2I, D] weight (one GEMM instead of two)."""
    gate, up = linear(x, w13).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w2)


def fused_rows(w13, I: int) -> tuple:
    """The gate_proj and up_proj halves of a fused [2I, D] weight (float or quantized), for the loader to fill."""
    if isinstance(w13, kernels.QuantWeight):
        return w13.rows(0, I), w13.rows(I, 2 * I)
    return w13[:I], w13[I:]
