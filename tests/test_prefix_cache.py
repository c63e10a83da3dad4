"""Automatic prefix caching (kvcache/block_manager.py), blocks taken as sequences grow and preemption
(engine/scheduler.py): the same greedy tokens and logprobs with the cache on and off, in every cache format, on
both attention paths and both backends; bookkeeping invariants after every step of a randomized run; a cache far
too small for the demand still finishes every request with the tokens each gets alone."""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

from engine import LLM, SamplingParams  # noqa: E402
from kvcache import BlockManager  # noqa: E402

BS = 4  # block size of every engine here: prefixes of a block, a block and one token, ... are a few tokens


def make(checkpoint, **kw):
    kw = dict(device="cpu", dtype="float32", progress=False, block_size=BS, kv_cache_memory_gib=0.02,
              max_model_len=128) | kw
    return LLM(checkpoint, **kw)


def tokens(n, seed):
    return torch.randint(3, 120, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


BASE = tokens(23, 1)
# Against BASE: shares exactly a block, a block and one token, the whole of BASE (and goes on), BASE itself (the
# whole prompt cached: its last block is recomputed), nothing; then a prompt that shares a block with another one
# of the same batch.
PROMPTS = [BASE[:BS] + tokens(6, 2), BASE[:BS + 1] + tokens(9, 3), BASE + tokens(5, 4), list(BASE), tokens(11, 5),
           BASE[:2 * BS] + tokens(3, 6)]


def run(llm, backend_batches):
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)
    return [o for batch in backend_batches for o in llm.generate(prompt_token_ids=batch, sampling_params=sp)]


def assert_same(got, want, tol):
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[t] - lb[t]) < tol


@pytest.mark.parametrize("backend,kv_cache_dtype,attn", [
    ("torch", "auto", "absorbed"), ("torch", "auto", "expanded"), ("torch", "bfloat16", "auto"),
    ("torch", "int8", "auto"), ("torch", "fp8", "absorbed"), ("torch", "fp8", "expanded"),
    ("triton", "auto", "auto"), ("triton", "int8", "absorbed"), ("triton", "fp8", "expanded")])
def test_greedy_outputs_equal_with_prefix_caching_on_and_off(checkpoints, backend, kv_cache_dtype, attn):
    """auto with a threshold of 6: the longer prompt chunks take the expanded path, the short ones and decode the
    absorbed one, which both then read the shared prefix from the cache. With auto, a prompt whose prefix is cached
    can run its rest on the other path than the same prompt computed whole: over a quantized cache the two paths
    round differently (the absorbed one reads the packed rows in place, and on the CPU quantizes the query to int8 over
    an int8 cache), hence the wider tolerance there (about a third of what the int8 cache itself moves the logprobs)."""
    kw = dict(backend=backend, kv_cache_dtype=kv_cache_dtype, attn_mode=attn, mla_threshold=6)
    batches = [[BASE], PROMPTS[:3], PROMPTS[3:]]
    off = run(make(checkpoints["v2_qlora"], enable_prefix_caching=False, **kw), batches)
    llm = make(checkpoints["v2_qlora"], **kw)
    on = run(llm, batches)
    assert_same(on, off, 2e-3 if kv_cache_dtype in ("int8", "fp8") and attn == "auto" else 1e-4)
    hits = llm.scheduler.prefix_hit_tokens
    assert hits >= BS + BS + 5 * BS + 5 * BS, hits  # each shared full block before a prompt's last token was reused
    assert [s for s in llm.scheduler.running] == [] and llm.blocks.usage == 0


def test_cached_tokens_per_request(checkpoints):
    llm = make(checkpoints["v2_qlora"])
    sp = SamplingParams(max_tokens=2, temperature=0)
    llm.generate(prompt_token_ids=[BASE], sampling_params=sp)
    cases = {BS: PROMPTS[0], BS + 1: PROMPTS[1], 23: PROMPTS[2], 23 - 1: PROMPTS[3], 0: PROMPTS[4]}
    for shared, prompt in cases.items():
        seq = llm.add_request(prompt, sp)
        while not seq.finished:
            llm.step()
        # whole blocks only, and never the block of the last prompt token
        assert seq.num_prefix_cached == min(shared, len(prompt) - 1) // BS * BS, (shared, seq.num_prefix_cached)


def test_prompt_logprobs_compute_the_whole_prompt(checkpoints):
    llm = make(checkpoints["v2_qlora"])
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    first = llm.generate(prompt_token_ids=[BASE], sampling_params=sp)[0]
    second = llm.add_request(list(BASE), sp)
    while not second.finished:
        llm.step()
    assert second.num_prefix_cached == 0
    assert [list(d) if d else d for d in second.output().prompt_logprobs] == \
        [list(d) if d else d for d in first.prompt_logprobs]


def test_prefix_caching_off_shares_nothing(checkpoints):
    llm = make(checkpoints["v2_qlora"], enable_prefix_caching=False)
    run(llm, [[BASE], [list(BASE)]])
    assert llm.scheduler.prefix_hit_tokens == 0 and not llm.blocks.cached


def checked_steps(llm):
    """Wrap the runner: before every forward pass, each block a scheduled token is written into belongs to its
    sequence alone and has no cached name (so no one else reads it and no later lookup finds changed content);
    after every step, every bookkeeping invariant holds."""
    blocks, forward = llm.blocks, llm.runner.forward

    def guarded(batch):
        for seq, n in batch:
            table = blocks.tables[seq.seq_id]
            for i in range(seq.num_cached_tokens // BS, (seq.num_cached_tokens + n - 1) // BS + 1):
                b = table[i]
                assert blocks.ref_count[b] == 1 and blocks.block_hash[b] is None, (seq.seq_id, i, b)
        return forward(batch)

    llm.runner.forward = guarded
    step = llm.step

    def checked():
        events = step()
        blocks.check()
        return events
    llm.step = checked


def test_randomized_requests_aborts_and_preemptions_keep_the_bookkeeping(checkpoints):
    """Many requests with shared prefixes in a cache of 64 tokens, some aborted mid-way, preemptions forced by the
    small cache: the invariants hold after every step, nothing is left in use at the end, and every request that
    was not aborted produces the tokens it produces alone."""
    rng = random.Random(0)
    stems = [tokens(rng.randint(3, 13), 100 + i) for i in range(3)]
    prompts = [rng.choice(stems)[:rng.randint(1, 13)] + tokens(rng.randint(1, 9), 200 + i) for i in range(14)]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = make(checkpoints["v2_qlora"], enable_prefix_caching=False)
    want = [alone.generate(prompt_token_ids=[p], sampling_params=sp)[0].token_ids for p in prompts]

    llm = make(checkpoints["v2_qlora"], kv_cache_memory_gib=None, kv_cache_tokens=64, max_num_seqs=6)
    checked_steps(llm)
    seqs = [llm.add_request(p, sp) for p in prompts]
    aborted = set(rng.sample(range(len(seqs)), 3))
    for step in range(2000):
        if all(s.finished for s in seqs):
            break
        llm.step()
        for i in list(aborted):
            if step == 3 * i:
                llm.abort(seqs[i])
    assert all(s.finished for s in seqs)
    assert llm.scheduler.num_preemptions > 0  # the small cache forced some
    assert llm.scheduler.prefix_hit_tokens > 0
    for i, s in enumerate(seqs):
        if i not in aborted:
            assert s.output_token_ids == want[i], i
    assert llm.blocks.usage == 0 and not llm.blocks.tables


def test_preemption_finishes_demand_many_times_the_cache(checkpoints):
    """Eight requests of 40 tokens each (320 in all) through a cache of 48 tokens: each runs, is preempted when
    others need blocks, recomputes, and ends with the same tokens it gets alone; the counter moves."""
    prompts = [tokens(10 + i, 300 + i) for i in range(8)]
    sp = [SamplingParams(max_tokens=30 - 2 * (i % 3), temperature=0, ignore_eos=True) for i in range(8)]
    alone = make(checkpoints["v2_qlora"])
    want = [o.token_ids for o in alone.generate(prompt_token_ids=prompts, sampling_params=sp)]
    llm = make(checkpoints["v2_qlora"], kv_cache_memory_gib=None, kv_cache_tokens=48)
    checked_steps(llm)
    got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
    assert got == want
    assert llm.scheduler.num_preemptions > 0


def test_request_larger_than_the_whole_cache_is_refused(checkpoints):
    llm = make(checkpoints["v2_qlora"], kv_cache_memory_gib=None, kv_cache_tokens=48)
    with pytest.raises(ValueError, match="KV cache"):
        llm.add_request(tokens(30, 1), SamplingParams(max_tokens=30))


# ---- the block manager alone ----------------------------------------------------------------------------------------
def test_lookup_takes_whole_blocks_before_the_last_token():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    ids = list(range(10, 22))  # 12 tokens: 3 full blocks
    assert bm.match_prefix(1, ids) == 0 and bm.allocate(1, 12)
    bm.register_full_blocks(1, ids, 12)
    assert len(bm.cached) == 3
    assert bm.match_prefix(2, ids) == 8  # not the third block: it holds the last token, which must run
    assert bm.match_prefix(3, ids + [5]) == 12
    assert bm.match_prefix(4, ids[:5] + [0] * 7) == 4  # the second block differs
    assert bm.match_prefix(5, [99] + ids[1:]) == 0  # the chain: a different first block, nothing after it matches
    assert bm.tables[3] == bm.tables[1] and bm.ref_count[bm.tables[1][0]] == 4
    bm.check()


def test_freed_blocks_stay_findable_until_evicted_least_recently_freed_first():
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    a, b = [1, 2, 3, 4, 5], [7, 8, 9, 10, 11]
    for sid, ids in ((1, a), (2, b)):
        bm.match_prefix(sid, ids)
        bm.allocate(sid, 4)
        bm.register_full_blocks(sid, ids, 4)
        bm.free(sid)  # a's blocks freed first: they go first
    assert bm.num_free == 4 and len(bm.cached) == 4
    bm.match_prefix(3, [0, 0, 0])
    assert bm.allocate(3, 4)  # two blocks: a's, evicted
    assert bm.match_prefix(4, a) == 0 and bm.match_prefix(5, b) == 4
    bm.check()
    assert not bm.allocate(6, 2)  # all in use now
    bm.check()


def test_session_keeps_only_blocks_it_owns_alone():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    ids = list(range(30, 40))
    bm.match_prefix(1, ids)
    bm.allocate(1, 10)
    bm.register_full_blocks(1, ids, 10)
    assert bm.keep_prefix(1, 6) == 6 and len(bm.tables[1]) == 2  # its own second block: kept, renamed
    assert len(bm.cached) == 1
    bm.match_prefix(2, ids[:4] + [0])  # shares the first block
    assert bm.keep_prefix(1, 3) == 0 and bm.tables[1] == []  # the first block is shared: not to be written
    bm.check()
