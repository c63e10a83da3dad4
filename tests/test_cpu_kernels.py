"""The C++ CPU kernels (kernels/cpu_*.cpp) against their plain-torch references (kernels/cpu.py), at sizes
that are no multiple of any block: K not a multiple of 128 or 32, odd N, 1..17 rows of x (tiles of 4 rows), and
experts picked by no token or by several. The C++ fills its outputs with NaN before writing, and dequantize writes
into a poisoned buffer, so an element left unwritten fails."""
import pytest
import torch
import torch.nn.functional as F

from kernels import cpu
from kernels.matmul import int8_gemm
from kernels.moe import Router
from kernels.weights import quantize_weight

pytestmark = pytest.mark.skipif(cpu.ext() is None, reason="no C++ compiler for the CPU kernels")

SHAPES = [(1, 37, 201), (3, 64, 2048), (5, 130, 1408), (16, 9, 10944 // 8), (17, 33, 65)]


def test_a_build_killed_midway_does_not_hang_the_next_start():
    """torch's build lock left by a killed build (the file "lock" in the build folder) is cleared, not waited on."""
    import os
    import subprocess
    import sys
    stale = os.path.join(cpu.build_dir(), "lock")
    open(stale, "w").close()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", "from kernels import cpu; assert cpu.ext() is not None"], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(stale)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_float_gemv_matches_linear(M, N, K, dtype, wdtype):
    """float32 x against bf16 weights (a float32 model's bf16 storage) is the float32 product of the widened weights:
    x is not rounded to bf16."""
    x, w = rand(M, K, seed=1, dtype=dtype), rand(N, K, seed=2, dtype=wdtype) / K ** 0.5
    y = cpu.gemv(x, w, out=torch.full((M, N), float("nan"), dtype=dtype))
    ref = F.linear(x.double(), w.double())
    assert y.dtype == dtype and y.shape == (M, N)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)


def test_bf16_rounding_is_torchs():
    """Floats rounded to bf16 in the C++ (16 at a time, then the tail) round as torch does, ties to even, subnormals
    kept (vcvtneps2bf16 would flush them: 2 ** -130 here), NaN kept: dequantized from an int8 weight of ones, each
    row of the bf16 result is its scale rounded."""
    from kernels.weights import QuantWeight
    scales = torch.cat([torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 ** -130, 3.0e38, 2 + 2 ** -7,
                                      float("nan")]), rand(6, seed=9)])
    N, K = len(scales), 53
    out = torch.full((N, K), float("nan"), dtype=torch.bfloat16)
    cpu.dequantize(QuantWeight(torch.ones(N, K, dtype=torch.int8), scales, "int8", (N, K), K), out)
    want = scales.to(torch.bfloat16)[:, None].expand(N, K)
    torch.testing.assert_close(out, want, atol=0, rtol=0, equal_nan=True)


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
    y = cpu.gemv(x, qw, out=torch.full((M, N), float("nan")))
    want = cpu.gemv_quant_reference(x, qw)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    exact = F.linear(x, qw.dequantize())  # the activation quantization (blocks of 128) costs little
    assert (y - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("N,K", [(7, 201), (33, 2048), (3, 31)])
def test_dequantize_matches_reference(N, K, mode, dtype):
    qw = quantize_weight(rand(N, K, seed=8), mode)
    out = torch.full((N, K), float("nan"), dtype=dtype)
    cpu.dequantize(qw, out)
    torch.testing.assert_close(out, qw.dequantize(dtype), atol=0, rtol=0)


# ---- the int8 x int8 prompt GEMM (kernels/matmul.py int8_gemm) ----------------------------------------------------
def test_quantize_tokens_matches_reference():
    x = rand(7, 301, seed=12) * torch.logspace(-3, 2, 301)
    x[3] = 0  # an all-zero row keeps a finite scale
    for got, want in zip(cpu.quantize_tokens(x), cpu.quantize_tokens_reference(x)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("N,K", [(7, 201), (33, 2048), (3, 31), (5, 300), (4, 384)])
def test_requantize_rows_matches_reference(N, K):
    """Bit for bit: whole groups through the table lookup, a short last group, rows whose largest value sits in the
    short group (row 1) or nowhere (row 2, all zeros)."""
    w = rand(N, K, seed=13)
    w[1, -1] = 50.0
    w[2] = 0
    qw = quantize_weight(w, "int4")
    out, scales = torch.full((N, K), 99, dtype=torch.int8), torch.full((N,), float("nan"))
    cpu.requantize_rows(qw, out, scales)
    want_q, want_s = cpu.quantize_tokens_reference(qw.dequantize())
    torch.testing.assert_close(out, want_q, atol=0, rtol=0)
    torch.testing.assert_close(scales, want_s, atol=0, rtol=0)


def test_scale_int32_writes_a_block_of_columns():
    acc = torch.randint(-2 ** 20, 2 ** 20, (5, 13), dtype=torch.int32)
    sx, sw = rand(5, seed=14), rand(13, seed=15)
    out = torch.full((5, 40), float("nan"))
    cpu.scale_int32(acc, sx, sw, out[:, 11:24])
    torch.testing.assert_close(out[:, 11:24], acc.float() * sx[:, None] * sw[None, :])
    assert out[:, :11].isnan().all() and out[:, 24:].isnan().all()  # nothing outside the block


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("M,N,K", [(17, 37, 201), (40, 1100, 300), (23, 9, 10944 // 8)])
def test_int8_gemm_matches_reference(M, N, K, mode):
    """N 1100: two blocks of DEQUANT_ROWS weight rows."""
    x, qw = rand(M, K, seed=16), quantize_weight(rand(N, K, seed=17) / K ** 0.5, mode)
    y = int8_gemm(x, qw)
    torch.testing.assert_close(y, cpu.int8_gemm_reference(x, qw), atol=1e-5, rtol=1e-5)
    exact = F.linear(x, qw.dequantize())  # the activations' quantization, one scale per row, costs about 1%
    assert (y - exact).norm() / exact.norm() < 0.02


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
    ([2, 1], [45, 0], 5, 37, 6, 8),  # a latent width that is no multiple of a vector (8 or 16 floats)
    ([3, 1], [77, 130], 20, 512, 64, 16),  # DeepSeek's row width (its own scores loop): runs cut at every cache
    # block, causal runs of any length, heads past a multiple of 8
])
def test_decode_attention_matches_reference(q_lens, prefix_lens, H, R, DR, BS, dtype):
    from kernels import reference
    from kernels.cache_format import float_format
    b = paged_batch(q_lens, prefix_lens, H, R, DR, BS, dtype)
    out = cpu.mla_decode(**b, softmax_scale=0.2, kind=cpu.cache_kind(float_format(b["kv_cache"], R, DR)))
    want = reference.mla_decode(**{k: (v.double() if v.is_floating_point() else v) for k, v in b.items()},
                                softmax_scale=0.2)
    assert out.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def test_decode_attention_keeps_a_float32_query_in_float32_over_a_bf16_cache():
    """A float32 model over a bf16 cache: the query and probabilities stay float32 (where the CPU has AVX512_BF16,
    a bf16 model's attention reads the cache by bf16 pair products instead), so the result is the float32 one."""
    from kernels import reference
    from kernels.cache_format import float_format
    b = paged_batch([2, 1], [300, 33], 20, 48, 16, 16, torch.float32, seed=3)
    b["kv_cache"] = b["kv_cache"].bfloat16()
    out = cpu.mla_decode(**b, softmax_scale=0.2, kind=cpu.cache_kind(float_format(b["kv_cache"], 48, 16)))
    want = reference.mla_decode(**{k: (v.double() if v.is_floating_point() else v) for k, v in b.items()},
                                softmax_scale=0.2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the query's and k_pe's dtype
@pytest.mark.parametrize("q_lens,prefix_lens,H,R,DR,BS", [
    ([1, 2], [50, 7], 4, 64, 16, 8),
    ([1, 2], [50, 7], 3, 36, 6, 8),  # widths that are no multiple of a vector
    ([2, 1], [45, 20], 20, 44, 6, 8),  # more heads than one vector of 16
    ([1, 3], [300, 61], 16, 512, 64, 16),  # DeepSeek's row (its own scores loop), split over the threads
    ([1, 2], [150, 45], 16, 512, 64, 64),  # runs of 64, 22, 47 keys: 4, 2 and 3 groups of 16 in a block
    ([2, 1], [100, 40], 20, 44, 6, 64),  # the same at odd widths, heads past 16
])
def test_decode_attention_on_an_int8_cache(q_lens, prefix_lens, H, R, DR, BS, dtype):
    """Over an int8 cache the scores take the query's latent part quantized to int8 per head as a prompt's
    activations are (kernels/cpu.py quantize_tokens_reference), and the values the probabilities as 16-bit fractions
    of their largest in a block: against the reference with that query, float32 is exact to about 1e-5 (the
    probabilities' rounding); against the unquantized query, the query's quantization moves the output by well
    under 1%."""
    from kernels import cache_format, reference
    from kernels.cache_format import CacheFormat
    b = paged_batch(q_lens, prefix_lens, H, R, DR, BS, dtype, seed=1)
    fmt = CacheFormat("int8", R, DR, dtype)
    flat = b["kv_cache"].view(-1, R + DR)
    written = (~flat.isnan().any(-1)).nonzero()[:, 0]
    packed = torch.zeros(*b["kv_cache"].shape[:2], fmt.width, dtype=torch.uint8)
    cache_format.write_latent(packed, written, flat[written, :R], flat[written, R:], fmt)
    out = cpu.mla_decode(**{**b, "kv_cache": packed}, softmax_scale=0.3, kind=cpu.cache_kind(fmt)).double()
    dense, tables = cache_format.unpack(packed, b["block_tables"], b["seq_lens"], fmt, torch.float64)

    def want(q_lat):
        return reference.mla_decode(q_lat.double(), b["q_pe"].double(), dense, tables, b["cu_seqlens_q"],
                                    b["seq_lens"], 0.3)

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()
    xq, sx = cpu.quantize_tokens_reference(b["q_lat"].reshape(-1, R))
    quantized, exact = want((xq.float() * sx[:, None]).view(b["q_lat"].shape)), want(b["q_lat"])
    if dtype == torch.float32:
        torch.testing.assert_close(out, quantized, atol=3e-4, rtol=1e-3)
        assert rel(out, quantized) < 1e-4 < rel(exact, quantized)  # the query quantization is the kernel's
    else:
        torch.testing.assert_close(out, quantized, atol=1e-2, rtol=1e-2)
    assert rel(out, exact) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_lens,prefix_lens,H,DN,V,R,DR", [
    ([1], [300], 16, 128, 128, 512, 64),  # V2-Lite's head shapes
    ([1, 2], [20, 6], 3, 37, 23, 40, 8),  # odd widths, two sequences, two queries in one
    ([2], [9], 9, 21, 11, 45, 3),  # widths that are no multiple of a vector
])
def test_absorbed_attention_in_one_call(q_lens, prefix_lens, H, DN, V, R, DR, dtype):
    """mla_absorbed = q_nope @ W_UK per head, mla_decode, @ W_UV.T per head (kernels.mla_absorbed's torch path)."""
    from kernels import reference
    from kernels.cache_format import float_format
    b = paged_batch(q_lens, prefix_lens, H, R, DR, 4, dtype, seed=2)
    T = sum(q_lens)
    q = rand(T, H, DN + DR, seed=16, dtype=dtype)  # q_nope and q_pe as views of one q, as the model has them
    q_nope, q_pe = q.split([DN, DR], dim=-1)
    w_uk, w_uv = rand(H, DN, R, seed=17, dtype=dtype) / DN ** 0.5, rand(H, V, R, seed=18, dtype=dtype) / R ** 0.5
    meta = {k: b[k] for k in ("kv_cache", "block_tables", "cu_seqlens_q", "seq_lens")}
    out = cpu.mla_absorbed(q_nope, q_pe, w_uk, w_uv, **meta, softmax_scale=0.1,
                           kind=cpu.cache_kind(float_format(b["kv_cache"], R, DR)))
    q_lat = torch.einsum("thn,hnr->thr", q_nope.double(), w_uk.double())
    o_lat = reference.mla_decode(q_lat, q_pe.double(), b["kv_cache"].double(), b["block_tables"],
                                 b["cu_seqlens_q"], b["seq_lens"], 0.1)
    want = torch.einsum("thr,hvr->thv", o_lat, w_uv.double())
    assert out.dtype == dtype and out.shape == (T, H, V)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "bf16-weights", "int8", "int4"])
@pytest.mark.parametrize("T,k,shared", [(1, 3, True), (4, 2, False), (6, 3, True)])
def test_moe_layer_in_one_call(T, k, shared, kind):
    """moe_decode: the routed experts (experts 1 and 4 picked by no token, others by several) and the shared
    experts, against the same products one pair at a time (the C++ GEMV's own reference for quantized weights;
    bf16-weights: bf16 weights under float32 x, the float32 products of the widened weights)."""
    E, D, I, Is = 6, 200, 72, 144  # no multiples of 128 (the activation blocks)
    g = torch.Generator().manual_seed(T * 10 + k)
    allowed = torch.tensor([0, 2, 3, 5])
    ids = torch.stack([allowed[torch.randperm(4, generator=g)[:k]] for _ in range(T)])
    topw = torch.rand(T, k, generator=g) + 0.1
    dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32  # quantized: float32 x, so no output rounding
    x = rand(T, D, seed=19, dtype=dtype)
    w13, w2 = rand(E, 2 * I, D, seed=20) / D ** 0.5, rand(E, D, I, seed=21) / I ** 0.5
    s13, s2 = rand(2 * Is, D, seed=22) / D ** 0.5, rand(D, Is, seed=23) / Is ** 0.5
    if kind in ("int8", "int4"):
        w13, w2, s13, s2 = (quantize_weight(w, kind) for w in (w13, w2, s13, s2))
        prod = cpu.gemv_quant_reference
    else:
        wdtype = torch.bfloat16 if kind == "bf16-weights" else dtype
        w13, w2, s13, s2 = (w.to(wdtype) for w in (w13, w2, s13, s2))
        prod = lambda v, w: F.linear(v.to(dtype).double(), w.double()).float()  # noqa: E731
    swiglu = lambda h: F.silu(h[:, :h.shape[1] // 2]) * h[:, h.shape[1] // 2:]  # noqa: E731
    want = torch.zeros(T, D)
    for t in range(T):
        xt = x[t:t + 1].float()
        for j in range(k):
            e = int(ids[t, j])
            want[t] += topw[t, j] * prod(swiglu(prod(xt, w13[e])), w2[e])[0]
        if shared:
            want[t] += prod(swiglu(prod(xt, s13)), s2)[0]
    out = cpu.moe_decode(x, ids, topw, w13, w2, (s13, s2) if shared else None)
    assert out.dtype == dtype and out.shape == (T, D)
    tol = {"float32": 1e-5, "bfloat16": 1e-2, "bf16-weights": 1e-5, "int8": 1e-3, "int4": 1e-3}[kind]  # bf16: the
    # output's rounding
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("T,k,E,D,I", [
    (40, 3, 7, 200, 77),  # one block of weight rows; int4: a group and a short one along D
    (33, 2, 5, 300, 150),  # 2I and D past a block of 256 rows (two GEMMs each); short groups along D and I
    (17, 6, 8, 256, 128),  # whole groups only; every token picks 6 of the 8 experts
])
def test_moe_prompt_matches_the_int8_gemm_products(T, k, E, D, I, mode):
    """moe_prompt, a prompt's routed experts in one call (experts run whole, one per thread), against the same
    layer made of int8_gemm's products (x quantized per token, the weight as int8 rows, the swiglu rows quantized
    per row): the products are exact integer sums, so only float32 rounding and silu's may differ. Expert 1 is
    picked by no token, expert 0 by most; the C++ fills the pairs' rows with NaN first."""
    from kernels.moe import moe_experts_reference
    g = torch.Generator().manual_seed(T + E)
    allowed = torch.tensor([e for e in range(E) if e != 1])
    ids = torch.stack([allowed[torch.randperm(E - 1, generator=g)[:k]] for _ in range(T)])
    ids[: T // 2, 0] = 0
    topw = torch.rand(T, k, generator=g) + 0.1
    x = rand(T, D, seed=24) * torch.logspace(-1, 1, D)
    w13 = quantize_weight(rand(E, 2 * I, D, seed=25) / D ** 0.5, mode)
    w2 = quantize_weight(rand(E, D, I, seed=26) / I ** 0.5, mode)
    out = cpu.moe_prompt(x, ids, topw, w13, w2)
    want = moe_experts_reference(x, ids, topw, w13, w2, cpu.int8_gemm_reference)
    assert out.dtype == torch.float32 and out.shape == (T, D)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    exact = moe_experts_reference(x, ids, topw, w13, w2, lambda v, w: F.linear(v, w.dequantize()))
    assert (out - exact).norm() / exact.norm() < 0.03  # the activations' int8 rounding, twice


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scoring,method,n_group,topk_group,norm,scale", [
    ("softmax", "greedy", 1, 1, False, 1.0),  # V2-Lite
    ("softmax", "group_limited_greedy", 8, 3, False, 16.0),  # V2
    ("sigmoid", "noaux_tc", 8, 4, True, 2.5),  # V3
    ("softmax", "greedy", 1, 1, True, 1.0),
])
def test_router_matches_reference(dtype, scoring, method, n_group, topk_group, norm, scale):
    from kernels import reference
    T, E, D, k = 5, 64, 203, 6
    x, gate, bias = rand(T, D, seed=21, dtype=dtype), rand(E, D, seed=22, dtype=dtype), rand(E, seed=23) * 0.1
    router = Router(k, scoring, method, n_group, topk_group, norm, scale)
    ids, w = cpu.ext().route(x, gate, bias, cpu.native_router(router))
    want_ids, want_w = reference.route(x, gate, bias, *router.args())
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_latent_matches_reference(dtype):
    from kernels import reference
    R, DR, T = 37, 10, 5
    kv = rand(T, R + DR + 3, seed=24)  # c_kv and k_pe as views of one wider row, as kv_a's output is
    c_kv, k_pe = kv[:, :R].to(dtype), kv[:, R + 3:]
    slots = torch.tensor([0, 9, 4, 22, 15])  # across blocks of 8, out of order
    got = torch.full((3, 8, R + DR), float("nan"), dtype=dtype)
    want = got.clone()
    cpu.ext().write_latent(got, slots, c_kv, k_pe)
    reference.write_latent(want, slots, c_kv, k_pe)
    torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)  # the other slots stay NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_latent_packed_int8_matches_reference(dtype):
    """The packed int8 row (cache_format.py): latent quantized per token, its scale, k_pe in the model dtype."""
    from kernels.cache_format import CacheFormat, write_latent
    R, DR, T = 36, 10, 5
    kv = rand(T, R + DR + 3, seed=25) * 3
    kv[2, :R] = 0  # an all-zero latent: scale 1
    kv[3, 5] = 40  # one outlier sets the token's scale
    c_kv, k_pe = kv[:, :R].to(dtype), kv[:, R + 3:].to(dtype)
    fmt = CacheFormat("int8", R, DR, dtype)
    slots = torch.tensor([0, 9, 4, 22, 15])
    got = torch.full((3, 8, fmt.width), 0xA5, dtype=torch.uint8)  # a byte pattern no write leaves behind
    want = got.clone()
    cpu.ext().write_latent(got, slots, c_kv, k_pe)
    write_latent(want, slots, c_kv, k_pe, fmt)
    assert torch.equal(got, want)
    assert not (got.view(-1, fmt.width)[slots] == 0xA5).all(-1).any()


# ---- the typed boundary -------------------------------------------------------------------------------------------
def test_bound_structs_have_the_dataclasses_fields():
    """The C++ DecodeLayerWeights and Router are filled field by field from the Python dataclasses: same names, and a
    name on one side only is a TypeError when converting (once, at engine start), not a silently unset field."""
    from dataclasses import dataclass, fields
    e = cpu.ext()
    for py, native in ((cpu.DecodeLayerWeights, e.DecodeLayerWeights), (Router, e.Router)):
        assert {k for k, v in vars(native).items() if isinstance(v, property)} == {f.name for f in fields(py)}

    @dataclass(frozen=True)
    class Misspelled:
        top_k: int
        topk_grup: int
    with pytest.raises(TypeError, match="topk_grup"):
        cpu._native(e.Router(), Misspelled(1, 1), lambda f, v: v)
    router = Router(6, "sigmoid", "noaux_tc", 8, 4, True, 2.5)
    native = cpu.native_router(router)
    assert native is cpu.native_router(router)  # converted once per setting
    assert (native.top_k, native.scoring, native.method, native.n_group, native.topk_group, native.norm,
            native.scale) == (6, e.Scoring.sigmoid, e.TopkMethod.noaux_tc, 8, 4, True, 2.5)


@pytest.mark.parametrize("n", [1, 63, 65, 65536 + 77, 3 * 65536])
def test_stream_sum_reads_every_value(n):
    """stream_sum (the roofline's read loop) is the sum of every value, at sizes around its vector and chunk."""
    e = cpu.ext()
    if e is None:
        pytest.skip("the C++ extension does not build here")
    x = torch.randint(-8, 9, (n,)).float()  # integers: every partial sum exact
    assert e.stream_sum(x) == x.double().sum().item()
    x[-1] += 1000.0  # the last value counted too
    assert e.stream_sum(x) == x.double().sum().item()
