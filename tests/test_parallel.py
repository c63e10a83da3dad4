"""Tensor and expert parallelism on the CPU: 2 ranks (processes the engine starts, gloo) against 1."""
import os
import subprocess
import sys

import pytest

from engine import LLM, SamplingParams
from models.errors import ModelError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20] * 40]
SP = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)


def run(path, **kw):
    llm = LLM(path, device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.05, **kw)
    try:
        return llm.generate(prompt_token_ids=PROMPTS, sampling_params=SP)
    finally:
        llm.close()


def same(one, two, tol=1e-4):
    for a, b in zip(one, two):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert all(abs(la[t] - lb[t]) < tol for t in la.keys() & lb.keys())
            for x, y in ((la, lb), (lb, la)):  # a token listed on one side only was a near tie on the other
                assert all(x[t] < min(y.values()) + tol for t in x.keys() - y.keys())
        for la, lb, t in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], a.prompt_token_ids[1:]):
            assert abs(la[t] - lb[t]) < tol  # the prompt's token, and the most likely one (which may differ in a tie)
            assert abs(max(la.values()) - max(lb.values())) < tol


@pytest.mark.parametrize("name,kw", [
    ("v2_lite", {}),  # V2-Lite's attention (16 heads, 512 latent), greedy routing, q_lora off
    ("v2_qlora", dict(attn_mode="expanded")),  # q_lora on, group-limited routing, the expanded path
    ("v3", {}),  # noaux_tc with a correction bias, sigmoid scores
    ("v2_qlora", dict(weight_dtype="int8")),  # each rank quantizes its own share
])
def test_two_ranks_give_one_ranks_tokens_and_logprobs(checkpoints, name, kw):
    # int8: a rank quantizes the activations of its own share of a row (blocks of 128 in decode steps; the whole
    # share, one scale, in the int8 prompt GEMM), so the float32 sums differ by the quantization's rounding; float32
    # weights agree to 1e-4
    tol = 5e-2 if "weight_dtype" in kw else 1e-4
    same(run(checkpoints[name], **kw), run(checkpoints[name], tensor_parallel_size=2, **kw), tol)


def test_a_split_that_does_not_divide_is_one_line(checkpoints):
    with pytest.raises(ModelError, match="num_attention_heads=4 cannot be split over tensor_parallel_size=3"):
        LLM(checkpoints["v2_qlora"], device="cpu", progress=False, tensor_parallel_size=3)


def test_generate_on_two_ranks_prints_the_same_text():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = []
    for tp in ("1", "2"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "generate", "--prompt", "The function returns",
                            "-n", "24", "--dtype", "float32", "--device", "cpu", "--tp", tp], capture_output=True,
                           text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        out.append(r.stdout)
    assert out[0] == out[1] and len(out[0].split()) > 5


def test_prefix_caching_over_two_ranks(checkpoints):
    """The prefix cache is rank 0's bookkeeping: a second batch that repeats the first one's prefixes reads their
    blocks on every rank, with the tokens one rank gives without the cache."""
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    prefix = list(range(30, 100))
    batches = [[prefix + [5, 6]], [prefix + [7], prefix[:40] + [8, 9]]]
    one = LLM(checkpoints["v2_qlora"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.05,
              block_size=16, enable_prefix_caching=False)
    want = [o for b in batches for o in one.generate(prompt_token_ids=b, sampling_params=sp)]
    two = LLM(checkpoints["v2_qlora"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.05,
              block_size=16, tensor_parallel_size=2)
    try:
        got = [o for b in batches for o in two.generate(prompt_token_ids=b, sampling_params=sp)]
        assert two.scheduler.prefix_hit_tokens == 64 + 32  # 4 blocks of the first prompt, then 2 of them
    finally:
        two.close()
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        assert all(abs(la[t] - lb[t]) < 1e-4 for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids))
