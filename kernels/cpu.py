"""The C++ CPU kernels (kernels/cpu_kernels.cpp): compiled on first use by torch.utils.cpp_extension for this
machine (-march=native) and cached; if no compiler is there, ext() is None and callers keep their torch path.

Few-row products (a decode step), y = x @ W.T, for a float weight [N, K] (bf16 or fp32) or an int8 / int4
QuantWeight (x quantized per block of 128 to int8, VNNI dot products):
  gemv(x, w)                           one weight
  moe_decode(x, ids, weights, ...)     a MoE layer's routed and shared experts in one call
  mla_absorbed(q_nope, q_pe, ...)      W_UK, the absorbed attention over the latent cache, W_UV in one call
  decode_layer(weights)                a whole decoder layer of a decode step (all of the above) in one call
The torch references are F.linear over the (dequantized) weight and kernels/reference.py; tests compare them."""
import hashlib
import os
import sys

import torch

from . import reference

_ext = None
_tried = False


SOURCES = ("cpu_kernels.cpp",)
CFLAGS = ("-O3", "-march=native", "-fopenmp")


def build_dir() -> str:
    """Our own build folder, keyed by everything that determines the binary (the sources, torch's version, the
    flags, this CPU's features), so that two checkouts, environments or torch versions never rebuild each other's."""
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in SOURCES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    h.update(" ".join((torch.__version__, sys.version, *CFLAGS, _cpu_flags())).encode())
    root = os.environ.get("MLA_ENGINE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mla-engine"))
    return os.path.join(root, "cpu-kernels", h.hexdigest()[:16])


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


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
            _ext = load(name="mla_cpu_kernels", sources=[os.path.join(here, s) for s in SOURCES],
                        extra_cflags=list(CFLAGS), extra_ldflags=["-fopenmp"], build_directory=path, verbose=False)
        except Exception as e:  # no compiler or headers: the torch paths serve
            print(f"mla: CPU kernels unavailable, the slower torch path serves ({str(e).splitlines()[0] if str(e) else e!r})",
                  file=sys.stderr)
    return _ext


def streams(w) -> bool:
    """Whether the kernels take this weight: bf16 / fp32 tensors (contiguous) and CPU QuantWeights."""
    if isinstance(w, torch.Tensor):
        return w.dtype in (torch.bfloat16, torch.float32) and w.is_contiguous()
    return w.qweight.is_contiguous()


def ref(w) -> tuple:
    """A weight as the C++ takes it: (float tensor, None, K, False) or (qweight, scales, K, int4)."""
    if isinstance(w, torch.Tensor):
        return w, None, w.shape[-1], False
    return w.qweight, w.scales, w.shape[1], w.mode == "int4"


def gemv(x: torch.Tensor, w, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T for a float weight [N, K] or a 2-D QuantWeight: [M, N] in x.dtype (or into out)."""
    out = x.new_empty(x.shape[0], w.shape[0]) if out is None else out
    ext().gemv(x, ref(w), out)
    return out


def moe_decode(x, topk_ids, topk_weights, w13, w2, shared=None) -> torch.Tensor:
    """kernels/moe.py moe_experts (+ the shared experts' SwiGLU, shared = (w13, w2)): [T, D] in x.dtype."""
    s13, s2 = (ref(shared[0]), ref(shared[1])) if shared is not None else (None, None)
    return ext().moe_decode(x, topk_ids, topk_weights, ref(w13), ref(w2), s13, s2)


def route_codes(top_k, scoring, method, n_group, topk_group, norm, scale) -> tuple:
    """The router's settings (models/moe.py MoE.router) as the C++ route takes them, after x, gate, bias."""
    return top_k, scoring == "sigmoid", reference.TOPK_METHODS.index(method), n_group, topk_group, norm, scale


# ---- a decoder layer of a decode step in one call ----------------------------------------------------------------
LINEARS = ("q_a", "q", "kv_a", "o", "w13", "w2", "s13", "s2")
FLOATS = ("ln1", "ln2", "kv_a_ln", "q_a_ln", "w_uk", "w_uv", "gate")


def decode_layer(weights: dict):
    """A C++ DecodeLayer (kernels/cpu_kernels.cpp) over a decoder layer's weights (models/deepseek.py
    DecoderLayer.cpu_weights), or None where the C++ does not take one of them (the Python layer serves)."""
    if ext() is None:
        return None
    w = {k: v for k, v in weights.items() if v is not None}
    lin, flt = [w[k] for k in LINEARS if k in w], [w[k] for k in FLOATS if k in w]
    if not (all(map(streams, lin)) and all(getattr(v, "backend", "torch") == "torch" for v in lin)
            and all(t.is_contiguous() and t.dtype in (torch.bfloat16, torch.float32) for t in flt)
            and len({w[k].dtype for k in ("ln1", "ln2", "kv_a_ln", "q_a_ln") if k in w}) == 1):
        return None
    d = {k: ref(v) if k in LINEARS else v for k, v in w.items()}
    if "router" in w:
        d["router"] = route_codes(**w["router"])
    return ext().DecodeLayer(d)


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


def gemv_quant_reference(x: torch.Tensor, qw) -> torch.Tensor:
    """The quantized product as the C++ kernel defines it: x quantized per block of 128, times the dequantized
    weight, in float64: [M, N] float32."""
    M, K = x.shape
    xq, sx, _ = quantize_rows_reference(x, False)
    KB = sx.shape[1]
    xd = (xq.view(M, KB, QB).double() * sx[..., None].double()).view(M, KB * QB)[:, :K]
    return (xd @ qw.dequantize(torch.float64).T).float()


# ---- absorbed attention (decode) --------------------------------------------------------------------------------------
MAX_DECODE_QUERIES = 16  # query tokens per sequence up to which the C++ decode attention runs


def decode_kind(fmt) -> int | None:
    """The C++ reader's code for a cache format, or None where it has none (fp8, float16)."""
    if fmt.name == "float32":
        return 0
    if fmt.name == "bfloat16":
        return 1
    if fmt.name == "int8" and fmt.model_dtype in (torch.bfloat16, torch.float32):
        return 2 if fmt.model_dtype == torch.bfloat16 else 3
    return None


def mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale, fmt) -> torch.Tensor:
    """kernels/reference.py mla_decode on the C++ kernel: o_lat [T, H, R] in q_lat's dtype."""
    return ext().mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                            decode_kind(fmt))


def mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                 fmt) -> torch.Tensor:
    """q_nope through W_UK, mla_decode, back through W_UV (kernels.mla_absorbed): o [T, H, v] in q_nope's dtype."""
    return ext().mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens,
                              softmax_scale, decode_kind(fmt))
