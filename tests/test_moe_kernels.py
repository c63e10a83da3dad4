"""Routed-expert MoE (kernels/moe.py): the torch reference and the Triton grouped GEMM against a dense per-token loop
in float64. On a CPU the Triton kernels run in the interpreter (float32 and float16 only: it computes bf16 tl.dot
wrongly) at small, awkward sizes: D and I not multiples of any tile, experts without tokens, k = 1, 2, 3.
bf16 and DeepSeek-sized layers run on a GPU (marked gpu)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import kernels  # noqa: E402
from kernels import triton_moe  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
E, D, I = 8, 72, 40  # D = 2 * 32 + 8, I = 32 + 8: every K loop ends on a partial tile; D > 64: two N tiles
EMPTY = (1, 4, 6)  # experts that no token picks


def dense_moe(x, ids, weights, w13, w2):
    """The definition, one (token, expert) pair at a time, in float64."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    half = w13.shape[1] // 2
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = w13[e] @ x[t]
            h = torch.nn.functional.silu(gu[:half]) * gu[half:]
            out[t] += float(weights[t, j]) * (w2[e] @ h)
    return out


def make_layer(T, k, dtype, n_experts=E, d=D, i=I, empty=EMPTY, seed=0):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(n_experts) if e not in empty])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(T)])  # distinct per token
    weights = torch.rand(T, k, generator=g) + 0.1
    x = torch.randn(T, d, generator=g)
    w13 = torch.randn(n_experts, 2 * i, d, generator=g) / d ** 0.5
    w2 = torch.randn(n_experts, d, i, generator=g) / i ** 0.5
    return (x.to(dtype).to(DEV), ids.long().to(DEV), weights.float().to(DEV), w13.to(dtype).to(DEV),
            w2.to(dtype).to(DEV))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("T", [1, 7, 37])
def test_moe_experts_matches_dense_loop(T, k, dtype, backend):
    x, ids, weights, w13, w2 = make_layer(T, k, dtype, seed=T * 10 + k)
    out = kernels.moe_experts(x, ids, weights, w13, w2, backend=backend)
    assert out.shape == (T, D) and out.dtype == dtype
    ref = dense_moe(x, ids, weights, w13, w2)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,k", [(1, 3), (7, 2), (37, 1)])
def test_triton_moe_writes_every_row_of_its_workspaces(T, k, dtype):
    """The two workspaces start as NaN: a row the kernels fail to write would poison the output."""
    x, ids, weights, w13, w2 = make_layer(T, k, dtype, seed=T + k)
    h = torch.full((T * k, I), float("nan"), dtype=dtype, device=DEV)
    part = torch.full((T * k, D), float("nan"), dtype=torch.float32, device=DEV)
    out = triton_moe.moe_experts(x, ids, weights, w13, w2, h=h, part=part)
    assert not h.isnan().any() and not part.isnan().any()
    torch.testing.assert_close(out.double(), dense_moe(x, ids, weights, w13, w2), **TOL[dtype])


@pytest.mark.parametrize("T,k,n_experts", [(70, 2, 3), (100, 2, 2)])
def test_triton_moe_crowded_experts(T, k, n_experts):
    """Many pairs per expert pick the larger M tiles (32, 64 rows); runs of several M blocks per expert."""
    x, ids, weights, w13, w2 = make_layer(T, k, torch.float32, n_experts=n_experts, empty=(), seed=3)
    bm = triton_moe.tile_config(T * k, n_experts, D, I, x.device)[0]
    assert bm > 16
    out = kernels.moe_experts(x, ids, weights, w13, w2, backend="triton")
    torch.testing.assert_close(out.double(), dense_moe(x, ids, weights, w13, w2), **TOL[torch.float32])


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_by_expert(block_m):
    T, k = 37, 3
    _, ids, _, _, _ = make_layer(T, k, torch.float32, seed=5)
    sorted_ids, block_expert = triton_moe.align_by_expert(ids, E, block_m)
    P = T * k
    assert sorted_ids.numel() == block_expert.numel() * block_m
    real = sorted_ids[sorted_ids < P]
    assert sorted(real.tolist()) == list(range(P))  # every pair exactly once
    flat = ids.flatten()
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_ids[b * block_m:(b + 1) * block_m]
        rows = rows[rows < P]
        if e == E:  # past the padded total: padding only
            assert rows.numel() == 0
        else:
            assert e not in EMPTY and rows.numel() > 0 and bool((flat[rows.long()] == e).all())
            assert rows.tolist() == sorted(rows.tolist())  # pairs keep token order within an expert


def test_moe_experts_checks_arguments():
    x, ids, weights, w13, w2 = make_layer(3, 2, torch.float32)
    with pytest.raises(ValueError, match="topk_ids"):
        kernels.moe_experts(x, ids.int(), weights, w13, w2)
    with pytest.raises(ValueError, match="topk_weights"):
        kernels.moe_experts(x, ids, weights.half(), w13, w2)
    with pytest.raises(ValueError, match="w2"):
        kernels.moe_experts(x, ids, weights, w13, w2[:, :, :-1])
    with pytest.raises(ValueError, match="dtype"):
        kernels.moe_experts(x.half(), ids, weights, w13, w2)
    with pytest.raises(ValueError, match="backend"):
        kernels.moe_experts(x, ids, weights, w13, w2, backend="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 5, 300])
def test_triton_moe_bf16_deepseek_lite_sizes(T):
    """DeepSeek-V2-Lite's routed experts (64 experts, top 6, hidden 2048, intermediate 1408) in bf16."""
    torch.manual_seed(T)
    nE, k, d, i = 64, 6, 2048, 1408
    x = torch.randn(T, d, device=DEV, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(nE, device=DEV)[:k] for _ in range(T)])
    weights = torch.rand(T, k, device=DEV).softmax(-1)
    w13 = (torch.randn(nE, 2 * i, d, device=DEV) / d ** 0.5).bfloat16()
    w2 = (torch.randn(nE, d, i, device=DEV) / i ** 0.5).bfloat16()
    out = kernels.moe_experts(x, ids, weights, w13, w2, backend="triton")
    ref = kernels.moe_experts(x.float(), ids, weights, w13.float(), w2.float(), backend="torch")
    torch.testing.assert_close(out.float(), ref, **TOL[torch.bfloat16])


def test_triton_moe_chunks_long_prompts(monkeypatch):
    """Past the workspace bound the tokens run in chunks (here of 6 tokens); the result does not change."""
    x, ids, weights, w13, w2 = make_layer(37, 2, torch.float32, seed=11)
    monkeypatch.setattr(triton_moe, "WORKSPACE_BYTES", 6 * 2 * (4 * D + 4 * I))
    out = kernels.moe_experts(x, ids, weights, w13, w2, backend="triton")
    torch.testing.assert_close(out.double(), dense_moe(x, ids, weights, w13, w2), **TOL[torch.float32])


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,k,d,i", [(1, 2, D, I), (7, 3, D, I), (37, 2, 200, 136)])  # 200, 136: two int4 groups
def test_quantized_experts_match_their_dequantized_weights(T, k, d, i, dtype, mode):
    """Weight-only int8 / int4 experts (kernels.quantize_experts): the Triton grouped GEMM dequantizes its tiles in
    registers, the torch path runs each expert's QuantWeight; both equal the dense loop over the dequantized
    weights."""
    from kernels import quantize_experts
    x, ids, weights, w13, w2 = make_layer(T, k, dtype, d=d, i=i, seed=T + k)
    q13, q2 = quantize_experts(w13.float(), mode), quantize_experts(w2.float(), mode)
    assert q13.qweight.shape[0] == E and len(q13) == E
    ref = dense_moe(x, ids, weights, torch.stack([q.dequantize(dtype) for q in q13]),
                    torch.stack([q.dequantize(dtype) for q in q2]))
    for backend in ("torch", "triton"):
        out = kernels.moe_experts(x, ids, weights, q13, q2, backend=backend)
        assert out.shape == (T, d) and out.dtype == dtype
        if backend == "torch" and DEV == "cpu":
            # the C++ kernels quantize the activations to int8 per block of 128 (kernels/cpu_gemv.cpp), here
            # twice (x, then silu(gate) * up): about 1% of the output's norm, not of each element
            err = (out.double() - ref).abs().max() / ref.abs().max()
            assert err < 0.03 and (out.double() - ref).norm() / ref.norm() < 0.02, err
        else:
            torch.testing.assert_close(out.double(), ref, **TOL[dtype])


def test_quantized_experts_are_each_quantized_on_their_own():
    from kernels import quantize_experts, quantize_weight
    w = torch.randn(3, 20, 130)
    for mode in ("int8", "int4"):
        q = quantize_experts(w, mode)
        for e in range(3):
            alone = quantize_weight(w[e], mode)
            assert torch.equal(q[e].qweight, alone.qweight) and torch.equal(q[e].scales, alone.scales)
            assert q[e].qweight.data_ptr() == q.qweight[e].data_ptr()  # views of the stacked tensor
