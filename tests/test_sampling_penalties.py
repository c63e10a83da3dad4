"""Repetition / presence / frequency penalties, min-p, n > 1 and the checkpoint's default sampling settings: against
a plain torch reference and transformers' logits processors, and through the engine."""
import json
import shutil

import pytest
import torch
from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

import cli
from engine import LLM, SamplingParams
from engine.generation_config import sampling_defaults
from engine.sampler import penalize, sampling_logits
from models.errors import ModelError

V = 131  # an awkward vocabulary width


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(checkpoints["v2_qlora"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.05)


def _history(seed: int, n_prompt: int, n_out: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 12, (n_prompt + n_out,), generator=g).tolist()  # few distinct ids: many repeats


def reference_penalties(logits, token_ids, num_prompt, rep, presence, frequency):
    """One token at a time, as the OpenAI and CTRL papers describe them."""
    x = logits.clone()
    for t in set(token_ids):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    out = token_ids[num_prompt:]
    for t in set(out):
        x[t] -= frequency * out.count(t) + presence
    return x


@pytest.mark.parametrize("seed", range(4))
def test_repetition_penalty_matches_transformers(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(V, generator=g) * 3
    ids = _history(seed, 7, 5)
    for rep in (1.3, 0.7):
        want = RepetitionPenaltyLogitsProcessor(rep)(torch.tensor([ids]), logits[None].clone())[0]
        got = penalize(logits, SamplingParams(repetition_penalty=rep), ids, 7)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_presence_and_frequency_penalties_match_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(V, generator=g) * 3
    ids = _history(seed + 10, 6, 9)
    p = SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4, repetition_penalty=1.2)
    got = penalize(logits, p, ids, 6)
    torch.testing.assert_close(got, reference_penalties(logits, ids, 6, 1.2, 0.7, -0.4), rtol=1e-6, atol=1e-6)
    # the prompt's tokens are not counted by presence / frequency
    only_prompt = penalize(logits, SamplingParams(presence_penalty=2.0, frequency_penalty=2.0), ids[:6], 6)
    assert torch.equal(only_prompt, logits)


@pytest.mark.parametrize("min_p,temperature", [(0.05, 1.0), (0.2, 0.7), (0.5, 1.9)])
def test_min_p_matches_transformers(min_p, temperature):
    logits = torch.randn(V, generator=torch.Generator().manual_seed(5)) * 2
    want = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(temperature)(None, logits[None].clone()))[0]
    got = sampling_logits(logits, SamplingParams(temperature=temperature, min_p=min_p))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    kept = ~torch.isinf(got)
    assert 0 < int(kept.sum()) < V
    torch.testing.assert_close(got[kept], want[kept])


def _greedy_reference(llm, prompt, p, n):
    """Greedy decoding one token at a time from the engine's full-prompt logits, penalties by the reference."""
    ids = list(prompt)
    for _ in range(n):
        logits = llm.prompt_logits(ids)[-1]
        x = reference_penalties(logits, ids, len(prompt), p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        ids.append(int(x.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.8), dict(presence_penalty=1.5, frequency_penalty=1.0)])
def test_greedy_with_penalties_in_the_engine(llm, kw):
    prompt = [5, 9, 11, 13, 9, 5]
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, **kw)
    plain = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=8, temperature=0,
                                                                                   ignore_eos=True))[0].token_ids
    # batched with an unpenalized request, which must not be affected
    got = llm.generate(prompt_token_ids=[prompt, prompt], sampling_params=[p, SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True)])
    assert got[0].token_ids == _greedy_reference(llm, prompt, p, 8)
    assert got[1].token_ids == plain
    assert got[0].token_ids != plain  # the penalty changed the choice


def test_n_completions_are_separate_seeded_sequences(llm):
    prompt = [4, 5, 6]
    p = SamplingParams(max_tokens=10, temperature=1.5, seed=11, n=3, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=[prompt, [7, 8]], sampling_params=p)
    assert len(outs) == 6 and [o.prompt_token_ids for o in outs] == [prompt] * 3 + [[7, 8]] * 3
    singles = [llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_tokens=10, temperature=1.5, seed=11 + i, ignore_eos=True))[0].token_ids for i in range(3)]
    assert [o.token_ids for o in outs[:3]] == singles
    assert len({tuple(s) for s in singles}) > 1
    with pytest.raises(ValueError, match="n=3"):
        llm.add_request(prompt, p)
    for bad in (0, 10**6, 2.0):
        with pytest.raises(ValueError, match="n"):
            SamplingParams(n=bad)


@pytest.mark.parametrize("kw,needle", [(dict(min_p=1.5), "min_p"), (dict(presence_penalty=3), "presence_penalty"),
                                       (dict(frequency_penalty="x"), "frequency_penalty"),
                                       (dict(repetition_penalty=0), "repetition_penalty")])
def test_bad_penalties(kw, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kw)


def test_generation_config_defaults(checkpoints, tmp_path):
    d = str(tmp_path / "ckpt")
    shutil.copytree(checkpoints["v2_qlora"], d)
    with open(f"{d}/generation_config.json", "w") as f:
        json.dump({"do_sample": True, "temperature": 0.3, "top_p": 0.95, "repetition_penalty": 1.1, "bos_token_id": 1}, f)
    assert sampling_defaults(d) == {"temperature": 0.3, "top_p": 0.95, "repetition_penalty": 1.1}
    llm = LLM(d, device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.01)
    p = llm.sampling_params(top_p=0.5)
    assert (p.temperature, p.top_p, p.repetition_penalty, p.top_k) == (0.3, 0.5, 1.1, 0)
    # the command line: the checkpoint's defaults unless a flag says otherwise
    args = cli.build_parser().parse_args(["generate", "-m", d, "-p", "x", "--top-k", "5"])
    p = cli.sampling_params(args, llm)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.3, 0.95, 5, 1.1)
    args = cli.build_parser().parse_args(["generate", "-m", d, "-p", "x", "--temperature", "0"])
    assert cli.sampling_params(args, llm).greedy
    # without a generation config: greedy, as before
    plain = LLM(checkpoints["v2_qlora"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.01)
    args = cli.build_parser().parse_args(["generate", "-m", d, "-p", "x"])
    assert cli.sampling_params(args, plain).greedy
    with open(f"{d}/generation_config.json", "w") as f:
        json.dump({"temperature": -1}, f)
    with pytest.raises(ModelError, match="generation_config.json.*temperature"):
        sampling_defaults(d)
