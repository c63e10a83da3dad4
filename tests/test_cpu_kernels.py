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
    y = cpu.gemv(x, w, out=torch.full((M, N), float("nan"), dtype=dtype))
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
    y = cpu.gemv_quant(x, qw, out=torch.full((M, N), float("nan")))
    want = cpu.gemv_quant_reference(x, qw)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    exact = F.linear(x, qw.dequantize())  # the activation quantization (blocks of 128) costs little
    assert (y - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "int4"])
def test_grouped_rows_per_expert(kind):
    E, N, K = 5, 23, 300
    counts = torch.tensor([2, 0, 7, 1, 0])  # experts without rows are skipped
    offsets = [0] + counts.cumsum(0).tolist()
    x, w = rand(int(counts.sum()), K, seed=6), rand(E, N, K, seed=7) / K ** 0.5
    stack = w.to(torch.bfloat16) if kind == "bfloat16" else quantize_weight(w, kind)
    y = cpu.grouped(x, offsets, stack, out=torch.full((len(x), N), float("nan")))
    for e in range(E):
        rows = slice(offsets[e], offsets[e + 1])
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


# ---- absorbed attention -------------------------------------------------------------------------------------------
def paged_batch(q_lens, prefix_lens, H, R, DR, BS, dtype, seed=0):
    """Latents of each sequence in shuffled blocks of a paged cache (unwritten slots NaN), queries, metadata."""
    g = torch.Generator().manual_seed(seed)
    lens = [q + p for q, p in zip(q_lens, prefix_lens)]
    need = [-(-L // BS) for L in lens]
    perm = torch.randperm(sum(need) + 2, generator=g).tolist()
    cache = torch.full((sum(need) + 2, BS, R + DR), float("nan"))
    tables, i = [], 0
    for L, n in zip(lens, need):
        t = perm[i:i + n]
        i += n
        tables.append(t + [0] * (max(need) - n))
        for p in range(L):
            cache[t[p // BS], p % BS] = torch.randn(R + DR, generator=g)
    T = sum(q_lens)
    return dict(q_lat=torch.randn(T, H, R, generator=g).to(dtype) * R ** -0.5,
                q_pe=torch.randn(T, H, DR, generator=g).to(dtype),
                kv_cache=cache.to(dtype), block_tables=torch.tensor(tables, dtype=torch.int32),
                cu_seqlens_q=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32),
                seq_lens=torch.tensor(lens, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_lens,prefix_lens,H,R,DR,BS", [
    ([1], [700], 16, 512, 64, 64),  # one long sequence: split over the threads, merged
    ([1, 3, 1], [21, 9, 0], 3, 40, 8, 4),  # odd widths, several queries (causal among them), an empty prefix
    ([2, 1], [300, 33], 20, 48, 16, 16),  # more heads than one vector of 16
])
def test_decode_attention_matches_reference(q_lens, prefix_lens, H, R, DR, BS, dtype):
    from kernels import reference
    from kernels.cache_format import float_format
    b = paged_batch(q_lens, prefix_lens, H, R, DR, BS, dtype)
    out = cpu.mla_decode(**b, softmax_scale=0.2, fmt=float_format(b["kv_cache"], R, DR))
    want = reference.mla_decode(**{k: (v.double() if v.is_floating_point() else v) for k, v in b.items()},
                                softmax_scale=0.2)
    assert out.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def test_decode_attention_on_an_int8_cache():
    from kernels import cache_format, reference
    from kernels.cache_format import CacheFormat
    b = paged_batch([1, 2], [50, 7], 4, 64, 16, 8, torch.bfloat16, seed=1)
    fmt = CacheFormat("int8", 64, 16, torch.bfloat16)
    flat = b["kv_cache"].view(-1, 80)
    written = (~flat.isnan().any(-1)).nonzero()[:, 0]
    packed = torch.zeros(*b["kv_cache"].shape[:2], fmt.width, dtype=torch.uint8)
    cache_format.write_latent(packed, written, flat[written, :64], flat[written, 64:], fmt)
    out = cpu.mla_decode(**{**b, "kv_cache": packed}, softmax_scale=0.3, fmt=fmt)
    dense, tables = cache_format.unpack(packed, b["block_tables"], b["seq_lens"], fmt, torch.float64)
    want = reference.mla_decode(b["q_lat"].double(), b["q_pe"].double(), dense, tables, b["cu_seqlens_q"],
                                b["seq_lens"], 0.3)
    torch.testing.assert_close(out.double(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_matmul(transpose_w, dtype):
    T, H, A, B = 3, 5, 37, 70
    x = rand(T, H, A, seed=9, dtype=dtype)
    w = rand(H, B, A, seed=10, dtype=dtype) if transpose_w else rand(H, A, B, seed=10, dtype=dtype)
    y = cpu.head_matmul(x, w, transpose_w)
    wt = w.double().transpose(1, 2) if transpose_w else w.double()
    want = torch.bmm(x.double().transpose(0, 1), wt).transpose(0, 1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), want, atol=tol * A ** 0.5, rtol=tol)


# ---- the glue between products --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_silu_mul_and_rope_match_references(dtype):
    from kernels import reference
    x, w = rand(7, 203, seed=11, dtype=dtype), rand(203, seed=12, dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(cpu.ext().rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), **tol)
    torch.testing.assert_close(cpu.ext().silu_mul(x[:, :202]), reference.silu_mul(x[:, :202]), **tol)
    positions = torch.tensor([5, 0, 17, 3, 3, 40, 1])
    cos, sin = rand(50, 6, seed=13), rand(50, 6, seed=14)
    for interleave in (True, False):
        q = rand(7, 3, 20, seed=15, dtype=dtype)
        view = q[:, :, 8:]  # the rope part of a wider row: strided, as q_pe is
        want = reference.rope(view.clone(), positions, cos, sin, interleave)
        cpu.ext().rope_(view, positions, cos, sin, interleave)
        torch.testing.assert_close(view, want, **tol)
        assert torch.equal(q[:, :, :8], rand(7, 3, 20, seed=15, dtype=dtype)[:, :, :8])  # the rest untouched
