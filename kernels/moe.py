"""Routed experts of a DeepSeek MoE layer: every (token, expert) pair of the router's top-k, as one function.

    moe_experts(x, topk_ids, topk_weights, w13, w2, shared=None) -> [T, D]
    out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(gate) * up),  gate, up = split(w13[e] @ x[t]),  e = topk_ids[t, j]
             (+ the shared experts' SwiGLU of x[t] when shared = (w13 [2Is, D], w2 [D, Is]) is given)

Shapes: x [T, D]; topk_ids [T, k] int64; topk_weights [T, k] float32; w13 [E, 2I, D] (per expert the gate_proj
rows, then the up_proj rows); w2 [E, D, I] (per expert down_proj); or both weight-only int8 / int4 quantized
(a stacked kernels.QuantWeight, the same shapes per expert).

The torch reference (also the CPU prompt path) sorts the pairs by expert and runs one GEMM pair per expert that has
tokens; the Triton path (kernels/triton_moe.py) runs all experts of the layer in one grouped GEMM launch per
projection; a CPU decode step runs the whole layer, shared experts included, in one C++ call (kernels/cpu.py).
Which one runs is the backend's (kernels/backend.py). Router: DeepSeek's gate settings, as the model resolves them."""
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F

from .weights import QuantWeight


@dataclass(frozen=True)
class Router:
    """How a MoE layer picks its experts (kernels/reference.py route)."""
    top_k: int
    scoring: str  # reference.SCORING_FUNCS
    method: str  # reference.TOPK_METHODS
    n_group: int
    topk_group: int
    norm: bool  # normalise the top-k weights to sum to 1
    scale: float  # routed_scaling_factor, as the model applies it

    def args(self) -> tuple:
        """The settings in reference.route's order."""
        return astuple(self)


def _check(cond, msg):
    if not cond:
        raise ValueError(f"kernel argument: {msg}")


def _by_expert(x, topk_ids, E):
    """The (token, expert) pairs grouped by expert: the token rows in that order [T * k, D], the sort order, and the
    number of pairs per expert [E]."""
    k = topk_ids.shape[1]
    flat = topk_ids.flatten()  # [T * k], pair p = t * k + j
    order = flat.argsort(stable=True)
    return x[order // k], order, torch.bincount(flat, minlength=E)


def _combine(ys, order, topk_weights):
    """Undo the sort (each token owns exactly k rows) and take the router-weighted sum per token: [T, D]."""
    T, k = topk_weights.shape
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    unsorted = ys.index_select(0, inverse)  # a gather of whole rows: faster than scattering them (index_put) on the CPU
    return torch.bmm(topk_weights.to(ys.dtype).unsqueeze(1), unsorted.view(T, k, -1)).squeeze(1)


def moe_experts_reference(x, topk_ids, topk_weights, w13, w2, linear):
    """w13 / w2: stacked float tensors or stacked QuantWeights (indexed per expert alike); linear(x, w): the
    backend's product. One GEMM pair per expert that has tokens, no loop over tokens."""
    xs, order, counts = _by_expert(x, topk_ids, len(w13))
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            gate, up = linear(xs[start:start + n], w13[e]).chunk(2, dim=-1)  # [n, I] each
            ys[start:start + n] = linear(F.silu(gate) * up, w2[e])
            start += n
    return _combine(ys, order, topk_weights)


def check_moe(x, topk_ids, topk_weights, w13, w2, backend: str):
    """The arguments of moe_experts (kernels.moe_experts), as every backend takes them."""
    _check(x.dim() == 2, f"x must be [T, D], got {tuple(x.shape)}")
    T, D = x.shape
    quantized = isinstance(w13, QuantWeight)
    if quantized:  # weight-only int8 / int4 experts, stacked (kernels.quantize_experts)
        _check(isinstance(w2, QuantWeight) and w13.stacked and w2.stacked and w13.mode == w2.mode
               and len(w13) == len(w2), "w13 and w2 must both be stacked QuantWeights of one mode")
        (N13, K13), (N2, K2) = w13.shape, w2.shape
        shape13, shape2 = (len(w13), N13, K13), (len(w2), N2, K2)
        _check(x.is_floating_point(), f"x must be float, got {x.dtype}")
    else:
        _check(w13.dim() == 3 and w2.dim() == 3, "w13 and w2 must be [E, 2I, D] and [E, D, I]")
        shape13, shape2 = tuple(w13.shape), tuple(w2.shape)
        _check(x.dtype == w13.dtype == w2.dtype,
               f"x, w13, w2 must share a dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    _check(topk_ids.dim() == 2 and topk_ids.shape[0] == T and topk_ids.dtype == torch.int64,
           f"topk_ids must be int64 [T={T}, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    _check(tuple(topk_weights.shape) == tuple(topk_ids.shape) and topk_weights.dtype == torch.float32,
           f"topk_weights must be float32 {tuple(topk_ids.shape)}, got {topk_weights.dtype} {tuple(topk_weights.shape)}")
    _check(shape13[2] == D and shape13[1] % 2 == 0, f"w13 must be [E, 2I, D={D}], got {shape13}")
    E, I = shape13[0], shape13[1] // 2
    _check(shape2 == (E, D, I), f"w2 must be [E={E}, D={D}, I={I}], got {shape2}")
    stored = [w13.qweight, w13.scales, w2.qweight, w2.scales] if quantized else [w13, w2]
    dev = x.device
    _check(all(t.device == dev for t in [topk_ids, topk_weights] + stored), "all tensors must be on one device")
    if backend == "triton":
        _check(all(t.stride(-1) == 1 for t in [x] + stored), "x, w13, w2 must be contiguous in their last dimension")
