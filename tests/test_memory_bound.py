"""Peak memory of a long prompt is weights + cache + a workspace that does not grow with the prompt: prefill runs
in chunks of max_num_batched_tokens, and the expanded attention expands the latent piece by piece."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from engine import LLM, SamplingParams
llm = LLM({path!r}, device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.25, max_num_batched_tokens=1024)
ids = torch.randint(3, 120, ({n},), generator=torch.Generator().manual_seed(0)).tolist()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"grew_kib": after - before, "cache_kib_per_token": llm.cache.nbytes / (llm.cache.num_tokens + llm.cache.block_size) / 1024}}))
"""


def peak_growth(path, n):
    # large blocks straight from mmap and back on free, so the peak RSS is the peak of live memory, not of
    # whatever glibc's heap kept from earlier, differently sized temporaries
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(root=ROOT, path=path, n=n)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_long_prompt_peak_memory_grows_only_by_its_cache(tmp_path):
    from tests.tiny import make_checkpoint, v2_lite_attention
    path = str(tmp_path / "long")
    make_checkpoint(path, v2_lite_attention(max_position_embeddings=16384), tokenizer=False)
    # both lengths fill whole expansion pieces (kernels/cpu_prefill.KV_CHUNK = 4096), so the workspaces match
    short, long = peak_growth(path, 6000), peak_growth(path, 12000)
    cache = (12000 - 6000) * long["cache_kib_per_token"]  # the latent rows the longer prompt adds
    # One 12000 x 12000 score matrix for 16 heads would be 9 GiB, and expanding the whole context's K and V at once
    # would add 120 MiB more at 12000 than at 6000 tokens; measured: the cache plus about 50 MiB.
    assert long["grew_kib"] - short["grew_kib"] < cache + 96 * 1024, (short, long, cache)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_long_prompt_peak_gpu_memory_does_not_grow_with_the_prompt(tmp_path):
    """On the GPU the cache is allocated up front, so the peak above it is the workspace alone: prompt chunks of
    max_num_batched_tokens, expansion rounds of triton_prefill.WORKSPACE_ELEMENTS, MoE workspaces under
    triton_moe.WORKSPACE_BYTES. Only the attention plan grows with the context (a few int32 per (query tile, KV
    tile) pair: about 100 bytes per context token for a 4096-token chunk)."""
    from engine import LLM, SamplingParams
    from tests.tiny import make_checkpoint, v2_lite_attention
    path = str(tmp_path / "long")
    make_checkpoint(path, v2_lite_attention(max_position_embeddings=40000), tokenizer=False)
    llm = LLM(path, device="cuda", dtype="bfloat16", progress=False, kv_cache_memory_gib=1.0, max_num_seqs=1)

    def peak(n):
        ids = torch.randint(3, 120, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    # both past one expansion round (16k tokens at these dims), so both merge rounds the same way
    short, long = peak(20000), peak(36000)
    assert long - short < 16 << 20, (short, long)  # the plan's ~1.6 MB, nothing the size of K/V or scores


HEAP_SCRIPT = r"""
import ctypes, json, sys, torch
sys.path.insert(0, {root!r})
from engine import LLM, memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
if {engine!r}:
    LLM({path!r}, device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.05)
x = torch.ones(48 << 20, dtype=torch.uint8)  # above glibc's largest dynamic mmap threshold (32 MiB)
mapped = mallinfo2().hblkhd
del x
kept = mallinfo2().fordblks
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
memory.trim_heap()
print(json.dumps({{"mapped": mapped, "kept_free": kept, "trim_released": before - rss()}}))
"""


def test_cpu_engine_keeps_a_workspace_sized_block_on_the_heap(tmp_path):
    """A 48 MiB temporary of a CPU engine's process comes from the heap and stays there once freed (the next one
    faults no pages in); without the engine's setting glibc maps it and unmaps it on free."""
    if not hasattr(__import__("ctypes").CDLL("libc.so.6"), "mallinfo2"):
        pytest.fail("this test needs glibc >= 2.33 (mallinfo2)")
    from tests.tiny import make_checkpoint, v2_lite_attention
    path = str(tmp_path / "m")
    make_checkpoint(path, v2_lite_attention(), tokenizer=False)
    from engine.memory import USER_THRESHOLDS
    env = {k: v for k, v in os.environ.items() if k not in USER_THRESHOLDS}

    def run(engine):
        r = subprocess.run([sys.executable, "-c", HEAP_SCRIPT.format(root=ROOT, path=path, engine=engine)],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    block = 48 << 20
    plain, engine = run(False), run(True)
    assert plain["mapped"] >= block and plain["kept_free"] < block, plain  # glibc's default, which the engine changes
    assert engine["mapped"] < block and engine["kept_free"] >= block, engine
    assert engine["trim_released"] >= block, engine  # what an idle server gives back


def test_an_idle_server_loop_trims_the_heap_once_after_work(monkeypatch, tmp_path):
    """The server's engine loop gives the kept heap back after IDLE_TRIM_S without a step, once per idle spell,
    and not before it has run anything."""
    import asyncio
    import time
    from engine import LLM, SamplingParams, async_engine, memory
    from tests.tiny import make_checkpoint, v2_lite_attention
    path = str(tmp_path / "m")
    make_checkpoint(path, v2_lite_attention(), tokenizer=False)
    trims = []
    monkeypatch.setattr(async_engine, "IDLE_TRIM_S", 0.2)
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(time.monotonic()))
    engine = async_engine.AsyncEngine(LLM(path, device="cpu", dtype="float32", progress=False,
                                          kv_cache_memory_gib=0.05))
    engine.start()

    async def one_request():
        queue = asyncio.Queue()
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        engine.add([async_engine.Request(0, [5, 6, 7, 8], params, None, queue, asyncio.get_running_loop())])
        while (await asyncio.wait_for(queue.get(), 60)).result is None:
            pass
        return time.monotonic()

    try:
        time.sleep(0.5)
        assert trims == []  # idle from the start: nothing to give back
        done = asyncio.run(one_request())
        time.sleep(1.0)
        assert len(trims) == 1 and trims[0] - done >= 0.15, (trims, done)  # once, after the idle time
        asyncio.run(one_request())
        time.sleep(0.6)
        assert len(trims) == 2, trims
    finally:
        engine.stop()
