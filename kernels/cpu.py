"""The C++ CPU kernels (kernels/cpu_kernels.cpp): compiled on first use by torch.utils.cpp_extension for this
machine (-march=native) and cached; if no compiler is there, ext() is None and callers keep their torch path.

Few-row products (a decode step), y = x @ W.T:
  gemv(x, w)          float weight [N, K] (bf16 or fp32)
  gemv_quant(x, qw)   int8 / int4 QuantWeight (x quantized per block of 128 to int8, VNNI dot products)
  grouped(...)        the same per group of rows, one weight per group: the routed experts of a MoE layer
The torch references are F.linear over the (dequantized) weight; tests compare against them."""
import os
import sys

import torch

_ext = None
_tried = False


def ext():
    global _ext, _tried
    if not _tried:
        _tried = True
        from torch.utils.cpp_extension import load
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cpp")
        try:
            _ext = load(name="mla_cpu_kernels", sources=[src], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                        extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # no compiler or headers: the torch paths serve
            print(f"mla: CPU kernels unavailable, using torch ops ({str(e).splitlines()[0] if str(e) else e!r})",
                  file=sys.stderr)
    return _ext


def streams(w) -> bool:
    """Whether the kernels take this weight: bf16 / fp32 tensors (contiguous) and CPU QuantWeights."""
    if isinstance(w, torch.Tensor):
        return w.dtype in (torch.bfloat16, torch.float32) and w.is_contiguous()
    return w.qweight.is_contiguous()


def _offsets(M: int, device) -> torch.Tensor:
    return torch.tensor([0, M], dtype=torch.int64, device=device)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K].T for a float weight: [M, N] in x.dtype."""
    return ext().grouped_gemv_float(x, _offsets(x.shape[0], x.device), w.unsqueeze(0)).to(x.dtype)


def gemv_quant(x: torch.Tensor, qw) -> torch.Tensor:
    """x [M, K] @ W.T for a 2-D QuantWeight: [M, N] in x.dtype."""
    int4 = qw.mode == "int4"
    xq, sx, sxsum = ext().quantize_rows(x, int4)
    y = ext().grouped_gemv_quant(xq, sx, sxsum, _offsets(x.shape[0], x.device), qw.qweight.unsqueeze(0),
                                 qw.scales.unsqueeze(0), qw.shape[1], int4)
    return y.to(x.dtype)


def grouped(x: torch.Tensor, offsets: torch.Tensor, w) -> torch.Tensor:
    """Rows offsets[g]:offsets[g + 1] of x times expert g of w (stacked float [E, N, K] or stacked QuantWeight):
    [M, N] float32."""
    if isinstance(w, torch.Tensor):
        return ext().grouped_gemv_float(x, offsets, w)
    int4 = w.mode == "int4"
    xq, sx, sxsum = ext().quantize_rows(x, int4)
    return ext().grouped_gemv_quant(xq, sx, sxsum, offsets, w.qweight, w.scales, w.shape[1], int4)


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
