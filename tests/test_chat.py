"""Multi-turn chat: the cache is reused between turns (only new tokens are prefilled), /reset, Ctrl-C."""
import io

import pytest

import cli
from engine import LLM, SamplingParams
from engine.llm import RequestStream


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(checkpoints["v2_lite"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.05)


def test_second_turn_reuses_the_cache_and_matches_a_fresh_run(llm):
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    msgs = [{"role": "user", "content": "the value of the list"}]
    ids1 = llm.chat_prompt(msgs)
    stream = llm.stream(ids1, sp, keep_cache=True)
    text1 = "".join(stream)
    first = stream.seq
    assert first.num_cached_tokens == len(ids1) + 5  # the last sampled token is never run
    msgs += [{"role": "assistant", "content": text1}, {"role": "user", "content": "the name"}]
    ids2 = llm.chat_prompt(msgs)
    second = llm.add_request(ids2, sp, session=first, keep_cache=True)
    common = next(i for i, (a, b) in enumerate(zip(ids1 + first.output_token_ids, ids2 + [-1] * 99)) if a != b)
    assert second.num_cached_tokens == min(common, first.num_cached_tokens) > len(ids1) // 2
    while not second.finished:
        llm.step()
    fresh = llm.generate(prompt_token_ids=[ids2], sampling_params=sp)[0]
    assert second.output_token_ids == fresh.token_ids
    llm.abort(second, free=True)
    assert len(llm.blocks.free_blocks) == llm.blocks.num_blocks


def test_session_must_have_kept_its_cache(llm):
    sp = SamplingParams(max_tokens=2, temperature=0)
    llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=sp)
    done = llm.add_request([5, 6, 7], sp)
    while not done.finished:
        llm.step()
    with pytest.raises(ValueError, match="keep_cache"):
        llm.add_request([5, 6, 7, 8], sp, session=done)


def test_chat_command_turns_reset_interrupt_and_exit(checkpoints, monkeypatch):
    args = cli.build_parser().parse_args(["chat", "--model", checkpoints["v2_lite"], "-n", "4", "--ignore-eos"])
    inputs = iter(["the value", "a list", "/reset", "the name", "/exit"])
    sessions = []
    real_stream = LLM.stream

    def spy(self, ids, params, prompt=None, session=None, keep_cache=False):
        sessions.append((len(ids), session.num_cached_tokens if session else 0))
        return real_stream(self, ids, params, prompt, session, keep_cache)
    monkeypatch.setattr(LLM, "stream", spy)
    out = io.StringIO()
    cli.cmd_chat(args, read=lambda _: next(inputs), out=out)
    assert len(out.getvalue().splitlines()) == 3
    (n1, c1), (n2, c2), (n3, c3) = sessions
    assert c1 == 0 and c2 == n1 + 3 and c3 == 0  # turn 2 starts from turn 1's cache; /reset starts afresh

    # Ctrl-C during an answer stops it and keeps the conversation
    inputs = iter(["the value", "a list", "/exit"])
    calls = {"n": 0}

    class Interrupted(RequestStream):
        def __iter__(self):
            it = super().__iter__()
            yield next(it)
            if calls["n"] == 1:
                raise KeyboardInterrupt
            yield from it

    def interrupting(self, ids, params, prompt=None, session=None, keep_cache=False):
        calls["n"] += 1
        return Interrupted(self, real_stream(self, ids, params, prompt, session, keep_cache).seq)
    monkeypatch.setattr(LLM, "stream", interrupting)
    out = io.StringIO()
    cli.cmd_chat(args, read=lambda _: next(inputs), out=out)
    assert calls["n"] == 2 and len(out.getvalue().splitlines()) == 2
