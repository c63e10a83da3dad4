"""linear(x, w): x @ w.T for every weight the model holds, a float tensor or a QuantWeight (kernels/weights.py),
which carries the kernel family that reads it.

On the CPU (the torch backend), by the rows of x:
  few rows (a decode step, M <= CPU_FEW_ROWS): the C++ kernels (kernels/cpu.py) stream each weight once at the read
      rate of the machine, for bf16, fp32, int8 and int4 weights alike; torch's own gemv and packed weight-only
      kernels reached 13-16 GB/s where a plain sum reads 30-55 (medians in the issue note).
  many rows (a prompt): float weights go to F.linear (oneDNN's bf16 GEMM, about 400 GFLOP/s here); a quantized
      weight is dequantized to bf16 one block of DEQUANT_ROWS rows at a time into the same GEMM. Measured against
      int8 x int8 (torch._int_mm on activations quantized per row): as fast or faster at V2-Lite's shapes (M 512 and
      4096: 390-410 against 240-520 GFLOP/s) and 3.5x more accurate (0.23% against 0.84% relative error).
Elsewhere (no C++ kernels, CUDA with backend torch): F.linear over the dequantized weight, the reference.
"triton" weights run kernels/triton_quant_linear.py (dequantizes tiles in registers, split-K for small M)."""
import torch
import torch.nn.functional as F

from . import cpu
from .weights import BACKENDS, INT4_GROUP, MODES, QuantWeight, cdiv as _cdiv, check_arg as _check

CPU_FEW_ROWS = 16  # rows up to which the CPU streams the weight (decode); above, a GEMM
DEQUANT_ROWS = 1024  # weight rows dequantized at a time for the prefill GEMM


def _cpu_few_rows(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and 0 < x.shape[0] <= CPU_FEW_ROWS and cpu.ext() is not None


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x [M, K] @ w [N, K].T -> [M, N] in x.dtype."""
    if isinstance(w, QuantWeight):
        return quant_linear(x, w)
    if _cpu_few_rows(x) and cpu.streams(w):
        return cpu.gemv(x, w)
    return F.linear(x, w)


def quant_linear_reference(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    return F.linear(x, qw.dequantize(x.dtype))


def _dequantized_gemm(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """Prefill on the CPU: the weight dequantized block by block of rows (never all of it at once) into the GEMM in
    x's dtype; bf16 blocks by the C++ kernel, other dtypes by QuantWeight.dequantize."""
    N, K = qw.shape
    y = x.new_empty(x.shape[0], N)
    bf16 = x.dtype == torch.bfloat16
    buf = torch.empty(min(N, DEQUANT_ROWS) * K, dtype=torch.bfloat16) if bf16 else None
    for n0 in range(0, N, DEQUANT_ROWS):
        n1 = min(N, n0 + DEQUANT_ROWS)
        if bf16:
            w = buf[:(n1 - n0) * K].view(n1 - n0, K)
            cpu.ext().dequantize(qw.qweight[n0:n1], qw.scales[n0:n1], K, qw.mode == "int4", w)
        else:
            w = qw.rows(n0, n1).dequantize(x.dtype)
        y[:, n0:n1] = x @ w.t()
    return y


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
    if _cpu_few_rows(x):
        return cpu.gemv(x, qw)
    if x.device.type == "cpu" and qw.qweight.is_contiguous() and cpu.ext() is not None:
        return _dequantized_gemm(x, qw)
    return quant_linear_reference(x, qw)
