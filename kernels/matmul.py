"""linear(x, w): x @ w.T for every weight the model holds, a float tensor or a QuantWeight (kernels/weights.py),
which carries the kernel family that reads it.

Float weights on the CPU: the few rows of a decode step take their own path. There, streaming the weight from
memory is the whole cost, and MKL streams it slowly: its one-row product (gemv) runs on one core (about 16 GB/s on
this 2-core EPYC, of about 30 GB/s that two cores read), and its gemm for 2..16 rows with x as the left operand
reaches 5-8 GB/s. So the weight's rows are cut into pieces and the product runs as one batched w_piece @ x.T: torch
spreads the pieces over its threads (one row: 30 GB/s), and the large operand on the left is the gemm MKL runs well
(2..4 rows: 11-17 GB/s instead of 5-8). Measured with 2 threads on 2048-wide fp32 weights of 2816 to 102400 rows
(V2-Lite's experts, MLP and LM head).

Quantized weights, quant_linear(x [M, K], qw) -> [M, N] in x.dtype, by qw.backend:
  "torch"   on the CPU with M <= CPU_FAST_MAX_M (decode): torch's packed weight-only kernels
            (_weight_int8pack_mm / _weight_int4pack_mm_for_cpu) with bf16 activations, which read 1 or 0.5 bytes
            per weight instead of 4; for larger M (prefill) or other devices: dequantize to x.dtype and F.linear.
  "triton"  a GEMM that dequantizes tiles in registers, split-K for small M (kernels/triton_quant_linear.py)."""
import torch
import torch.nn.functional as F

from .weights import BACKENDS, INT4_GROUP, MODES, QuantWeight, _cdiv, _check

MAX_M = 16  # rows up to which the CPU takes the few-rows path; above, F.linear's gemm is the better one
CPU_FAST_MAX_M = 16  # up to this many rows the CPU uses the packed kernels; above, dequantize + F.linear
INT8PACK_K_ALIGN = 32  # _weight_int8pack_mm (torch 2.13, CPU) crashes or returns garbage when K % 16 != 0
INT4PACK_N_ALIGN = 16  # _convert_weight_to_int4pack_for_cpu requires N % 16 == 0


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x [M, K] @ w [N, K].T -> [M, N] in x.dtype."""
    if isinstance(w, QuantWeight):
        return quant_linear(x, w)
    if x.device.type == "cpu" and 0 < x.shape[0] <= MAX_M:
        return _cpu_few_rows(x, w)
    return F.linear(x, w)


def _cpu_few_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    (N, K), M = w.shape, x.shape[0]
    if not w.is_contiguous():  # pieces are views of the weight's rows
        return torch.mm(w, x.t()).t().contiguous()
    threads = torch.get_num_threads()
    pieces = next((p for p in (2 * threads, threads) if N % p == 0), 1)
    y = torch.bmm(w.view(pieces, N // pieces, K), x.t().expand(pieces, K, M))  # [pieces, N / pieces, M]
    return y.view(N, M).t().contiguous()


# ---- quantized ------------------------------------------------------------------------------------------------------
def quant_linear_reference(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    return F.linear(x, qw.dequantize(x.dtype))


def _int8_cpu_pack(qw: QuantWeight):
    if "int8_cpu" not in qw._packed:
        N, K = qw.shape
        Ka = _cdiv(K, INT8PACK_K_ALIGN) * INT8PACK_K_ALIGN
        q = F.pad(qw.qweight, (0, Ka - K)).contiguous() if Ka != K else qw.qweight.contiguous()
        qw._packed["int8_cpu"] = (q, qw.scales.to(torch.bfloat16), Ka)
    return qw._packed["int8_cpu"]


def _int4_cpu_pack(qw: QuantWeight):
    if "int4_cpu" not in qw._packed:
        N, K = qw.shape
        Na = _cdiv(N, INT4PACK_N_ALIGN) * INT4PACK_N_ALIGN
        u = (qw.int_values().to(torch.int32) + 8)  # [N, Kp] in 0..15, the layout torch's packer takes
        u = F.pad(u, (0, 0, 0, Na - N), value=8)  # padding rows: q = 0
        packed = torch._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
        s = F.pad(qw.scales, (0, 0, 0, Na - N))  # [Na, Kp / G]
        # torch's int4 format is w = (u - 8) * scale + zero; symmetric: zero = 0
        scale_zeros = torch.stack((s, torch.zeros_like(s)), dim=-1).transpose(0, 1).contiguous()  # [Kp/G, Na, 2]
        qw._packed["int4_cpu"] = (packed, scale_zeros.to(torch.bfloat16), u.shape[1])
    return qw._packed["int4_cpu"]


def quant_linear_cpu_decode(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """Small-M CPU path: torch's packed weight-only kernels with bf16 activations (fp32 accumulation inside)."""
    N, K = qw.shape
    xb = x.to(torch.bfloat16)
    if qw.mode == "int8":
        q, s, Ka = _int8_cpu_pack(qw)
        if Ka != K:
            xb = F.pad(xb, (0, Ka - K))
        y = torch._weight_int8pack_mm(xb.contiguous(), q, s)
    else:
        packed, scale_zeros, Kp = _int4_cpu_pack(qw)
        if Kp != K:
            xb = F.pad(xb, (0, Kp - K))
        y = torch._weight_int4pack_mm_for_cpu(xb.contiguous(), packed, qw.group_size, scale_zeros)[:, :N]
    return y.to(x.dtype)


def _has_cpu_kernels(mode: str) -> bool:
    if mode == "int8":
        return hasattr(torch, "_weight_int8pack_mm")
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def quant_linear(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """x [M, K] @ W.T for a quantized W [N, K]: [M, N] in x.dtype, on the kernel family qw.backend names."""
    _check(isinstance(qw, QuantWeight) and qw.mode in MODES, "qw must be a QuantWeight (see quantize_weight)")
    _check(qw.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {qw.backend!r}")
    N, K = qw.shape
    _check(x.dim() == 2 and x.shape[1] == K, f"x must be [M, K={K}], got {tuple(x.shape)}")
    _check(x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x must be float32/16 or bf16, got {x.dtype}")
    _check(x.device == qw.qweight.device == qw.scales.device, "x and the quantized weight must be on one device")
    if qw.mode == "int8":
        _check(qw.qweight.dtype == torch.int8 and tuple(qw.qweight.shape) == (N, K), "int8 qweight must be int8 [N, K]")
        _check(tuple(qw.scales.shape) == (N,) and qw.scales.dtype == torch.float32, "int8 scales must be fp32 [N]")
    else:
        Kp = _cdiv(K, qw.group_size) * qw.group_size
        _check(qw.group_size == INT4_GROUP, f"int4 group_size must be {INT4_GROUP}")
        _check(qw.qweight.dtype == torch.uint8 and tuple(qw.qweight.shape) == (N, Kp // 2),
               "int4 qweight must be uint8 [N, Kp / 2]")
        _check(tuple(qw.scales.shape) == (N, Kp // qw.group_size) and qw.scales.dtype == torch.float32,
               "int4 scales must be fp32 [N, Kp / 128]")
    if qw.backend == "triton":
        _check(x.stride(-1) == 1 and qw.qweight.stride(-1) == 1, "x and qweight must be contiguous in their last dim")
        from . import triton_quant_linear
        return triton_quant_linear.quant_linear(x, qw)
    if x.device.type == "cpu" and 0 < x.shape[0] <= CPU_FAST_MAX_M and _has_cpu_kernels(qw.mode):
        return quant_linear_cpu_decode(x, qw)
    return quant_linear_reference(x, qw)
