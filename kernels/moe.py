"""Routed experts of a DeepSeek MoE layer: every (token, expert) pair of the router's top-k, as one function.

    moe_experts(x, topk_ids, topk_weights, w13, w2) -> [T, D]
    out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(gate) * up),  gate, up = split(w13[e] @ x[t]),  e = topk_ids[t, j]

Shapes: x [T, D]; topk_ids [T, k] int64; topk_weights [T, k] float32; w13 [E, 2I, D] (per expert the gate_proj
rows, then the up_proj rows); w2 [E, D, I] (per expert down_proj).

The torch reference (also the CPU path) sorts the pairs by expert and runs one GEMM pair per expert that has tokens;
the Triton path (kernels/triton_moe.py) runs all experts of the layer in one grouped GEMM launch per projection.
The router and the shared experts stay in the model."""
import torch
import torch.nn.functional as F

from .linear import linear
from .weight_quant import QuantWeight

BACKENDS = ("torch", "triton")


def _check(cond, msg):
    if not cond:
        raise ValueError(f"kernel argument: {msg}")


def moe_experts_reference(x, topk_ids, topk_weights, w13, w2):
    """w13 / w2: stacked float tensors, or lists of per-expert QuantWeight (weight-only quantized experts)."""
    T, k = topk_ids.shape
    E = len(w13)
    # Group the (token, expert) pairs by expert: one GEMM pair per expert that has tokens, no loop over tokens.
    flat = topk_ids.flatten()  # [T * k], pair p = t * k + j
    order = flat.argsort(stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=E).tolist()
    xs = x[token]  # [T * k, D], sorted by expert
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            gate, up = linear(xs[start:start + n], w13[e]).chunk(2, dim=-1)  # [n, I] each
            ys[start:start + n] = linear(F.silu(gate) * up, w2[e])
            start += n
    # Undo the sort (each token owns exactly k rows) and take the router-weighted sum per token.
    unsorted = torch.empty_like(ys)
    unsorted[order] = ys
    return torch.bmm(topk_weights.to(ys.dtype).unsqueeze(1), unsorted.view(T, k, -1)).squeeze(1)  # [T, D]


def moe_experts(x, topk_ids, topk_weights, w13, w2, backend="torch"):
    """Weighted sum of each token's k routed experts (SwiGLU), [T, D] in x.dtype."""
    _check(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    _check(x.dim() == 2, f"x must be [T, D], got {tuple(x.shape)}")
    T, D = x.shape
    if isinstance(w13, list):  # quantized experts: per-expert quantized GEMMs
        _check(all(isinstance(w, QuantWeight) for w in w13 + w2) and len(w13) == len(w2), "w13/w2: QuantWeight lists")
        return moe_experts_reference(x, topk_ids, topk_weights, w13, w2)
    _check(topk_ids.dim() == 2 and topk_ids.shape[0] == T and topk_ids.dtype == torch.int64,
           f"topk_ids must be int64 [T={T}, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    _check(tuple(topk_weights.shape) == tuple(topk_ids.shape) and topk_weights.dtype == torch.float32,
           f"topk_weights must be float32 {tuple(topk_ids.shape)}, got {topk_weights.dtype} {tuple(topk_weights.shape)}")
    _check(w13.dim() == 3 and w13.shape[2] == D and w13.shape[1] % 2 == 0,
           f"w13 must be [E, 2I, D={D}], got {tuple(w13.shape)}")
    E, I = w13.shape[0], w13.shape[1] // 2
    _check(tuple(w2.shape) == (E, D, I), f"w2 must be [E={E}, D={D}, I={I}], got {tuple(w2.shape)}")
    _check(x.dtype == w13.dtype == w2.dtype, f"x, w13, w2 must share a dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    dev = x.device
    _check(all(t.device == dev for t in (topk_ids, topk_weights, w13, w2)), "all tensors must be on one device")
    if backend == "triton":
        _check(all(t.stride(-1) == 1 for t in (x, w13, w2)), "x, w13, w2 must be contiguous in their last dimension")
        from . import triton_moe
        return triton_moe.moe_experts(x, topk_ids, topk_weights, w13, w2)
    return moe_experts_reference(x, topk_ids, topk_weights, w13, w2)
