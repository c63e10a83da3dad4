"""Every Triton kernel against its torch reference (kernels/reference.py) on fresh random inputs at awkward sizes.
On a CPU the kernels run in Triton's interpreter (float32 and float16 only: it computes bf16 tl.dot wrongly), at
small sizes; bf16 and larger sizes run on a GPU (marked gpu). Outputs are poisoned with NaN before each call, so an
element the kernel fails to write fails the test."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from kernels import cache_format, cache_write, triton_decode, triton_prefill  # noqa: E402
from kernels.cache_format import CacheFormat, float_format  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = dict(H=4, R=32, DR=16, DN=16, DV=16, BS=16)
ODD = dict(H=3, R=40, DR=8, DN=12, DV=10, BS=4)  # no width a power of two or a multiple of another
REAL = dict(H=2, R=512, DR=64, DN=128, DV=128, BS=16)  # DeepSeek widths: the 576-wide row is 512 + 64
# kv_lora_rank 48: no power of two, so fp8's four groups of 12 are not the padded tile's quarters (16)
GROUPS = dict(H=5, R=48, DR=16, DN=24, DV=40, BS=16)
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=1.5e-2, rtol=1.5e-2),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make_batch(q_lens, prefix_lens, dims, dtype, seed=0, shared_blocks=0):
    """A paged cache holding each sequence's latent in shuffled, non-contiguous blocks (unwritten slots are NaN).
    With shared_blocks=k every sequence starts with the same k full blocks (one prefix, several continuations)."""
    g = torch.Generator().manual_seed(seed)
    BS, W = dims["BS"], dims["R"] + dims["DR"]
    seq_lens = [q + p for q, p in zip(q_lens, prefix_lens)]
    assert all(L >= shared_blocks * BS for L in seq_lens)
    own = [-(-L // BS) - shared_blocks for L in seq_lens]
    num_blocks = shared_blocks + sum(own) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shared, i, tables = perm[:shared_blocks], shared_blocks, []
    for n in own:
        tables.append(shared + perm[i:i + n])
        i += n
    cache = torch.full((num_blocks, BS, W), float("nan"), dtype=dtype)
    prefix = torch.randn(shared_blocks * BS, W, generator=g).to(dtype)
    for L, t in zip(seq_lens, tables):
        lat = torch.cat((prefix, torch.randn(L - prefix.shape[0], W, generator=g).to(dtype)))
        for p in range(L):
            cache[t[p // BS], p % BS] = lat[p]
    width = max(len(t) for t in tables)
    batch = dict(
        kv_cache=cache.to(DEV),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEV),
        cu_seqlens_q=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
    )
    return batch, sum(q_lens), g


def rand(g, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def as_float(batch):
    return {**batch, "kv_cache": batch["kv_cache"].float()}


# (q_lens, prefix_lens): one-token sequences, empty prefixes, lengths off the tile sizes, prefixes over several
# blocks, several sequences of different shapes in one batch
CASES = [([1], [0]), ([1, 1, 1], [0, 37, 16]), ([3, 1, 5], [0, 20, 33]), ([19], [0]), ([2, 17], [40, 5])]
INTERP_DTYPES = [torch.float32, torch.float16]


# ---- cache write ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("dims", [SMALL, ODD, REAL], ids=["small", "odd", "real"])
def test_write_latent(dims, dtype):
    g = torch.Generator().manual_seed(1)
    BS, R, DR = dims["BS"], dims["R"], dims["DR"]
    cache = poisoned(5, BS, R + DR, dtype=dtype)
    T = 7
    slots = torch.randperm(5 * BS, generator=g)[:T].to(DEV)
    c_kv, k_pe = rand(g, T, R, dtype=torch.float32), rand(g, T + 2, DR, dtype=torch.float32)[1:T + 1]  # strided rows
    kernels.write_latent(cache, slots, c_kv, k_pe, backend="triton")
    want = poisoned(5, BS, R + DR, dtype=dtype)
    reference.write_latent(want, slots, c_kv, k_pe)
    torch.testing.assert_close(cache, want, atol=0, rtol=0, equal_nan=True)  # untouched slots stay NaN


def test_write_latent_skips_negative_slots():
    cache = poisoned(2, 4, 24, dtype=torch.float32)
    c_kv, k_pe = torch.randn(3, 16, device=DEV), torch.randn(3, 8, device=DEV)
    cache_write.write_latent(cache, torch.tensor([5, -1, 2], device=DEV), c_kv, k_pe, float_format(cache, 16, 8))
    flat = cache.view(-1, 24)
    torch.testing.assert_close(flat[[5, 2]], torch.cat((c_kv, k_pe), -1)[[0, 2]])
    assert flat.isnan().all(-1).sum() == 8 - 2


# ---- absorbed decode --------------------------------------------------------------------------------------------
def check_decode(q_lens, prefix_lens, dims, dtype, splits=None, seed=0, shared_blocks=0):
    batch, T, g = make_batch(q_lens, prefix_lens, dims, dtype, seed, shared_blocks)
    H, R, DR = dims["H"], dims["R"], dims["DR"]
    q_lat, q_pe = rand(g, T, H, R, dtype=dtype, scale=R ** -0.5), rand(g, T, H, DR, dtype=dtype)
    scale = (R + DR) ** -0.5
    fmt = float_format(batch["kv_cache"], R, DR)
    out = triton_decode.mla_decode(q_lat, q_pe, softmax_scale=scale, fmt=fmt, out=poisoned(T, H, R, dtype=dtype),
                                   num_splits=splits, **batch)
    want = reference.mla_decode(q_lat.float(), q_pe.float(), softmax_scale=scale, **as_float(batch))
    torch.testing.assert_close(out.float(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("q_lens,prefix_lens", CASES)
def test_decode(q_lens, prefix_lens, splits, dtype):
    check_decode(q_lens, prefix_lens, SMALL, dtype, splits)


@pytest.mark.parametrize("dims", [ODD, REAL], ids=["odd", "real"])
def test_decode_widths(dims):
    check_decode([1, 3], [21, 9], dims, torch.float16, splits=2, seed=3)


def test_decode_shared_prefix():
    check_decode([1, 2, 1], [40, 50, 35], SMALL, torch.float32, splits=2, seed=4, shared_blocks=2)


def test_decode_dispatch_with_strided_queries():
    """Through kernels.mla_decode as the model calls it: q_pe is a split view, not a contiguous tensor."""
    dims = SMALL
    batch, T, g = make_batch([1, 2], [30, 3], dims, torch.float32, seed=5)
    q = rand(g, T, dims["H"], dims["R"] + dims["DR"], dtype=torch.float32)
    q_lat, q_pe = q.split([dims["R"], dims["DR"]], dim=-1)
    out = kernels.mla_decode(q_lat, q_pe, softmax_scale=0.2, backend="triton", **batch)
    want = kernels.mla_decode(q_lat, q_pe, softmax_scale=0.2, backend="torch", **batch)
    torch.testing.assert_close(out, want, **TOL[torch.float32])


# ---- expanded prefill -------------------------------------------------------------------------------------------
def check_prefill(q_lens, prefix_lens, dims, dtype, ws_tokens=None, seed=0, shared_blocks=0):
    batch, T, g = make_batch(q_lens, prefix_lens, dims, dtype, seed, shared_blocks)
    H, R, DR, DN, DV = dims["H"], dims["R"], dims["DR"], dims["DN"], dims["DV"]
    q_nope, q_pe = rand(g, T, H, DN, dtype=dtype), rand(g, T, H, DR, dtype=dtype)
    w_kv_b = rand(g, H * (DN + DV), R, dtype=dtype, scale=R ** -0.5)
    scale = (DN + DR) ** -0.5
    out = triton_prefill.mla_prefill(q_nope, q_pe, w_kv_b=w_kv_b, softmax_scale=scale,
                                     fmt=float_format(batch["kv_cache"], R, DR), out=poisoned(T, H, DV, dtype=dtype),
                                     workspace_tokens=ws_tokens, **batch)
    want = reference.mla_prefill(q_nope.float(), q_pe.float(), w_kv_b=w_kv_b.float(), softmax_scale=scale,
                                 **as_float(batch))
    torch.testing.assert_close(out.float(), want, **TOL[dtype])
    return batch


@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("ws_tokens", [None, 32])  # 32: two blocks per workspace round, so several rounds merge
@pytest.mark.parametrize("q_lens,prefix_lens", CASES)
def test_prefill(q_lens, prefix_lens, ws_tokens, dtype):
    check_prefill(q_lens, prefix_lens, SMALL, dtype, ws_tokens)


@pytest.mark.parametrize("dims", [ODD, REAL], ids=["odd", "real"])
def test_prefill_widths(dims):
    check_prefill([5, 1], [19, 0], dims, torch.float16, ws_tokens=16, seed=3)


@pytest.mark.parametrize("ws_tokens", [None, 48])
def test_prefill_shared_prefix_skips_other_sequences_tiles(ws_tokens):
    """Three sequences continue one 3-block prefix: its blocks are expanded once, and in the workspace each query
    tile's list skips the other sequences' tiles that sit between the prefix and its own (fully masked for it)."""
    q_lens, prefix_lens = [18, 1, 7], [30, 60, 49]
    batch = check_prefill(q_lens, prefix_lens, SMALL, torch.float32, ws_tokens, seed=6, shared_blocks=3)
    BS = SMALL["BS"]
    rounds, entries = triton_prefill.plan(batch["block_tables"].cpu(), batch["cu_seqlens_q"].cpu(),
                                          batch["seq_lens"].cpu(), BS, 16, 16, (ws_tokens or 1 << 20) // BS)
    blocks = torch.cat([r[0] for r in rounds]).tolist()
    tables, lens = batch["block_tables"].tolist(), batch["seq_lens"].tolist()
    assert sorted(blocks) == sorted({b for t, L in zip(tables, lens) for b in t[:-(-L // BS)]})  # each block once
    if ws_tokens is None:  # one round: the workspace holds prefix, then each sequence's own blocks in turn
        (_, work), = rounds
        last = [w for w in work.tolist() if w[0] >= q_lens[0] + q_lens[1]]
        rows = sorted(r for w in last for r in entries[w[3]:w[4], 0].tolist())
        assert max(b - a for a, b in zip(rows, rows[1:])) > BS  # the tiles of sequences 0 and 1 are skipped
        assert all(w[4] - w[3] == -(-(w[2] + w[1]) // BS) for w in last)  # one entry per tile of its own keys


def test_prefill_plan_flags_only_tiles_that_need_a_mask():
    # one sequence: 40 cached + 24 new tokens, block 16, tiles 16: query tiles at positions 40..55 and 56..63
    bt = torch.tensor([[3, 1, 0, 2]], dtype=torch.int32)
    rounds, ent = triton_prefill.plan(bt, torch.tensor([0, 24], dtype=torch.int32),
                                      torch.tensor([64], dtype=torch.int32), 16, 16, 16, 8)
    (blocks, work), = rounds
    assert blocks.tolist() == [3, 1, 0, 2]
    lists = {int(w[2]): ent[int(w[3]):int(w[4])].tolist() for w in work}
    # first query tile (positions 40..55): keys 0..47 unmasked? 0..15, 16..31 need none; 32..47 reaches past 40
    assert [e[3] for e in lists[40]] == [0, 0, 1, 1]
    assert [e[3] for e in lists[56]] == [0, 0, 0, 1]
    rounds, _ = triton_prefill.plan(torch.tensor([[3, 1, 0, 2], [4, 0, 0, 0]], dtype=torch.int32),
                                    torch.tensor([0, 24, 25], dtype=torch.int32),
                                    torch.tensor([64, 1], dtype=torch.int32), 16, 16, 16, 8)
    counts = [w[4] - w[3] for w in rounds[0][1].tolist()]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 1  # heaviest list first


def test_prefill_dispatch():
    dims = SMALL
    batch, T, g = make_batch([4, 9], [20, 0], dims, torch.float32, seed=7)
    H, R, DR, DN, DV = dims["H"], dims["R"], dims["DR"], dims["DN"], dims["DV"]
    q = rand(g, T, H, DN + DR, dtype=torch.float32)
    q_nope, q_pe = q.split([DN, DR], dim=-1)
    w = rand(g, H * (DN + DV), R, dtype=torch.float32, scale=R ** -0.5)
    out = kernels.mla_prefill(q_nope, q_pe, w_kv_b=w, softmax_scale=0.25, backend="triton", **batch)
    want = kernels.mla_prefill(q_nope, q_pe, w_kv_b=w, softmax_scale=0.25, backend="torch", **batch)
    torch.testing.assert_close(out, want, **TOL[torch.float32])


# ---- GPU: bf16 and larger sizes -----------------------------------------------------------------------------------
GPU_DIMS = dict(H=16, R=512, DR=64, DN=128, DV=128, BS=64)
GPU_CASES = [([1] * 8, [1, 70, 300, 1000, 2047, 64, 129, 3000]), ([1, 4, 2], [5000, 17, 600]), ([1], [20000])]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_lens,prefix_lens", GPU_CASES)
def test_decode_gpu(q_lens, prefix_lens, dtype):
    check_decode(q_lens, prefix_lens, GPU_DIMS, dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_lens,prefix_lens,ws", [([300, 1, 77], [0, 500, 1000], None), ([1000], [3000], 1024),
                                                   ([129, 64], [0, 0], None)])
def test_prefill_gpu(q_lens, prefix_lens, ws, dtype):
    check_prefill(q_lens, prefix_lens, GPU_DIMS, dtype, ws)


@gpu
@needs_cuda
def test_prefill_shared_prefix_gpu():
    check_prefill([200, 1, 64], [300, 600, 260], GPU_DIMS, torch.bfloat16, None, shared_blocks=4)


# ---- packed (int8 / fp8) latent caches ------------------------------------------------------------------------------
PACKED = ["int8", "fp8"]


def pack(cache, dims, name, rope_dtype):
    """The float cache's written rows, quantized into a uint8 packed cache of the same blocks."""
    fmt = CacheFormat(name, dims["R"], dims["DR"], rope_dtype)
    flat = cache.view(-1, cache.shape[-1]).float()
    packed = torch.zeros(*cache.shape[:2], fmt.bytes_per_token, dtype=torch.uint8, device=cache.device)
    slots = (~flat.isnan().any(-1)).nonzero()[:, 0]
    cache_format.write_latent(packed, slots, flat[slots, :dims["R"]], flat[slots, dims["R"]:], fmt)
    return packed, fmt


@pytest.mark.parametrize("name", PACKED)
def test_quantize_round_trip_error(name):
    fmt = CacheFormat(name, 512, 64, torch.bfloat16)
    assert fmt.bytes_per_token == {"int8": 644, "fp8": 656}[name]
    x = torch.randn(33, 512) * torch.logspace(-3, 2, 33)[:, None]
    x[3] = 0  # an all-zero row keeps a finite scale
    q, s = cache_format.quantize(x, fmt)
    err = (cache_format.dequantize(q, s, torch.float32) - x).abs()
    step = s.repeat_interleave(512 // fmt.num_scales, -1)  # the scale of each value
    bound = step * 0.5 + 1e-7 if name == "int8" else x.abs() / 16 + step * 2 ** -9
    assert (err <= bound).all() and s.isfinite().all()


@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("dims", [SMALL, GROUPS], ids=["small", "groups"])
def test_write_latent_packed(name, dtype, dims):
    g = torch.Generator().manual_seed(11)
    fmt = CacheFormat(name, dims["R"], dims["DR"], dtype)
    T, BS = 9, dims["BS"]
    slots = torch.randperm(3 * BS, generator=g)[:T].to(DEV)
    c_kv, k_pe = rand(g, T, dims["R"], dtype=dtype, scale=3.0), rand(g, T, dims["DR"], dtype=dtype)
    ours = torch.full((3, BS, fmt.bytes_per_token), 0xFF, dtype=torch.uint8, device=DEV)
    want = ours.clone()
    kernels.write_latent(ours, slots, c_kv, k_pe, fmt, backend="triton")
    kernels.write_latent(want, slots, c_kv, k_pe, fmt, backend="torch")
    untouched = torch.ones(3 * BS, dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert (ours.view(3 * BS, -1)[untouched] == 0xFF).all()
    (ql, sl, rl), (qw, sw, rw) = fmt.views(ours), fmt.views(want)
    ns = fmt.num_scales
    torch.testing.assert_close(sl.reshape(-1, ns)[slots], sw.reshape(-1, ns)[slots], atol=0, rtol=1e-6)
    torch.testing.assert_close(rl.view(-1, dims["DR"])[slots], rw.view(-1, dims["DR"])[slots], atol=0, rtol=0)
    deq = cache_format.dequantize(ql, sl, torch.float32).view(-1, dims["R"])[slots]
    deq_w = cache_format.dequantize(qw, sw, torch.float32).view(-1, dims["R"])[slots]
    step = sw.view(-1, fmt.num_scales)[slots].max(-1, keepdim=True).values
    assert ((deq - deq_w).abs() <= step * (1.01 if name == "int8" else 32)).all()  # at most one rounding step


def rounding_edges(T, R, num_scales, qmax):
    """Rows whose every group has absmax qmax * 2^k, so that the scale is exactly 2^k and the scaled values are
    these: every midpoint between two neighbours of the e4m3 grid (ties; in [0, 16) also int8's n + 0.5) and the
    float32 values on either side of it, of both signs, negatives that round to zero, and -0 (the sign is a bit
    of the byte too)."""
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (grid[1:] + grid[:-1]) / 2
    around = torch.cat((mid, torch.nextafter(mid, grid[1:]), torch.nextafter(mid, grid[:-1]), grid[1:]))
    edges = torch.cat((around, -around, torch.tensor([-0.0, -0.3 * 2 ** -9, -0.0, 0.0])))
    g = torch.Generator().manual_seed(5)
    y = edges[torch.randperm(len(edges), generator=g).repeat(-(-T * R // len(edges)))[:T * R]]
    y = y.view(T, num_scales, -1).clamp(-qmax, qmax)
    y[:, :, 0] = qmax  # the group's absmax
    return (y * 2.0 ** torch.arange(-6, T - 6)[:, None, None]).view(T, R)  # 448 * 2^5 < float16 max


@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("dims", [SMALL, GROUPS, REAL], ids=["small", "groups", "real"])
def test_write_latent_packed_same_bytes(name, dtype, dims):
    """The Triton write and the torch write store the same bytes, scales and rounding included (ties to even and
    the sign of zero, as torch's float8 conversion; int8 half up, as kernels/cache_format.py quantize), on random rows
    over five decades and on rows made of rounding edges: one engine may write a cache the other reads."""
    g = torch.Generator().manual_seed(17)
    R, DR, BS = dims["R"], dims["DR"], dims["BS"]
    fmt = CacheFormat(name, R, DR, dtype)
    T = 12
    slots = torch.randperm(3 * BS, generator=g)[:2 * T].to(DEV)
    c_kv = torch.cat((torch.randn(T, R, generator=g) * torch.logspace(-3, 2, T)[:, None],
                      rounding_edges(T, R, fmt.num_scales, fmt.qmax)))
    c_kv[3] = 0  # an all-zero row: scale 1
    c_kv, k_pe = c_kv.to(dtype).to(DEV), rand(g, 2 * T, DR, dtype=dtype)
    ours = torch.full((3, BS, fmt.bytes_per_token), 0xFF, dtype=torch.uint8, device=DEV)
    want = ours.clone()
    kernels.write_latent(ours, slots, c_kv, k_pe, fmt, backend="triton")
    kernels.write_latent(want, slots, c_kv, k_pe, fmt, backend="torch")
    rows, rows_w = ours.view(-1, fmt.bytes_per_token), want.view(-1, fmt.bytes_per_token)
    differ = (rows != rows_w).nonzero()
    assert differ.shape[0] == 0, f"{differ.shape[0]} bytes differ, first (slot, byte): {differ[:4].tolist()}"


@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize("dims", [SMALL, GROUPS, REAL], ids=["small", "groups", "real"])
def test_decode_packed_reads_what_torch_dequantizes(name, dims):
    """The decode kernel reads a packed row as cache_format.dequantize does, to the bit: with one key per sequence
    the attention output is that key's latent (softmax weight 1, float32 throughout)."""
    g = torch.Generator().manual_seed(19)
    R, DR, BS, H = dims["R"], dims["DR"], dims["BS"], dims["H"]
    fmt = CacheFormat(name, R, DR, torch.float32)
    B = 6
    c_kv = torch.cat((torch.randn(B // 2, R, generator=g) * torch.logspace(-2, 2, B // 2)[:, None],
                      rounding_edges(B - B // 2, R, fmt.num_scales, fmt.qmax))).to(DEV)
    blocks = torch.randperm(B + 2, generator=g)[:B].to(DEV)
    cache = torch.full((B + 2, BS, fmt.bytes_per_token), 0xFF, dtype=torch.uint8, device=DEV)
    kernels.write_latent(cache, blocks * BS, c_kv, rand(g, B, DR, dtype=torch.float32), fmt, backend="torch")
    ones = torch.ones(B, dtype=torch.int32, device=DEV)
    out = triton_decode.mla_decode(rand(g, B, H, R, dtype=torch.float32), rand(g, B, H, DR, dtype=torch.float32),
                                   cache, blocks[:, None].to(torch.int32), torch.cat((ones[:1] * 0, ones.cumsum(0))).int(),
                                   ones, 0.1, fmt, out=poisoned(B, H, R, dtype=torch.float32))
    latent, scales, _ = fmt.views(cache[blocks, 0])
    want = cache_format.dequantize(latent, scales, torch.float32)  # [B, R]
    torch.testing.assert_close(out, want[:, None, :].expand(B, H, R), atol=0, rtol=0)


@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize("dims", [SMALL, REAL, GROUPS], ids=["small", "real", "groups"])
def test_decode_packed(name, dims, monkeypatch):
    monkeypatch.setattr(triton_decode, "_choose_splits", lambda *a: 2)
    dtype = torch.float16
    batch, T, g = make_batch([1, 3, 1], [21, 9, 0], dims, dtype, seed=12)
    packed, fmt = pack(batch["kv_cache"], dims, name, dtype)
    H, R, DR = dims["H"], dims["R"], dims["DR"]
    q_lat, q_pe = rand(g, T, H, R, dtype=dtype, scale=R ** -0.5), rand(g, T, H, DR, dtype=dtype)
    args = dict(softmax_scale=(R + DR) ** -0.5, fmt=fmt, **{**batch, "kv_cache": packed})
    out = kernels.mla_decode(q_lat, q_pe, backend="triton", **args)
    # the torch path on the packed cache (dequantize, then the float reference), in float32
    dense, tables = cache_format.unpack(packed, batch["block_tables"], batch["seq_lens"], fmt, torch.float32)
    want = reference.mla_decode(q_lat.float(), q_pe.float(), dense, tables, batch["cu_seqlens_q"], batch["seq_lens"],
                                args["softmax_scale"])
    torch.testing.assert_close(out.float(), want, **TOL[dtype])
    exact = reference.mla_decode(q_lat.float(), q_pe.float(), softmax_scale=args["softmax_scale"], **as_float(batch))
    assert (out.float() - exact).abs().max() < (0.03 if name == "int8" else 0.2)  # the quantization error itself (e4m3: ~6%)


@pytest.mark.parametrize("name", PACKED)
def test_prefill_packed(name, monkeypatch):
    monkeypatch.setattr(triton_prefill, "WORKSPACE_ELEMENTS", 32 * SMALL["H"] * (SMALL["DN"] + SMALL["DV"]))
    dims, dtype = SMALL, torch.float16
    batch, T, g = make_batch([5, 17], [30, 2], dims, dtype, seed=13)
    packed, fmt = pack(batch["kv_cache"], dims, name, dtype)
    H, R, DR, DN, DV = dims["H"], dims["R"], dims["DR"], dims["DN"], dims["DV"]
    q_nope, q_pe = rand(g, T, H, DN, dtype=dtype), rand(g, T, H, DR, dtype=dtype)
    w = rand(g, H * (DN + DV), R, dtype=dtype, scale=R ** -0.5)
    scale = (DN + DR) ** -0.5
    out = kernels.mla_prefill(q_nope, q_pe, w_kv_b=w, softmax_scale=scale, fmt=fmt, backend="triton",
                              **{**batch, "kv_cache": packed})
    ref = kernels.mla_prefill(q_nope, q_pe, w_kv_b=w, softmax_scale=scale, fmt=fmt, backend="torch",
                              **{**batch, "kv_cache": packed})
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    exact = reference.mla_prefill(q_nope.float(), q_pe.float(), w_kv_b=w.float(), softmax_scale=scale,
                                  **as_float(batch))
    assert (out.float() - exact).abs().max() < (0.03 if name == "int8" else 0.2)
