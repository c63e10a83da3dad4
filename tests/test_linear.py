"""kernels.linear on the CPU: the few-row decode path (weight cut into pieces, batched w @ x.T) equals F.linear."""
import pytest
import torch
import torch.nn.functional as F

import kernels


@pytest.mark.parametrize("N", [1, 7, 30, 64, 258])  # odd, even but not a multiple of 4, multiples of 4
@pytest.mark.parametrize("M", [1, 2, 5, 16, 17])  # 17: past MAX_M, F.linear itself
def test_cpu_few_rows_equals_f_linear(N, M):
    g = torch.Generator().manual_seed(N * 100 + M)
    x, w = torch.randn(M, 37, generator=g), torch.randn(N, 37, generator=g)
    y = kernels.linear(x, w)
    assert y.shape == (M, N) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_cpu_few_rows_noncontiguous_weight_and_bf16():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 64, generator=g).t()  # [64, 37], a transposed view
    x = torch.randn(3, 37, generator=g)
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    xb, wb = x.bfloat16(), torch.randn(64, 37, generator=g).bfloat16()
    y = kernels.linear(xb, wb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(xb.float(), wb.float()), rtol=2e-2, atol=2e-2)
