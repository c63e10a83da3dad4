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
The router stays in the model."""
import torch
import torch.nn.functional as F

from . import cpu, reference
from .matmul import CPU_FEW_ROWS, linear
from .weights import QuantWeight

BACKENDS = ("torch", "triton")


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
    unsorted = torch.empty_like(ys)
    unsorted[order] = ys
    return torch.bmm(topk_weights.to(ys.dtype).unsqueeze(1), unsorted.view(T, k, -1)).squeeze(1)


def moe_experts_reference(x, topk_ids, topk_weights, w13, w2):
    """w13 / w2: stacked float tensors or stacked QuantWeights (indexed per expert alike). One GEMM pair per expert
    that has tokens, no loop over tokens."""
    xs, order, counts = _by_expert(x, topk_ids, len(w13))
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            gate, up = linear(xs[start:start + n], w13[e]).chunk(2, dim=-1)  # [n, I] each
            ys[start:start + n] = linear(F.silu(gate) * up, w2[e])
            start += n
    return _combine(ys, order, topk_weights)


def moe_experts(x, topk_ids, topk_weights, w13, w2, backend="torch", shared=None):
    """Weighted sum of each token's k routed experts (SwiGLU), [T, D] in x.dtype; plus the shared experts' SwiGLU
    when shared = (w13 [2Is, D], w2 [D, Is]) is given (one call for the whole layer on the CPU)."""
    _check(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
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
        from . import triton_moe
        out = triton_moe.moe_experts(x, topk_ids, topk_weights, w13, w2)
    elif dev.type == "cpu" and 0 < T <= CPU_FEW_ROWS and cpu.ext() is not None and all(
            map(cpu.streams, [w13, w2, *(shared or ())])):
        # the few tokens of a decode step: every expert the batch picks, each read once for all of its tokens, and
        # the shared experts, in one C++ call (measured: the torch glue between the products cost about as much)
        return cpu.moe_decode(x, topk_ids, topk_weights, w13, w2, shared)
    else:
        out = moe_experts_reference(x, topk_ids, topk_weights, w13, w2)
    if shared is not None:
        out = out + linear(reference.silu_mul(linear(x, shared[0])), shared[1])
    return out
