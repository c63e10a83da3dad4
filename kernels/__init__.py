"""The kernels, behind one backend object per run (kernels/backend.py: torch references, the C++ CPU kernels, or
Triton), which the engine chooses once and the model calls.

The functions here are the checked entry points for everything else (tests, benchmarks, tools): each asserts
shapes, dtypes and strides, then runs the same backend method the model runs. `backend` is "torch" or "triton";
"torch" on the CPU is served by the C++ kernels where they are built (make_backend). A QuantWeight carries the
backend that multiplies by it. A latent cache's CacheFormat (kernels/cache_format.py) is passed with the cache;
without one, the cache is a plain float cache of its tensor's dtype. The Triton modules are imported on first use,
so the torch backend never needs a working Triton."""
import torch

from .backend import BACKENDS, FEW_ROWS, TorchBackend, make_backend
from .backend import head_matmul as _head_matmul
from .cpu import DecodeLayerWeights
from .cache_format import CacheFormat, float_format
from .matmul import check_quant
from .moe import Router, check_moe
from .weights import QuantWeight, WeightFormat, quantize_experts, quantize_weight

__all__ = ["write_latent", "route", "mla_decode", "mla_absorbed", "mla_prefill", "head_matmul", "rms_norm", "rope_",
           "silu_mul", "linear", "quant_linear", "moe_experts", "make_backend", "FEW_ROWS", "CacheFormat", "Router",
           "DecodeLayerWeights",
           "QuantWeight", "WeightFormat", "quantize_weight", "quantize_experts"]


def _check(cond, msg):
    if not cond:
        raise ValueError(f"kernel argument: {msg}")


def _check_batch(kv_cache, block_tables, cu_seqlens_q, seq_lens, T):
    _check(kv_cache.dim() == 3, f"kv_cache must be [blocks, block_size, width], got {tuple(kv_cache.shape)}")
    _check(block_tables.dim() == 2 and block_tables.dtype == torch.int32, "block_tables must be int32 [B, max_blocks]")
    B = block_tables.shape[0]
    _check(tuple(cu_seqlens_q.shape) == (B + 1,) and cu_seqlens_q.dtype == torch.int32, "cu_seqlens_q must be int32 [B+1]")
    _check(tuple(seq_lens.shape) == (B,) and seq_lens.dtype == torch.int32, "seq_lens must be int32 [B]")


def _backend(backend: str, fmt: CacheFormat | None, *tensors) -> TorchBackend:
    """The backend that serves a call on these tensors (the first one's device and dtype)."""
    _check(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        # the kernels address rows by strides but read each row's values as one contiguous run
        _check(all(t.stride(-1) == 1 for t in tensors), "the last dimension of every tensor must be contiguous")
        dev = tensors[0].device
        _check(all(t.device == dev for t in tensors), "all tensors must be on one device")
    return make_backend(backend, tensors[0].device, tensors[0].dtype, fmt)


def _format(fmt, kv_cache, R, DR) -> CacheFormat:
    fmt = fmt or float_format(kv_cache, R, DR)
    fmt.check(kv_cache, R, DR)
    return fmt


def _streamed(w) -> bool:
    """Whether the C++ kernels take this weight: bf16 / fp32 tensors (contiguous) and contiguous QuantWeights (the
    engine stores every weight so; a caller's arbitrary tensor may not be)."""
    if isinstance(w, QuantWeight):
        return w.qweight.is_contiguous()
    return w.dtype in (torch.bfloat16, torch.float32) and w.is_contiguous()


def _for_weights(b: TorchBackend, *weights) -> TorchBackend:
    return b if b.name != "cpu" or all(map(_streamed, weights)) else TorchBackend(b.device, b.cache_format)


# ---- products -------------------------------------------------------------------------------------------------------
def linear(x, w):
    """x [M, K] @ w [N, K].T -> [M, N] in x.dtype; w a float tensor or a QuantWeight (which names its backend)."""
    if isinstance(w, QuantWeight):
        return quant_linear(x, w)
    _check(x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1], f"x {tuple(x.shape)} and w {tuple(w.shape)}")
    return _for_weights(_backend("torch", None, x), w).linear(x, w)


def quant_linear(x, qw: QuantWeight):
    """x [M, K] @ W.T for a quantized W [N, K]: [M, N] in x.dtype, on the kernel family qw.backend names."""
    check_quant(x, qw)
    return _for_weights(_backend(qw.backend, None, x), qw).linear(x, qw)


def moe_experts(x, topk_ids, topk_weights, w13, w2, backend="torch", shared=None):
    """kernels/moe.py: the weighted sum of each token's k routed experts (SwiGLU), [T, D] in x.dtype; plus the
    shared experts' SwiGLU when shared = (w13 [2Is, D], w2 [D, Is]) is given."""
    check_moe(x, topk_ids, topk_weights, w13, w2, backend)
    b = _for_weights(_backend(backend, None, x), w13, w2, *(shared or ()))
    return b.moe(x, topk_ids, topk_weights, w13, w2, shared)


def route(x, gate, bias, router: Router):
    """DeepSeek's router (kernels/reference.py route): (ids int64 [T, k], weights float32 [T, k]) for x [T, D]."""
    from .reference import SCORING_FUNCS, TOPK_METHODS
    _check(x.dim() == 2 and gate.dim() == 2 and gate.shape[1] == x.shape[1], "x must be [T, D] and gate [E, D]")
    _check(router.scoring in SCORING_FUNCS and router.method in TOPK_METHODS, f"router {router}")
    return _for_weights(_backend("torch", None, x), gate).route(x, gate, bias, router)


def head_matmul(x, w, transpose_w: bool = False):
    """Per-head products of the absorbed path: y[t, h] = x[t, h] @ w[h] (w [H, A, B]), or x[t, h] @ w[h].T with
    transpose_w (w [H, B, A]); x [T, H, A] -> [T, H, B] in x.dtype."""
    _check(x.dim() == 3 and w.dim() == 3 and x.shape[1] == w.shape[0], "x must be [T, H, A] and w [H, ., .]")
    _check(w.shape[2 if transpose_w else 1] == x.shape[2], f"w {tuple(w.shape)} does not take x {tuple(x.shape)}")
    return _head_matmul(x, w, transpose_w)


# ---- the small steps ------------------------------------------------------------------------------------------------
def rms_norm(x, weight, eps: float):
    """DeepSeek's RMSNorm over the last dim of x [..., D]."""
    _check(x.shape[-1] == weight.shape[0], f"x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    b = _backend("torch", None, x)
    return (b if x.dtype == weight.dtype else TorchBackend(b.device, None)).rms_norm(x, weight, eps)


def rope_(x, positions, cos, sin, interleave: bool):
    """RoPE in place on x [T, N, rope_dim] (a view: the rope part of q, or k_pe); returns x."""
    _check(x.dim() == 3 and x.stride(-1) == 1, "x must be [T, N, rope_dim] with a contiguous last dim")
    return _backend("torch", None, x).rope_(x, positions, cos, sin, interleave)


def silu_mul(h):
    """SwiGLU's middle: h [M, 2I] (gate | up) -> silu(gate) * up [M, I]."""
    return _backend("torch", None, h).silu_mul(h)


# ---- the latent cache and attention ---------------------------------------------------------------------------------
def write_latent(kv_cache, slot_mapping, c_kv, k_pe, fmt: CacheFormat | None = None, backend="torch"):
    _check(c_kv.shape[0] == k_pe.shape[0] == slot_mapping.shape[0], "c_kv, k_pe and slot_mapping disagree on tokens")
    fmt = _format(fmt, kv_cache, c_kv.shape[1], k_pe.shape[1])
    b = _backend(backend, fmt, c_kv, kv_cache, k_pe, slot_mapping)
    if b.name == "cpu" and not kv_cache.is_contiguous():
        b = TorchBackend(b.device, fmt)
    return b.write_latent(kv_cache, slot_mapping, c_kv, k_pe)


def mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
               fmt: CacheFormat | None = None, backend="torch", max_q_len: int | None = None):
    """The absorbed attention over the latent cache: q_lat [T, H, R], q_pe [T, H, rope] -> o_lat [T, H, R]."""
    T, H, R = q_lat.shape
    _check(q_pe.dim() == 3 and q_pe.shape[:2] == (T, H), "q_pe must be [T, H, rope_dim]")
    _check_batch(kv_cache, block_tables, cu_seqlens_q, seq_lens, T)
    fmt = _format(fmt, kv_cache, R, q_pe.shape[2])
    b = _backend(backend, fmt, q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens)
    return b.mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale, max_q_len)


def mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                 fmt: CacheFormat | None = None, backend="torch", max_q_len: int | None = None):
    """The absorbed attention (models/attention.py): q_lat = q_nope @ W_UK per head, mla_decode over the latent
    cache, o = o_lat @ W_UV.T per head. q_nope [T, H, nope], w_uk [H, nope, R], w_uv [H, v, R] -> o [T, H, v].
    max_q_len: the most query rows of one sequence, if the caller knows it (otherwise read from cu_seqlens_q)."""
    T, H, _ = q_nope.shape
    _check(w_uk.dim() == 3 and w_uv.dim() == 3 and w_uk.shape[:2] == (H, q_nope.shape[2])
           and w_uv.shape[0] == H and w_uv.shape[2] == w_uk.shape[2], "w_uk must be [H, nope, R] and w_uv [H, v, R]")
    _check(q_pe.dim() == 3 and q_pe.shape[:2] == (T, H), "q_pe must be [T, H, rope_dim]")
    _check_batch(kv_cache, block_tables, cu_seqlens_q, seq_lens, T)
    fmt = _format(fmt, kv_cache, w_uk.shape[2], q_pe.shape[2])
    b = _for_weights(_backend(backend, fmt, q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens), w_uk,
                     w_uv)
    return b.absorbed(q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                      max_q_len)


def mla_prefill(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b, softmax_scale,
                fmt: CacheFormat | None = None, backend="torch"):
    """The expanded attention: the cached latent decompressed through kv_b_proj, then flash attention."""
    T, H, dn = q_nope.shape
    _check(q_pe.shape[:2] == (T, H), "q_pe must be [T, H, rope_dim]")
    _check(w_kv_b.shape[0] % H == 0 and w_kv_b.shape[0] // H > dn, "w_kv_b must be [H * (nope + v), kv_lora_rank]")
    _check_batch(kv_cache, block_tables, cu_seqlens_q, seq_lens, T)
    fmt = _format(fmt, kv_cache, w_kv_b.shape[1], q_pe.shape[2])  # w_kv_b's input width is kv_lora_rank
    b = _backend(backend, fmt, q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b)
    return b.expanded(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b, softmax_scale)
