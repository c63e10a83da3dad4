"""The C++ CPU kernels (kernels/cpu_*.cpp): compiled on first use by torch.utils.cpp_extension for this machine
(-march=native) and cached; if no compiler is there, ext() is None and callers keep their torch path.

Few-row products (a decode step), y = x @ W.T, for a float weight [N, K] (bf16 or fp32) or an int8 / int4
QuantWeight (x quantized per block of 128 to int8, VNNI dot products):
  gemv(x, w)                           one weight
  moe_decode(x, ids, weights, ...)     a MoE layer's routed and shared experts in one call
  mla_absorbed(q_nope, q_pe, ...)      W_UK, the absorbed attention over the latent cache, W_UV in one call
  decode_layer(weights, kind)          a whole decoder layer of a decode step (all of the above) in one call
The torch references are F.linear over the (dequantized) weight and kernels/reference.py; tests compare them.

What crosses into the C++ is typed (kernels/cpu_kernels.h): a weight as a WeightRef, the router as a Router with
TopkMethod and Scoring enums, the cache format as a CacheKind, a decoder layer's weights as the C++
DecodeLayerWeights, converted field by field from the dataclass below once, when the engine starts."""
import fcntl
import functools
import hashlib
import os
import sys
from dataclasses import dataclass, fields
from typing import get_args

import torch

from .moe import Router
from .weights import QuantWeight

_ext = None
_tried = False


SOURCES = ("cpu_gemv.cpp", "cpu_int8_gemm.cpp", "cpu_attention.cpp", "cpu_layer.cpp", "cpu_bindings.cpp")  # compiled and linked
HEADERS = ("cpu_common.h", "cpu_kernels.h")  # hashed with the sources: the build folder changes when they do
CFLAGS = ("-O3", "-march=native", "-fopenmp")


def build_dir() -> str:
    """Our own build folder, keyed by everything that determines the binary (the sources and where they are, torch's
    and Python's versions, the flags, this CPU's features), so that two checkouts, environments or torch versions
    never rebuild each other's."""
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    # the folder too: the build files record the sources' absolute paths, so two checkouts sharing one build folder
    # would rebuild it each time they take turns
    h.update(" ".join((here, torch.__version__, sys.version, *CFLAGS, *cpu_flags())).encode())
    root = os.environ.get("MLA_ENGINE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mla-engine"))
    return os.path.join(root, "cpu-kernels", h.hexdigest()[:16])


def cpu_flags() -> list[str]:
    """This CPU's feature flags, as /proc/cpuinfo lists them (none where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def ext():
    global _ext, _tried
    if not _tried:
        _tried = True
        from torch.utils.cpp_extension import load
        here = os.path.dirname(os.path.abspath(__file__))
        path = build_dir()
        os.makedirs(path, exist_ok=True)
        built = any(f.endswith(".so") for f in os.listdir(path))
        if not built:
            print("mla: building the CPU kernels for this machine, once (about a minute)", file=sys.stderr, flush=True)
        try:
            # torch's own lock (a file named "lock", waited on until it is deleted) outlives a build that was
            # killed, and every later start would wait on it forever. Builds here first take an flock, which the
            # OS releases when its holder dies: a "lock" found while holding it is such a leftover.
            with open(os.path.join(path, "build.flock"), "w") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                if os.path.exists(os.path.join(path, "lock")):
                    os.remove(os.path.join(path, "lock"))
                _ext = load(name="mla_cpu_kernels", sources=[os.path.join(here, s) for s in SOURCES],
                            extra_cflags=list(CFLAGS), extra_ldflags=["-fopenmp"], build_directory=path, verbose=False)
        except Exception as e:  # no compiler or headers: the torch paths serve
            print(f"mla: CPU kernels unavailable, the slower torch path serves ({str(e).splitlines()[0] if str(e) else e!r})",
                  file=sys.stderr)
    return _ext


def ref(w):
    """A weight as the C++ takes it: a WeightRef of a float tensor, or of a QuantWeight's qweight and scales."""
    if isinstance(w, torch.Tensor):
        return ext().WeightRef(tensor=w, scales=None, K=w.shape[-1], int4=False)
    return ext().WeightRef(tensor=w.qweight, scales=w.scales, K=w.shape[1], int4=w.mode == "int4")


def gemv(x: torch.Tensor, w, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T for a float weight [N, K] or a 2-D QuantWeight: [M, N] in x.dtype (or into out)."""
    out = x.new_empty(x.shape[0], w.shape[0]) if out is None else out
    ext().gemv(x, ref(w), out)
    return out


def moe_decode(x, topk_ids, topk_weights, w13, w2, shared=None) -> torch.Tensor:
    """kernels/moe.py moe_experts (+ the shared experts' SwiGLU, shared = (w13, w2)): [T, D] in x.dtype."""
    s13, s2 = (ref(shared[0]), ref(shared[1])) if shared is not None else (None, None)
    return ext().moe_decode(x, topk_ids, topk_weights, ref(w13), ref(w2), s13, s2)


def dequantize(qw: QuantWeight, out: torch.Tensor):
    """A 2-D QuantWeight (or a block of its rows) into out [N, K], bf16 or float32."""
    ext().dequantize(ref(qw), out)


def quantize_tokens(x: torch.Tensor) -> tuple:
    """x float32 [M, K] -> (xq int8 [M, K], sx float32 [M]), x ~ xq * sx row by row: the int8 GEMM's activations."""
    return tuple(ext().quantize_tokens(x))


def requantize_rows(qw: QuantWeight, out: torch.Tensor, scales: torch.Tensor):
    """A 2-D int4 QuantWeight (or a block of its rows) as int8 rows into out [N, K] with one scale each in scales [N]."""
    ext().requantize_rows(ref(qw), out, scales)


def scale_int32(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, out: torch.Tensor):
    """out [M, N] (float32, rows contiguous) = acc (int32 [M, N]) * sx[:, None] * sw[None, :]."""
    ext().scale_int32(acc, sx, sw, out)


def moe_prompt(x, topk_ids, topk_weights, w13: QuantWeight, w2: QuantWeight) -> torch.Tensor:
    """kernels/moe.py moe_experts (routed experts only) for a prompt, x float32 and int8 / int4 experts, each product
    as kernels/matmul.py int8_gemm computes it: [T, D] float32."""
    return ext().moe_prompt(x, topk_ids, topk_weights, ref(w13), ref(w2))


def route(x, gate, bias, router) -> tuple:
    """kernels/reference.py route for a kernels.moe.Router: (ids int64 [T, k], weights float32 [T, k])."""
    return ext().route(x, gate, bias, native_router(router))


@functools.lru_cache(maxsize=None)
def native_router(router):
    """A kernels.moe.Router (frozen, so hashable) as the C++ Router, made once per distinct setting."""
    e = ext()
    enums = {"scoring": e.Scoring, "method": e.TopkMethod}
    return _native(e.Router(), router, lambda f, v: getattr(enums[f.name], v) if f.name in enums else v)


def _native(target, dataclass_obj, convert):
    """target (a bound C++ struct) with every field of dataclass_obj set by name, through convert(field, value). The
    two must have the same fields: a field missing on either side is an error here, not a silently unset value."""
    names = {f.name for f in fields(dataclass_obj)}
    bound = {k for k, v in vars(type(target)).items() if isinstance(v, property)}
    if names != bound:
        raise TypeError(f"{type(dataclass_obj).__name__}: fields differ from the C++ struct's "
                        f"(Python only: {sorted(names - bound)}, C++ only: {sorted(bound - names)})")
    for f in fields(dataclass_obj):
        setattr(target, f.name, convert(f, getattr(dataclass_obj, f.name)))
    return target


def rms_norm(x, weight, eps: float) -> torch.Tensor:
    return ext().rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)


def rope_(x, positions, cos, sin, interleave: bool) -> torch.Tensor:
    ext().rope_(x, positions, cos, sin, interleave)
    return x


def silu_mul(h) -> torch.Tensor:
    return ext().silu_mul(h)


def write_latent(kv_cache, slot_mapping, c_kv, k_pe):
    """The new tokens' [c_kv, k_pe] into their slots of a cache whose format has a cache_kind."""
    ext().write_latent(kv_cache, slot_mapping, c_kv, k_pe)


# ---- a decoder layer of a decode step in one call ----------------------------------------------------------------
Weight = torch.Tensor | QuantWeight


@dataclass(frozen=True)
class DecodeLayerWeights:
    """A decoder layer (models/deepseek.py DecoderLayer) as the C++ DecodeLayer takes it, by the checkpoint's names.
    Linears are float tensors or QuantWeights; norms, W_UK / W_UV and the router's gate are model-dtype tensors."""
    input_layernorm: torch.Tensor
    post_attention_layernorm: torch.Tensor
    q_proj: Weight  # q_b_proj when q_lora_rank is set
    q_a_proj: Weight | None
    q_a_layernorm: torch.Tensor | None
    kv_a_proj_with_mqa: Weight
    kv_a_layernorm: torch.Tensor
    w_uk: torch.Tensor  # [H, nope, R]
    w_uv: torch.Tensor  # [H, v, R]
    o_proj: Weight
    w13: Weight  # [gate_proj; up_proj]: the dense MLP's, or the routed experts' stacked
    w2: Weight
    gate: torch.Tensor | None  # the router (MoE layers only)
    e_score_correction_bias: torch.Tensor | None
    router: Router | None
    shared_w13: Weight | None
    shared_w2: Weight | None
    num_heads: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    kv_lora_rank: int
    rms_norm_eps: float
    softmax_scale: float
    rope_interleave: bool


def decode_layer(w: DecodeLayerWeights, kind):
    """A C++ DecodeLayer (kernels/cpu_layer.cpp) over a decoder layer's weights, reading and writing a cache of
    this CacheKind; its forward(x, positions, slot_mapping, cos, sin, kv_cache, block_tables, cu_seqlens_q,
    seq_lens) runs the whole layer of a decode step."""
    return ext().DecodeLayer(_native(ext().DecodeLayerWeights(), w, _layer_field), kind)


def _layer_field(f, v):
    """A DecodeLayerWeights field's value as the C++ struct holds it, by the field's declared type."""
    if v is None:
        return None
    if QuantWeight in get_args(f.type):  # a Weight: a float tensor or a QuantWeight
        return ref(v)
    if Router in get_args(f.type):
        return native_router(v)
    return v  # norms, W_UK, W_UV, the gate and its bias: model-dtype tensors; the sizes


# ---- plain-torch references of what the C++ computes (tests compare against them) ----------------------------------
QB = 128  # the activation block of quantize_rows, the int4 group


def quantize_rows_reference(x: torch.Tensor, interleave: bool):
    """(xq int8 [M, KB * 128], sx [M, KB], sx * sum(xq) [M, KB]): x ~ xq * sx per block of 128, zero padded;
    interleave: each block as its 64 even-indexed values, then its 64 odd ones."""
    M, K = x.shape
    KB = -(-K // QB)
    xb = torch.nn.functional.pad(x.float(), (0, KB * QB - K)).view(M, KB, QB)
    amax = xb.abs().amax(-1)
    sx = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    xq = torch.round(xb / sx[..., None]).clamp(-127, 127)
    sxsum = sx * xq.sum(-1)
    if interleave:
        xq = torch.cat((xq[..., 0::2], xq[..., 1::2]), -1)
    return xq.to(torch.int8).view(M, KB * QB), sx, sxsum


def quantize_tokens_reference(x: torch.Tensor) -> tuple:
    """(xq int8 [M, K], sx [M]): x ~ xq * sx with one scale per row, as the C++ rounds (x times 1 / sx, in float32)."""
    amax = x.float().abs().amax(-1)
    sx = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x.float() * (1 / sx)[:, None]).clamp(-127, 127).to(torch.int8), sx


def int8_gemm_reference(x: torch.Tensor, qw) -> torch.Tensor:
    """The int8 x int8 prompt product as kernels/matmul.py int8_gemm defines it: x quantized per row, the weight as
    int8 rows (int8 as stored; int4 dequantized and requantized per row), the integer sums in float64: [M, N]."""
    xq, sx = quantize_tokens_reference(x)
    wq, sw = (qw.qweight, qw.scales) if qw.mode == "int8" else quantize_tokens_reference(qw.dequantize(torch.float32))
    return ((xq.double() @ wq.double().T) * sx.double()[:, None] * sw.double()[None, :]).float()


def gemv_quant_reference(x: torch.Tensor, qw) -> torch.Tensor:
    """The quantized product as the C++ kernel defines it: x quantized per block of 128, times the dequantized
    weight, in float64: [M, N] float32."""
    M, K = x.shape
    xq, sx, _ = quantize_rows_reference(x, False)
    KB = sx.shape[1]
    xd = (xq.view(M, KB, QB).double() * sx[..., None].double()).view(M, KB * QB)[:, :K]
    return (xd @ qw.dequantize(torch.float64).T).float()


# ---- absorbed attention (decode) --------------------------------------------------------------------------------------
def cache_kind(fmt):
    """The C++ reader's CacheKind for a cache format, or None where it has none (fp8, float16)."""
    if fmt is None or ext() is None:
        return None
    kinds = ext().CacheKind
    if fmt.name == "float32":
        return kinds.FLOAT32
    if fmt.name == "bfloat16":
        return kinds.BFLOAT16
    if fmt.name == "int8" and fmt.model_dtype in (torch.bfloat16, torch.float32):  # k_pe kept in the model dtype
        return kinds.INT8_BF16_ROPE if fmt.model_dtype == torch.bfloat16 else kinds.INT8_FP32_ROPE
    return None


def mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale, kind) -> torch.Tensor:
    """kernels/reference.py mla_decode on the C++ kernel: o_lat [T, H, R] in q_lat's dtype."""
    return ext().mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale, kind)


def mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                 kind) -> torch.Tensor:
    """q_nope through W_UK, mla_decode, back through W_UV (kernels.mla_absorbed): o [T, H, v] in q_nope's dtype."""
    return ext().mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens,
                              softmax_scale, kind)
