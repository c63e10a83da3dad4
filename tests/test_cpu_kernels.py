"""The C++ CPU kernels (kernels/cpu_kernels.cpp) against their plain-torch references (kernels/cpu.py), at sizes
that are no multiple of any block: K not a multiple of 128 or 32, odd N, 1..17 rows of x (tiles of 4 rows), and
experts of 0 to 7 rows. The C++ fills its outputs with NaN before writing, and dequantize writes into a poisoned
buffer, so an element left unwritten fails."""
import pytest
import torch
import torch.nn.functional as F

from kernels import cpu
from kernels.weights import quantize_weight

pytestmark = pytest.mark.skipif(cpu.ext() is None, reason="no C++ compiler for the CPU kernels")

SHAPES = [(1, 37, 201), (3, 64, 2048), (5, 130, 1408), (16, 9, 10944 // 8), (17, 33, 65)]


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_float_gemv_matches_linear(M, N, K, dtype):
    x, w = rand(M, K, seed=1, dtype=dtype), rand(N, K, seed=2, dtype=dtype) / K ** 0.5
    y = cpu.gemv(x, w)
    ref = F.linear(x.double(), w.double())
    assert y.dtype == dtype and y.shape == (M, N)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("interleave", [False, True])
def test_quantize_rows_matches_reference(interleave):
    x = rand(5, 300, seed=3) * torch.logspace(-3, 2, 300)
    x[2] = 0  # an all-zero row keeps a finite scale
    for got, want in zip(cpu.ext().quantize_rows(x, interleave), cpu.quantize_rows_reference(x, interleave)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_quant_gemv_matches_reference(M, N, K, mode):
    x, w = rand(M, K, seed=4), rand(N, K, seed=5) / K ** 0.5
    qw = quantize_weight(w, mode)
    y = cpu.gemv_quant(x, qw)
    want = cpu.gemv_quant_reference(x, qw)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    exact = F.linear(x, qw.dequantize())  # the activation quantization (blocks of 128) costs little
    assert (y - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int4"])
def test_grouped_rows_per_expert(kind):
    E, N, K = 5, 23, 300
    counts = torch.tensor([2, 0, 7, 1, 0])  # experts without rows are skipped
    offsets = torch.cat((torch.zeros(1, dtype=torch.int64), counts.cumsum(0)))
    x, w = rand(int(counts.sum()), K, seed=6), rand(E, N, K, seed=7) / K ** 0.5
    stack = w.to(torch.bfloat16) if kind == "bfloat16" else quantize_weight(w, kind)
    y = cpu.grouped(x, offsets, stack)
    for e in range(E):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        if kind == "bfloat16":
            want = F.linear(x[rows].to(torch.bfloat16).double(), stack[e].double()).float()
        else:
            want = cpu.gemv_quant_reference(x[rows], stack[e])
        torch.testing.assert_close(y[rows], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("N,K", [(7, 201), (33, 2048), (3, 31)])
def test_dequantize_matches_reference(N, K, mode):
    qw = quantize_weight(rand(N, K, seed=8), mode)
    out = torch.full((N, K), float("nan"), dtype=torch.bfloat16)
    cpu.ext().dequantize(qw.qweight, qw.scales, K, mode == "int4", out)
    torch.testing.assert_close(out, qw.dequantize(torch.bfloat16), atol=0, rtol=0)
