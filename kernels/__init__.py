"""One dispatch function per kernel: check the arguments, then run the Triton kernel or the torch reference.

`backend` is "torch" or "triton" (the engine resolves "auto"). "torch" runs torch ops: the plain-torch references
(kernels/reference.py, what every kernel is tested against), except for the expanded prefill on the CPU, which runs
torch's fused CPU flash attention (kernels/cpu_prefill.py) because the reference's chunked softmax is slower there. A quantized weight
carries its own backend (kernels/weights.py). The latent cache's CacheFormat (kernels/cache_format.py) is passed
with the cache; without one, the cache is a plain float cache of its tensor's dtype. The Triton modules are imported
on first use, so the torch backend never needs a working Triton."""
import torch

from . import cpu, reference
from .cache_format import CacheFormat, float_format
from .cache_format import unpack as _unpack
from .cache_format import write_latent as _write_packed
from .matmul import CPU_FEW_ROWS, linear, quant_linear
from .moe import moe_experts
from .weights import QuantWeight, WeightFormat, quantize_experts, quantize_weight

__all__ = ["write_latent", "route", "mla_decode", "mla_absorbed", "mla_prefill", "head_matmul", "rms_norm", "rope_", "silu_mul", "linear", "quant_linear", "moe_experts", "CacheFormat",
           "QuantWeight", "WeightFormat", "quantize_weight", "quantize_experts"]
BACKENDS = ("torch", "triton")


def _check(cond, msg):
    if not cond:
        raise ValueError(f"kernel argument: {msg}")


def _check_batch(kv_cache, block_tables, cu_seqlens_q, seq_lens, T):
    _check(kv_cache.dim() == 3, f"kv_cache must be [blocks, block_size, width], got {tuple(kv_cache.shape)}")
    _check(block_tables.dim() == 2 and block_tables.dtype == torch.int32, "block_tables must be int32 [B, max_blocks]")
    B = block_tables.shape[0]
    _check(tuple(cu_seqlens_q.shape) == (B + 1,) and cu_seqlens_q.dtype == torch.int32, "cu_seqlens_q must be int32 [B+1]")
    _check(tuple(seq_lens.shape) == (B,) and seq_lens.dtype == torch.int32, "seq_lens must be int32 [B]")


def _check_backend(backend, *tensors):
    _check(backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        # the kernels address rows by strides but read each row's values as one contiguous run
        _check(all(t.stride(-1) == 1 for t in tensors), "the last dimension of every tensor must be contiguous")
        dev = tensors[0].device
        _check(all(t.device == dev for t in tensors), "all tensors must be on one device")
    return backend == "triton"


def _format(fmt, kv_cache, R, DR) -> CacheFormat:
    fmt = fmt or float_format(kv_cache, R, DR)
    fmt.check(kv_cache, R, DR)
    return fmt


def write_latent(kv_cache, slot_mapping, c_kv, k_pe, fmt: CacheFormat | None = None, backend="torch"):
    _check(c_kv.shape[0] == k_pe.shape[0] == slot_mapping.shape[0], "c_kv, k_pe and slot_mapping disagree on tokens")
    fmt = _format(fmt, kv_cache, c_kv.shape[1], k_pe.shape[1])
    if _check_backend(backend, kv_cache, c_kv, k_pe, slot_mapping):
        from . import cache_write
        return cache_write.write_latent(kv_cache, slot_mapping, c_kv, k_pe, fmt)
    if _cpu_glue(c_kv) and kv_cache.is_contiguous() and (not fmt.packed or cpu.decode_kind(fmt) is not None):
        return cpu.ext().write_latent(kv_cache, slot_mapping, c_kv, k_pe)  # one call, not a cat, a cast, a scatter
    if fmt.packed:
        return _write_packed(kv_cache, slot_mapping, c_kv, k_pe, fmt)
    reference.write_latent(kv_cache, slot_mapping, c_kv, k_pe)


def route(x, gate, bias, top_k: int, scoring: str, method: str, n_group: int, topk_group: int, norm: bool,
          scale: float):
    """DeepSeek's router (kernels/reference.py route): (ids int64 [T, k], weights float32 [T, k]) for x [T, D]."""
    _check(x.dim() == 2 and gate.dim() == 2 and gate.shape[1] == x.shape[1], "x must be [T, D] and gate [E, D]")
    _check(scoring in reference.SCORING_FUNCS and method in reference.TOPK_METHODS, f"router {scoring}/{method}")
    if _cpu_glue(x) and x.shape[0] <= CPU_FEW_ROWS and gate.is_contiguous() and gate.dtype in (torch.bfloat16,
                                                                                                 torch.float32):
        # a decode step: one call instead of about ten small torch ops per MoE layer
        return cpu.ext().route(x, gate, bias, *cpu.route_codes(top_k, scoring, method, n_group, topk_group, norm,
                                                               scale))
    return reference.route(x, gate, bias, top_k, scoring, method, n_group, topk_group, norm, scale)


def _cpu_decode(q, block_tables, cu_seqlens_q, fmt, max_q_len) -> bool:
    """Whether the C++ absorbed attention takes this batch: few queries per sequence, a cache format it reads."""
    if not (q.device.type == "cpu" and cpu.ext() is not None and cpu.decode_kind(fmt) is not None
            and q.shape[0] <= cpu.MAX_DECODE_QUERIES * block_tables.shape[0]):
        return False
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    return max_q_len <= cpu.MAX_DECODE_QUERIES


def mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
               fmt: CacheFormat | None = None, backend="torch", max_q_len: int | None = None):
    T, H, R = q_lat.shape
    _check(q_pe.dim() == 3 and q_pe.shape[:2] == (T, H), "q_pe must be [T, H, rope_dim]")
    _check_batch(kv_cache, block_tables, cu_seqlens_q, seq_lens, T)
    fmt = _format(fmt, kv_cache, R, q_pe.shape[2])
    if _check_backend(backend, q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens):
        from . import triton_decode
        return triton_decode.mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                                        fmt)
    if _cpu_decode(q_lat, block_tables, cu_seqlens_q, fmt, max_q_len):
        return cpu.mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale, fmt)
    if fmt.packed:  # the float reference over the dequantized blocks of this batch
        kv_cache, block_tables = _unpack(kv_cache, block_tables, seq_lens, fmt, q_lat.dtype)
    return reference.mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale)


def mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                 fmt: CacheFormat | None = None, backend="torch", max_q_len: int | None = None):
    """The absorbed attention (models/attention.py): q_lat = q_nope @ W_UK per head, mla_decode over the latent
    cache, o = o_lat @ W_UV.T per head. q_nope [T, H, nope], w_uk [H, nope, R], w_uv [H, v, R] -> o [T, H, v].
    On the CPU, a decode batch runs it as one C++ call. max_q_len: the most query rows of one sequence, if the
    caller knows it (otherwise read from cu_seqlens_q)."""
    T, H, _ = q_nope.shape
    _check(w_uk.dim() == 3 and w_uv.dim() == 3 and w_uk.shape[:2] == (H, q_nope.shape[2])
           and w_uv.shape[0] == H and w_uv.shape[2] == w_uk.shape[2], "w_uk must be [H, nope, R] and w_uv [H, v, R]")
    _check(q_pe.dim() == 3 and q_pe.shape[:2] == (T, H), "q_pe must be [T, H, rope_dim]")
    _check_batch(kv_cache, block_tables, cu_seqlens_q, seq_lens, T)
    fmt = _format(fmt, kv_cache, w_uk.shape[2], q_pe.shape[2])
    if backend == "torch" and _cpu_decode(q_nope, block_tables, cu_seqlens_q, fmt, max_q_len) and cpu.streams(w_uk) \
            and cpu.streams(w_uv):
        return cpu.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens,
                                softmax_scale, fmt)
    q_lat = head_matmul(q_nope, w_uk)  # [T, H, R]
    o_lat = mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale, fmt, backend,
                       max_q_len)
    return head_matmul(o_lat, w_uv, transpose_w=True)  # [T, H, v]


def _cpu_glue(x) -> bool:
    return x.device.type == "cpu" and cpu.ext() is not None


def rms_norm(x, weight, eps: float):
    """DeepSeek's RMSNorm over the last dim of x [..., D]."""
    if _cpu_glue(x) and x.dtype == weight.dtype:
        return cpu.ext().rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)
    return reference.rms_norm(x, weight, eps)


def rope_(x, positions, cos, sin, interleave: bool):
    """RoPE in place on x [T, N, rope_dim] (a view: the rope part of q, or k_pe); returns x."""
    _check(x.dim() == 3 and x.stride(-1) == 1, "x must be [T, N, rope_dim] with a contiguous last dim")
    if _cpu_glue(x):
        cpu.ext().rope_(x, positions, cos, sin, interleave)
        return x
    return x.copy_(reference.rope(x, positions, cos, sin, interleave))


def silu_mul(h):
    """SwiGLU's middle: h [M, 2I] (gate | up) -> silu(gate) * up [M, I]."""
    if _cpu_glue(h):
        return cpu.ext().silu_mul(h)
    return reference.silu_mul(h)


def head_matmul(x, w, transpose_w: bool = False):
    """Per-head products of the absorbed path: y[t, h] = x[t, h] @ w[h] (w [H, A, B]), or x[t, h] @ w[h].T with
    transpose_w (w [H, B, A]); x [T, H, A] -> [T, H, B] in x.dtype."""
    _check(x.dim() == 3 and w.dim() == 3 and x.shape[1] == w.shape[0], "x must be [T, H, A] and w [H, ., .]")
    _check(w.shape[2 if transpose_w else 1] == x.shape[2], f"w {tuple(w.shape)} does not take x {tuple(x.shape)}")
    wt = w.transpose(1, 2) if transpose_w else w
    return torch.bmm(x.transpose(0, 1), wt.to(x.dtype)).transpose(0, 1)


def mla_prefill(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b, softmax_scale,
                fmt: CacheFormat | None = None, backend="torch"):
    T, H, dn = q_nope.shape
    _check(q_pe.shape[:2] == (T, H), "q_pe must be [T, H, rope_dim]")
    _check(w_kv_b.shape[0] % H == 0 and w_kv_b.shape[0] // H > dn, "w_kv_b must be [H * (nope + v), kv_lora_rank]")
    _check_batch(kv_cache, block_tables, cu_seqlens_q, seq_lens, T)
    fmt = _format(fmt, kv_cache, w_kv_b.shape[1], q_pe.shape[2])  # w_kv_b's input width is kv_lora_rank
    if _check_backend(backend, q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b):
        from . import triton_prefill
        return triton_prefill.mla_prefill(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b,
                                          softmax_scale, fmt)
    if fmt.packed:
        kv_cache, block_tables = _unpack(kv_cache, block_tables, seq_lens, fmt, q_nope.dtype)
    if q_nope.device.type == "cpu":  # torch's fused CPU flash attention, merged by log-sum-exp
        from . import cpu_prefill
        return cpu_prefill.mla_prefill(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b,
                                       softmax_scale)
    return reference.mla_prefill(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b, softmax_scale)
