"""The kernel path of a run, chosen once (make_backend, called where the engine is assembled), never per call:

  TorchBackend   the plain-torch references (kernels/reference.py) on any device; on the CPU the expanded
                 prefill takes torch's fused flash attention (kernels/cpu_prefill.py)
  CpuBackend     the C++ kernels (kernels/cpu.py) for the few rows of a decode step, oneDNN's GEMM for prompts
  TritonBackend  the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1)

A backend owns what is fixed for a run: the device, the model dtype and the latent cache's format. The model calls
its methods with tensors only. What is left to decide per call is the size of the step (FEW_ROWS), nothing else.
The checked entry points in kernels/__init__.py run the same methods, so the kernel tests cover this code."""
import torch
import torch.nn.functional as F

from . import cpu, reference
from .cache_format import CacheFormat
from .cache_format import unpack as unpack_cache
from .cache_format import write_latent as write_packed
from .matmul import dequantized_gemm, int8_gemm, quant_linear_reference, widened_gemm
from .moe import Router, moe_experts_reference
from .weights import QuantWeight

# Rows of a step (its tokens, or one sequence's query tokens) up to which the CPU streams each weight once (GEMV)
# and runs the absorbed attention and the decoder layer in C++; above it a prompt's GEMMs win.
FEW_ROWS = 16


def head_matmul(x, w, transpose_w: bool = False):
    """Per-head products of the absorbed path: y[t, h] = x[t, h] @ w[h] (w [H, A, B]), or x[t, h] @ w[h].T with
    transpose_w (w [H, B, A]); x [T, H, A] -> [T, H, B] in x.dtype."""
    wt = w.transpose(1, 2) if transpose_w else w
    return torch.bmm(x.transpose(0, 1), wt.to(x.dtype)).transpose(0, 1)


def max_rows(cu_seqlens_q: torch.Tensor, max_q_len: int | None) -> int:
    """The most query rows of one sequence: as the caller knows it, or read from cu_seqlens_q (a device sync)."""
    return max_q_len if max_q_len is not None else int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())


class TorchBackend:
    name = "torch"

    def __init__(self, device: torch.device, cache_format: CacheFormat):
        self.device, self.cache_format = torch.device(device), cache_format
        self.prefill = reference.mla_prefill
        if self.device.type == "cpu":  # the reference's chunked softmax is slower there than torch's fused kernel
            from . import cpu_prefill
            self.prefill = cpu_prefill.mla_prefill

    # ---- products ----------------------------------------------------------------------------------------------
    def linear(self, x, w):
        """x [M, K] @ w [N, K].T -> [M, N] in x.dtype; w a float tensor (in x's dtype, or bf16 under float32 x) or a
        QuantWeight."""
        if isinstance(w, QuantWeight):
            return quant_linear_reference(x, w)
        return F.linear(x, w) if w.dtype == x.dtype else widened_gemm(x, w)

    def moe(self, x, topk_ids, topk_weights, w13, w2, shared=None):
        """kernels/moe.py moe_experts: the routed experts' weighted sum (+ the shared experts')."""
        out = self.routed(x, topk_ids, topk_weights, w13, w2)
        if shared is not None:
            out = out + self.linear(self.silu_mul(self.linear(x, shared[0])), shared[1])
        return out

    def routed(self, x, topk_ids, topk_weights, w13, w2):
        return moe_experts_reference(x, topk_ids, topk_weights, w13, w2, self.linear)

    def route(self, x, gate, bias, router: Router):
        return reference.route(x, gate, bias, *router.args())

    # ---- the small steps ---------------------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps: float):
        return reference.rms_norm(x, weight, eps)

    def rope_(self, x, positions, cos, sin, interleave: bool):
        return x.copy_(reference.rope(x, positions, cos, sin, interleave))

    def silu_mul(self, h):
        return reference.silu_mul(h)

    # ---- the latent cache and attention ------------------------------------------------------------------------
    def write_latent(self, kv_cache, slot_mapping, c_kv, k_pe):
        if self.cache_format.packed:
            return write_packed(kv_cache, slot_mapping, c_kv, k_pe, self.cache_format)
        reference.write_latent(kv_cache, slot_mapping, c_kv, k_pe)

    def _unpacked(self, kv_cache, block_tables, seq_lens, dtype):
        """A packed cache's blocks of this batch dequantized (the float references read floats)."""
        if self.cache_format.packed:
            return unpack_cache(kv_cache, block_tables, seq_lens, self.cache_format, dtype)
        return kv_cache, block_tables

    def mla_decode(self, q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                   max_q_len=None):
        kv_cache, block_tables = self._unpacked(kv_cache, block_tables, seq_lens, q_lat.dtype)
        return reference.mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale)

    def absorbed(self, q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                 max_q_len=None):
        """q_nope through W_UK, mla_decode over the latent rows, back through W_UV: [T, H, v]."""
        q_lat = head_matmul(q_nope, w_uk)  # [T, H, R]
        o_lat = self.mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                                max_q_len)
        return head_matmul(o_lat, w_uv, transpose_w=True)  # [T, H, v]

    def expanded(self, q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b, softmax_scale):
        """The cached latent decompressed through kv_b_proj, then flash attention: [T, H, v]."""
        kv_cache, block_tables = self._unpacked(kv_cache, block_tables, seq_lens, q_nope.dtype)
        return self.prefill(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b, softmax_scale)

    def decode_layer(self, weights):
        """A fused decoder layer for decode steps (cpu.DecodeLayerWeights in), or None: the Python layer serves."""
        return None


class CpuBackend(TorchBackend):
    """The C++ kernels for few rows; torch (oneDNN) GEMMs for many. Chosen only for bf16 / fp32 models, whose float
    weights the C++ reads in place (contiguous, as WeightFormat stores them) like every QuantWeight. int8_prefill:
    prompts multiply quantized weights int8 x int8 (kernels/matmul.py int8_gemm), else dequantized."""
    name = "cpu"

    def __init__(self, device, cache_format: CacheFormat, int8_prefill: bool = False):
        super().__init__(device, cache_format)
        self.quant_gemm = int8_gemm if int8_prefill else dequantized_gemm
        self.kind = cpu.cache_kind(cache_format)
        if self.kind is None:  # a format the C++ neither writes nor reads (fp8, float16): the references serve it
            self.write_latent, self.mla_decode = super().write_latent, super().mla_decode
            self.absorbed = super().absorbed

    def linear(self, x, w):
        if x.shape[0] <= FEW_ROWS:
            return cpu.gemv(x, w)
        return self.quant_gemm(x, w) if isinstance(w, QuantWeight) else super().linear(x, w)

    def moe(self, x, topk_ids, topk_weights, w13, w2, shared=None):
        if x.shape[0] <= FEW_ROWS:  # every picked expert read once for all its tokens, shared experts too: one call
            return cpu.moe_decode(x, topk_ids, topk_weights, w13, w2, shared)
        return super().moe(x, topk_ids, topk_weights, w13, w2, shared)

    def routed(self, x, topk_ids, topk_weights, w13, w2):
        if self.quant_gemm is int8_gemm and isinstance(w13, QuantWeight):  # every expert on one thread, in one call
            return cpu.moe_prompt(x, topk_ids, topk_weights, w13, w2)
        return super().routed(x, topk_ids, topk_weights, w13, w2)

    def route(self, x, gate, bias, router: Router):
        if x.shape[0] <= FEW_ROWS:  # one call instead of about ten small torch ops per MoE layer
            return cpu.route(x, gate, bias, router)
        return super().route(x, gate, bias, router)

    def rms_norm(self, x, weight, eps: float):
        return cpu.rms_norm(x, weight, eps)

    def rope_(self, x, positions, cos, sin, interleave: bool):
        return cpu.rope_(x, positions, cos, sin, interleave)

    def silu_mul(self, h):
        return cpu.silu_mul(h)

    def write_latent(self, kv_cache, slot_mapping, c_kv, k_pe):
        cpu.write_latent(kv_cache, slot_mapping, c_kv, k_pe)  # one call, not a cat, a cast, a scatter

    def mla_decode(self, q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                   max_q_len=None):
        if max_rows(cu_seqlens_q, max_q_len) <= FEW_ROWS:
            return cpu.mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                                  self.kind)
        return super().mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale)

    def absorbed(self, q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                 max_q_len=None):
        if max_rows(cu_seqlens_q, max_q_len) <= FEW_ROWS:
            return cpu.mla_absorbed(q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens,
                                    softmax_scale, self.kind)
        return super().absorbed(q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, cu_seqlens_q, seq_lens,
                                softmax_scale, max_q_len)

    def decode_layer(self, weights):
        return None if self.kind is None else cpu.decode_layer(weights, self.kind)


class TritonBackend(TorchBackend):
    """The Triton kernels; the small steps (norms, RoPE, router) stay torch ops."""
    name = "triton"

    def linear(self, x, w):
        if isinstance(w, QuantWeight):  # dequantizes tiles in registers; split-K for few rows
            from . import triton_quant_linear
            return triton_quant_linear.quant_linear(x, w)
        return F.linear(x, w)

    def routed(self, x, topk_ids, topk_weights, w13, w2):
        from . import triton_moe  # every expert of the layer in one grouped GEMM launch per projection
        return triton_moe.moe_experts(x, topk_ids, topk_weights, w13, w2)

    def write_latent(self, kv_cache, slot_mapping, c_kv, k_pe):
        from . import cache_write
        cache_write.write_latent(kv_cache, slot_mapping, c_kv, k_pe, self.cache_format)

    def mla_decode(self, q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                   max_q_len=None):
        from . import triton_decode
        return triton_decode.mla_decode(q_lat, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, softmax_scale,
                                        self.cache_format)

    def expanded(self, q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b, softmax_scale):
        from . import triton_prefill
        return triton_prefill.mla_prefill(q_nope, q_pe, kv_cache, block_tables, cu_seqlens_q, seq_lens, w_kv_b,
                                          softmax_scale, self.cache_format)


BACKENDS = ("torch", "triton")  # what a caller names; "torch" on the CPU is served by the C++ kernels where built


def cpu_kernels_serve(narrow_weights: bool) -> bool:
    """Whether the C++ kernels serve a CPU run: they are built, and vectorized (AVX-512) or the weights are in a
    form torch has no GEMV for (int8 / int4, bf16 under a float32 model), which the C++ has AVX2 loops for. Without
    AVX-512 their portable loops lose to torch's GEMV over float weights by 3-7x (bench/results/prefix-cache-cpu.md)."""
    ext = cpu.ext()
    return ext is not None and (narrow_weights or ext.has_avx512())


def make_backend(name: str, device, dtype: torch.dtype, cache_format: CacheFormat, narrow_weights: bool = True,
                 int8_prefill: bool = False):
    """The backend a run uses: Triton, the C++ CPU kernels (a bf16 / fp32 model on the CPU, where they build and
    serve: cpu_kernels_serve; the one-time build happens here, at start; int8_prefill: see CpuBackend), or the torch
    references."""
    if name not in BACKENDS:
        raise ValueError(f"kernel argument: backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if name == "triton":
        return TritonBackend(device, cache_format)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and cpu_kernels_serve(narrow_weights):
        return CpuBackend(device, cache_format, int8_prefill)
    return TorchBackend(device, cache_format)
