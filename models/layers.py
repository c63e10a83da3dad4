"""Small building blocks shared by the attention and MLP code."""
import torch
import torch.nn.functional as F

import kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and cast back before the weight, exactly as DeepSeek's RMSNorm does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


linear = kernels.linear  # x @ w.T, float or weight-only quantized weight


def silu_mlp(x: torch.Tensor, w13, w2, backend: str = "torch") -> torch.Tensor:
    """SwiGLU with gate and up fused into one [2I, D] weight (one GEMM instead of two)."""
    gate, up = linear(x, w13, backend).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w2, backend)
