"""The paged latent cache: only 576 values per token per layer, block bookkeeping."""
import os
from collections import OrderedDict

import pytest
import torch

from engine import LLM
from kvcache import BlockManager, CacheFormat, LatentCache
from models.config import ModelConfig

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "configs")


def lite_config():
    return ModelConfig.from_hf(os.path.join(CONFIGS, "deepseek-v2-lite.json"))


def test_bytes_per_token_is_latent_only_for_v2_lite():
    cfg = lite_config()
    assert cfg.kv_cache_width == 576
    fmt = CacheFormat("bfloat16", cfg.kv_lora_rank, cfg.qk_rope_head_dim, torch.bfloat16)
    cache = LatentCache(cfg.num_hidden_layers, num_blocks=3, block_size=64, fmt=fmt, device="cpu")
    measured = cache.nbytes / (cache.num_tokens + cache.block_size)  # from the allocated tensors (+ the pad block)
    assert measured == 27 * 576 * 2 == 27 * fmt.bytes_per_token
    assert all(t.shape == (4, 64, 576) for t in cache.layers) and cache.pad_block == 3


def test_engine_cache_holds_nothing_but_the_latent(checkpoints):
    llm = LLM(checkpoints["v2_lite"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.01)
    cfg = llm.model_config
    assert all(t.shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim == 576 for t in llm.cache.layers)
    assert llm.cache.nbytes == (llm.cache.num_blocks + 1) * llm.cache.block_size * cfg.num_hidden_layers * 576 * 4
    assert llm.cache.nbytes <= 0.01 * 2**30


def test_cache_budget_caps_blocks():
    fmt = CacheFormat("bfloat16", 512, 64, torch.bfloat16)
    c = LatentCache.from_budget(10 * 2 * 64 * 576 * 2, max_tokens=10**9, num_layers=2, block_size=64, fmt=fmt,
                                device="cpu")
    assert c.num_blocks == 9 and c.nbytes == 10 * 2 * 64 * 576 * 2  # the budget holds the padding block too
    c = LatentCache.from_budget(10**12, max_tokens=130, num_layers=2, block_size=64, fmt=fmt, device="cpu")
    assert c.num_blocks == 3  # never more than the sequences can use


def test_block_manager_allocate_append_free():
    bm = BlockManager(num_blocks=5, block_size=4)
    assert bm.allocate(1, 6) and bm.tables[1] == [0, 1]
    assert bm.allocate(1, 9) and bm.tables[1] == [0, 1, 2]  # grows
    assert bm.slots(1, 9, 10) == [2 * 4 + 1]
    assert bm.slots(1, 0, 9) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert bm.slots(1, 3, 9) == [3, 4, 5, 6, 7, 8]
    assert not bm.can_allocate(2, 9) and bm.can_allocate(2, 8)
    assert not bm.allocate(2, 13) and not bm.tables[2]  # nothing taken
    bm.check()
    bm.free(1)
    assert bm.can_allocate(2, 20)
    assert bm.allocate(2, 20) and sorted(bm.tables[2]) == [0, 1, 2, 3, 4]
    bm.check()


def test_slots_follow_a_shuffled_block_table():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.free_blocks = OrderedDict.fromkeys([3, 1, 0, 2])
    assert bm.allocate(7, 10) and bm.tables[7] == [3, 1, 0]
    assert bm.slots(7, 2, 10) == [14, 15, 4, 5, 6, 7, 0, 1]
    assert bm.slots(7, 5, 6) == [5] and bm.slots(7, 9, 10) == [1]


def test_request_that_can_never_fit_is_an_error(checkpoints):
    llm = LLM(checkpoints["v2_qlora"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=1e-4)
    from engine import SamplingParams
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate(prompt_token_ids=[[5] * 10], sampling_params=SamplingParams(max_tokens=400))


def test_many_requests_wait_for_blocks_and_all_finish(checkpoints):
    """A cache with room for about two sequences at a time still serves ten (they wait, none overflows)."""
    from engine import SamplingParams
    small = LLM(checkpoints["v2_qlora"], device="cpu", dtype="float32", progress=False, block_size=4,
                kv_cache_memory_gib=2 * 40 * 3 * 40 * 4 / 2**30)
    prompts = [[5 + i] * (3 + i) for i in range(10)]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = small.generate(prompt_token_ids=prompts, sampling_params=sp)
    assert all(len(o.token_ids) == 8 for o in outs)
    assert len(small.blocks.free_blocks) == small.blocks.num_blocks
