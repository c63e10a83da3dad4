"""The products of the torch and CPU backends (kernels/backend.py) for a weight-only quantized weight (QuantWeight,
kernels/weights.py): the reference (F.linear over the dequantized weight) and the two CPU prompt paths, each working
one block of DEQUANT_ROWS weight rows at a time (as does widened_gemm, for bf16 weights under a float32 model):
  dequantized_gemm  the weight dequantized to the model dtype into oneDNN's float GEMM: with AMX (bf16 models, a
                    GEMM of ~2 TFLOP/s on 2 cores, bench/results/cpu-vs-llamacpp/README.md), and more accurate.
  int8_gemm         int8 x int8 (torch._int_mm): activations quantized per row, the weight as int8 rows. Where the
                    CPU has VNNI but no AMX, the model runs in float32, whose GEMM is about 4x slower than the int8
                    one (bench/results/cpu-xeon-noamx-2026-12-06.md, cpu-xeon-avx512bf16-2026-12-07.md).
EngineConfig.prefill_gemm chooses between them once. Few-row products (a decode step) stream the weight through the C++
kernels instead (kernels/cpu.py); the Triton GEMM is kernels/triton_quant_linear.py."""
import torch
import torch.nn.functional as F

from . import cpu
from .weights import BACKENDS, INT4_GROUP, MODES, QuantWeight, cdiv as _cdiv, check_arg as _check

DEQUANT_ROWS = 1024  # weight rows dequantized at a time for the prefill GEMM


def quant_linear_reference(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    return F.linear(x, qw.dequantize(x.dtype))


def _gemm_by_blocks(x: torch.Tensor, N: int, K: int, fill) -> torch.Tensor:
    """x @ W.T for a weight W [N, K] made in x's dtype DEQUANT_ROWS rows at a time (never all of it at once) by
    fill(n0, n1, out), into one buffer."""
    y = x.new_empty(x.shape[0], N)
    buf = torch.empty(min(N, DEQUANT_ROWS) * K, dtype=x.dtype, device=x.device)
    for n0 in range(0, N, DEQUANT_ROWS):
        n1 = min(N, n0 + DEQUANT_ROWS)
        w = buf[:(n1 - n0) * K].view(n1 - n0, K)
        fill(n0, n1, w)
        y[:, n0:n1] = x @ w.t()
    return y


def dequantized_gemm(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """Prefill on the CPU: the weight dequantized block by block into the GEMM in x's dtype; bf16 and float32 blocks
    by the C++ kernel, float16 by QuantWeight.dequantize."""
    if x.dtype in (torch.bfloat16, torch.float32):
        return _gemm_by_blocks(x, *qw.shape, lambda n0, n1, w: cpu.dequantize(qw.rows(n0, n1), w))
    return _gemm_by_blocks(x, *qw.shape, lambda n0, n1, w: w.copy_(qw.rows(n0, n1).dequantize(x.dtype)))


def widened_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for a float weight stored in a narrower dtype than x's (bf16 under a float32 model), widened block by
    block: the float32 product of the same values."""
    return _gemm_by_blocks(x, *w.shape, lambda n0, n1, out: out.copy_(w[n0:n1]))


def int8_gemm(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """Prefill on the CPU, int8 x int8: x (float32) quantized per row once; int8 weights multiply as stored, int4
    ones are requantized per row (kernels/cpu.py int8_gemm_reference defines the result)."""
    N, K = qw.shape
    xq, sx = cpu.quantize_tokens(x)
    y = x.new_empty(x.shape[0], N)
    if qw.mode == "int4":
        buf, sbuf = torch.empty(min(N, DEQUANT_ROWS), K, dtype=torch.int8), torch.empty(min(N, DEQUANT_ROWS))
    for n0 in range(0, N, DEQUANT_ROWS):
        n1 = min(N, n0 + DEQUANT_ROWS)
        if qw.mode == "int8":
            wq, sw = qw.qweight[n0:n1], qw.scales[n0:n1]
        else:
            wq, sw = buf[:n1 - n0], sbuf[:n1 - n0]
            cpu.requantize_rows(qw.rows(n0, n1), wq, sw)
        cpu.scale_int32(torch._int_mm(xq, wq.t()), sx, sw, y[:, n0:n1])
    return y


def check_quant(x: torch.Tensor, qw: QuantWeight):
    """The arguments of a product with a quantized weight, as every backend takes them."""
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
