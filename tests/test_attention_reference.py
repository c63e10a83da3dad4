"""The attention references (kernels/reference.py) against dense attention written from the math, at awkward sizes:
one-token sequences, empty prefixes, prefixes over several blocks in a shuffled block order."""
import pytest
import torch

import kernels

H, R, DR, DN, DV, BS = 3, 40, 8, 12, 10, 4  # small, and no size a multiple of another


def make_batch(q_lens, prefix_lens, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq_lens = [q + p for q, p in zip(q_lens, prefix_lens)]
    blocks_per = [-(-L // BS) for L in seq_lens]
    num_blocks = sum(blocks_per) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()  # non-contiguous, out-of-order blocks
    tables, i = [], 0
    for n in blocks_per:
        tables.append(perm[i:i + n])
        i += n
    width = max(blocks_per)
    cache = torch.full((num_blocks, BS, R + DR), float("nan"), dtype=dtype)  # unwritten slots are poison
    latents = []
    for L, t in zip(seq_lens, tables):
        lat = torch.randn(L, R + DR, generator=g, dtype=dtype)
        for p in range(L):
            cache[t[p // BS], p % BS] = lat[p]
        latents.append(lat)
    T = sum(q_lens)
    batch = dict(
        kv_cache=cache,
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
    )
    return batch, latents, T, g


def dense(q_parts, k_parts, v_parts, scale, q_len, L):
    """softmax over keys 0..position of each query; q/k/v given as lists of matching dot-product parts."""
    s = sum(q @ k.transpose(-1, -2) for q, k in zip(q_parts, k_parts)) * scale  # [H, q, L]
    pos = torch.arange(L - q_len, L)[:, None]
    s = s.masked_fill(torch.arange(L)[None, :] > pos, float("-inf"))
    return torch.softmax(s, -1) @ v_parts


CASES = [([1], [0]), ([1, 1, 1], [0, 7, 13]), ([5, 1, 9], [0, 11, 3]), ([17], [6]), ([2, 13], [21, 0])]


@pytest.mark.parametrize("q_lens,prefix_lens", CASES)
def test_mla_decode_reference(q_lens, prefix_lens):
    batch, latents, T, g = make_batch(q_lens, prefix_lens)
    q_lat, q_pe = torch.randn(T, H, R, generator=g), torch.randn(T, H, DR, generator=g)
    out = kernels.mla_decode(q_lat, q_pe, softmax_scale=0.3, **batch)
    row = 0
    for q, lat in zip(q_lens, latents):
        L = lat.shape[0]
        want = dense([q_lat[row:row + q].transpose(0, 1), q_pe[row:row + q].transpose(0, 1)],
                     [lat[:, :R], lat[:, R:]], lat[:, :R], 0.3, q, L)
        torch.testing.assert_close(out[row:row + q], want.transpose(0, 1), atol=1e-5, rtol=1e-5)
        row += q


@pytest.mark.parametrize("impl", ["reference", "cpu_prefill"])
@pytest.mark.parametrize("q_lens,prefix_lens", CASES)
def test_mla_prefill(q_lens, prefix_lens, impl, monkeypatch):
    """The reference (online softmax over KV and query chunks) and the CPU path (fused flash attention per KV piece,
    merged by log-sum-exp), both with chunks small enough that every case crosses several of them."""
    import kernels.cpu_prefill as cpu
    import kernels.reference as ref
    monkeypatch.setattr(ref, "KV_CHUNK", 5)
    monkeypatch.setattr(ref, "Q_CHUNK", 3)
    monkeypatch.setattr(cpu, "KV_CHUNK", 4)
    batch, latents, T, g = make_batch(q_lens, prefix_lens, seed=1)
    q_nope, q_pe = torch.randn(T, H, DN, generator=g), torch.randn(T, H, DR, generator=g)
    w_kv_b = torch.randn(H * (DN + DV), R, generator=g) / R ** 0.5
    fn = ref.mla_prefill if impl == "reference" else cpu.mla_prefill
    out = fn(q_nope, q_pe, w_kv_b=w_kv_b, softmax_scale=0.2, **batch)
    row = 0
    for q, lat in zip(q_lens, latents):
        L = lat.shape[0]
        kv = (lat[:, :R] @ w_kv_b.T)  # kv_b_proj stored split: every head's W_UK rows, then every head's W_UV rows
        kv = torch.cat((kv[:, :H * DN].view(L, H, DN), kv[:, H * DN:].view(L, H, DV)), -1).transpose(0, 1)
        want = dense([q_nope[row:row + q].transpose(0, 1), q_pe[row:row + q].transpose(0, 1)],
                     [kv[..., :DN], lat[:, R:]], kv[..., DN:], 0.2, q, L)
        torch.testing.assert_close(out[row:row + q], want.transpose(0, 1), atol=1e-5, rtol=1e-5)
        row += q


def test_cpu_dispatch_takes_the_fused_path(monkeypatch):
    import kernels.cpu_prefill as cpu
    calls = []
    real = cpu.mla_prefill
    monkeypatch.setattr(cpu, "mla_prefill", lambda *a: calls.append(1) or real(*a))
    batch, _, T, g = make_batch([4], [3])
    kernels.mla_prefill(torch.randn(T, H, DN), torch.randn(T, H, DR), w_kv_b=torch.randn(H * (DN + DV), R),
                        softmax_scale=0.2, **batch)
    assert calls == [1]


def test_write_latent_scatters_by_slot():
    cache = torch.full((3, BS, R + DR), float("nan"))
    slots = torch.tensor([7, 0, 11, 5])
    c_kv, k_pe = torch.randn(4, R), torch.randn(4, DR)
    kernels.write_latent(cache, slots, c_kv, k_pe)
    flat = cache.view(-1, R + DR)
    torch.testing.assert_close(flat[slots], torch.cat((c_kv, k_pe), -1))
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert flat[untouched].isnan().all()


def test_dispatch_rejects_bad_shapes():
    batch, _, T, g = make_batch([2], [3])
    with pytest.raises(ValueError, match="kernel argument"):
        kernels.mla_decode(torch.randn(T, H, R + 1), torch.randn(T, H, DR), softmax_scale=1.0, **batch)
    with pytest.raises(ValueError, match="int32"):
        kernels.mla_decode(torch.randn(T, H, R), torch.randn(T, H, DR), softmax_scale=1.0,
                           **{**batch, "seq_lens": batch["seq_lens"].long()})
