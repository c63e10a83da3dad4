"""Weight-only quantized linear (kernels/weights.py, kernels/matmul.py): quantize/dequantize round trip, the Triton GEMM (split-K
forced off and on) and the CPU decode path against the dequantized reference, at awkward sizes (N, K no multiple of
a tile, K no multiple of the int4 group). On a CPU the Triton kernel runs in the interpreter in float32/float16;
bf16 and model-sized layers run on a GPU (marked gpu). Outputs and workspaces are poisoned with NaN first."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import kernels  # noqa: E402
from kernels import matmul as ql  # noqa: E402
from kernels import weights  # noqa: E402
from kernels import triton_quant_linear as tql  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
N, K = 100, 201  # N: one full and one partial 64-wide tile; K: odd, 1.57 K tiles of 128, int4 pads it to 256
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEV)


def assert_close_scaled(y, ref, rel):
    """|y - ref| <= rel * max|ref|: an error budget that scales with the output, as one of bf16 rounding does."""
    err = (y.double() - ref.double()).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max error {err} > {rel} * {ref.abs().max().item()}"


# ---------------------------------------------------------------- quantize / dequantize

def test_int8_round_trip_error_is_at_most_half_a_step():
    w = rand(N, K, seed=1) * torch.linspace(0.01, 3, N, device=DEV)[:, None]  # rows of very different ranges
    w[7] = 0  # an all-zero row: scale 0, no NaN
    qw = weights.quantize_weight(w, "int8")
    assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (N, K)
    assert qw.scales.dtype == torch.float32 and qw.scales.shape == (N,)
    assert qw.mode == "int8" and qw.shape == (N, K) and qw.group_size == K
    assert int(qw.qweight.abs().max()) <= 127
    deq = qw.dequantize(torch.float32)
    assert deq.shape == (N, K) and not deq.isnan().any() and bool((deq[7] == 0).all())
    bound = qw.scales[:, None] / 2 * (1 + 1e-5) + 1e-12
    assert bool(((deq - w).abs() <= bound).all())


@pytest.mark.parametrize("k", [256, 200, 70])
def test_int4_round_trip_error_is_at_most_half_a_step_per_group(k):
    w = rand(N, k, seed=2) * torch.linspace(0.01, 3, k, device=DEV)[None, :]  # groups of very different ranges
    qw = weights.quantize_weight(w, "int4")
    kp = -(-k // 128) * 128
    assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (N, kp // 2)
    assert qw.scales.dtype == torch.float32 and qw.scales.shape == (N, kp // 128)
    assert qw.mode == "int4" and qw.shape == (N, k) and qw.group_size == 128
    q = qw.int_values()
    assert q.shape == (N, kp) and int(q.abs().max()) <= 7 and bool((q[:, k:] == 0).all())  # padding quantizes to 0
    deq = qw.dequantize(torch.float32)
    assert deq.shape == (N, k)
    step = qw.scales.repeat_interleave(128, dim=1)[:, :k]  # [N, k]: the scale of each value's group
    assert bool(((deq - w).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all())


def test_int4_nibble_order():
    """k = 2i sits in the low nibble of byte i, k = 2i + 1 in the high one, each stored as q + 8."""
    w = torch.zeros(1, 128, device=DEV)
    w[0, 0], w[0, 1], w[0, 2] = 7.0, -7.0, 1.0
    qw = weights.quantize_weight(w, "int4")
    assert qw.qweight[0, 0].item() == (7 + 8) | ((-7 + 8) << 4)
    assert qw.qweight[0, 1].item() == (1 + 8) | (8 << 4)


# ---------------------------------------------------------------- Triton GEMM (interpreter on a CPU)

@pytest.mark.parametrize("split", [1, 2, 3])  # 3 > the two 128-wide K units of K = 201: one empty range
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("M", [1, 3, 17, 70])
def test_triton_quant_linear_matches_dequantized_reference(M, mode, dtype, split):
    qw = weights.quantize_weight(rand(N, K, seed=M), mode)
    x = rand(M, K, seed=M + 100, dtype=dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    ws = torch.full((max(split, 1), M, N), float("nan"), dtype=torch.float32, device=DEV)
    y = tql.quant_linear(x, qw, split_k=split, out=out, workspace=ws)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    ref = ql.quant_linear_reference(x.float(), qw)
    torch.testing.assert_close(y.float(), ref, **TOL[dtype])


def test_choose_split_k():
    # decode on an H100-like GPU: 1 x 32 tiles cannot fill 132 SMs, so K is cut into 128-value units
    s = weights.choose_split_k(1, 2048, 2816, 16, 64, num_sms=132)
    assert 1 < s <= 2816 // 128
    # 528 programs / 32 tiles asks for 17 ranges; 86 units at 6 per range make 15
    assert weights.choose_split_k(1, 2048, 10944, 16, 64, num_sms=132) == 15
    assert weights.choose_split_k(4096, 4096, 4096, 64, 128, num_sms=132) == 1  # prefill fills the GPU alone
    assert weights.choose_split_k(1, 64 * 132, 4096, 16, 64, num_sms=132) == 1
    assert weights.choose_split_k(1, 50, 100, 16, 64, num_sms=132) == 1  # one 128-value unit: nothing to split
    for M, n, k in [(1, 100, 200), (3, 2048, 1408), (17, 512, 5000), (70, 64, 4096)]:
        s = weights.choose_split_k(M, n, k, 16, 64, num_sms=132)
        units = -(-k // 128)
        per = -(-units // s)
        assert 1 <= s <= units and (s - 1) * per < units  # no empty range


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("M", [1, 70])
def test_triton_dispatch_picks_split_k_by_itself(M, mode):
    """The dispatch path (no forced split) with the rule's choice: split > 1 at this size on the interpreter's
    stand-in of 132 SMs, split 1 when the tiles fill them."""
    bm, bn = tql.tile_config(M, torch.device(DEV))[:2]
    assert weights.choose_split_k(M, N, K, bm, bn, num_sms=tql.split_sms(torch.device(DEV))) > 1
    assert weights.choose_split_k(M, N, K, bm, bn, num_sms=1) == 1
    qw = weights.quantize_weight(rand(N, K, seed=7), mode, backend="triton")
    x = rand(M, K, seed=8)
    y = kernels.quant_linear(x, qw)
    torch.testing.assert_close(y, ql.quant_linear_reference(x, qw), **TOL[torch.float32])


def test_quant_linear_checks_arguments():
    qw = weights.quantize_weight(rand(N, K), "int8")
    with pytest.raises(ValueError, match="x must be"):
        kernels.quant_linear(rand(2, K + 1), qw)
    with pytest.raises(ValueError, match="backend"):
        weights.quantize_weight(rand(N, K), "int8", backend="cuda")
    with pytest.raises(ValueError, match="mode"):
        weights.quantize_weight(rand(N, K), "int3")


# ---------------------------------------------------------------- the torch backend (CPU decode fast path)

@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("M,n,k", [(1, 100, 201), (3, 50, 70), (16, 2048, 2816), (17, 100, 201), (40, 64, 256),
                                   (40, 2100, 130)])
def test_torch_backend_matches_reference(M, n, k, mode, xdtype, monkeypatch):
    """On a CPU, M <= 16 streams the weight through the C++ kernels (activations quantized per block of 128);
    larger M dequantizes blocks of rows to bf16 into the GEMM (2100 rows: three blocks). Tolerance: the
    activations' int8 or bf16 rounding."""
    from kernels import cpu
    calls = []
    if DEV == "cpu" and cpu.ext() is not None:
        real = cpu.gemv
        monkeypatch.setattr(cpu, "gemv", lambda *a: calls.append(1) or real(*a))
    qw = weights.quantize_weight(rand(n, k, seed=k), mode)
    x = rand(M, k, seed=M, dtype=xdtype)
    y = kernels.quant_linear(x, qw)
    assert y.shape == (M, n) and y.dtype == xdtype
    assert bool(calls) == (DEV == "cpu" and cpu.ext() is not None and M <= kernels.FEW_ROWS)  # the intended path
    assert_close_scaled(y, ql.quant_linear_reference(x.float(), qw), 2e-2)


# ---------------------------------------------------------------- GPU: bf16 at model sizes

@gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("M", [1, 16, 300])
@pytest.mark.parametrize("n,k", [(2048, 2816), (3072, 2048), (2048, 1408)])
def test_triton_quant_linear_bf16(M, n, k, mode):
    qw = weights.quantize_weight(torch.randn(n, k, device=DEV) / k ** 0.5, mode, backend="triton")
    x = torch.randn(M, k, device=DEV, dtype=torch.bfloat16)
    y = kernels.quant_linear(x, qw)
    ref = ql.quant_linear_reference(x.float(), qw)
    assert_close_scaled(y, ref, 2e-2)
    for split in (1, 4):
        assert_close_scaled(tql.quant_linear(x, qw, split_k=split), ref, 2e-2)
