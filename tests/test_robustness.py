"""One bad request never poisons the engine; every bad input gets one line (issue: robustness)."""
import json
import os
import random
import subprocess
import sys

import pytest

import cli
from engine import LLM, SamplingParams
from models.errors import ModelError
from tests.test_errors import expect_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALID = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(checkpoints["v2_qlora"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.01)


@pytest.fixture(scope="module")
def fresh_tokens(llm):
    return llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=VALID)[0].token_ids


def assert_clean(llm):
    """Nothing queued or running, every block free."""
    assert llm.scheduler.idle and not llm.generators
    assert len(llm.blocks.free_blocks) == llm.blocks.num_blocks and not llm.blocks.tables


@pytest.mark.parametrize("call", [
    lambda llm: llm.generate(prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(logprobs=10000)),
    lambda llm: llm.generate(prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(prompt_logprobs=10000)),
    lambda llm: llm.generate(prompt_token_ids=[[5.5, 7]]),
    lambda llm: llm.generate(prompt_token_ids=[[5, 6, 7], [99999]]),  # the first prompt must not stay queued
    lambda llm: llm.generate(prompt_token_ids=[[5, 6, 7], []]),
    lambda llm: llm.generate(prompt_token_ids=[[True, 6]]),
    lambda llm: llm.generate(prompt_token_ids=[[5, 6]], sampling_params=[VALID, VALID]),
    lambda llm: llm.generate(prompt_token_ids=[[5, 6]], sampling_params="greedy"),
])
def test_a_bad_request_leaves_the_engine_as_it_was(llm, fresh_tokens, call):
    with pytest.raises(ValueError):
        call(llm)
    assert_clean(llm)
    assert llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=VALID)[0].token_ids == fresh_tokens


@pytest.mark.parametrize("kwargs,needle", [
    (dict(top_k=2.5), "top_k"), (dict(temperature=None), "temperature"), (dict(seed=2**70), "seed"),
    (dict(max_tokens=0), "max_tokens"), (dict(top_p=0), "top_p"), (dict(temperature=float("nan")), "temperature"),
    (dict(logprobs=-1), "logprobs"), (dict(stop=[""]), "stop"), (dict(stop=5), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(n=0), "n"), (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_sampling_params_reject_wrong_types_and_ranges(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kwargs)


def test_a_vanishing_temperature_is_greedy(llm, fresh_tokens):
    sp = SamplingParams(max_tokens=4, temperature=1e-40, ignore_eos=True, seed=3)
    assert sp.greedy
    assert llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=sp)[0].token_ids == fresh_tokens


def test_a_failed_step_aborts_its_requests_and_frees_their_blocks(llm, fresh_tokens, monkeypatch):
    real = llm.runner.forward
    calls = {"n": 0}

    def failing(batch):
        calls["n"] += 1
        if calls["n"] == 2:  # after the prefill, in the first decode step
            raise RuntimeError("injected failure")
        return real(batch)
    monkeypatch.setattr(llm.runner, "forward", failing)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(prompt_token_ids=[[5, 6, 7, 8], [9, 10]], sampling_params=VALID)
    assert_clean(llm)
    monkeypatch.setattr(llm.runner, "forward", real)
    assert llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=VALID)[0].token_ids == fresh_tokens


def test_leaving_a_stream_early_aborts_its_request(llm):
    stream = llm.stream([5, 6, 7], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert stream.seq.finish_reason == "abort"
    assert_clean(llm)


def test_streamed_text_holds_back_a_possible_stop_string(llm):
    free = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True))[0].text
    words = free.split()
    assert len(words) >= 3
    stop = " ".join(words[1:3])  # a stop string that spans tokens
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=stop)
    stream = llm.stream([5, 6, 7], sp)
    pieces = list(stream)
    assert "".join(pieces) == stream.text == free[:free.index(stop)]
    assert stream.output.finish_reason == "stop"


def test_hundreds_of_malformed_requests(llm, fresh_tokens):
    """Random types and values for every SamplingParams field and for the prompt ids, each call followed by a
    valid one: the engine stays usable, and every error is a one-line ValueError (or ModelError)."""
    rnd = random.Random(0)
    junk = [None, -1, 0, 1, 2.5, float("nan"), float("inf"), -1e300, 10**30, "x", "", True, [], [1], {}, 2**70,
            1e-40, [5, "a"], (3,), -2**63]
    fields = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
              "logprobs", "prompt_logprobs", "skip_special_tokens", "n"]
    prompts = [[5, 6], [], [[]], [[5, 99999]], [[-1]], [[5.0]], "text", [[5, None]], None, [[5] * 600], [[5], 6]]
    for i in range(300):
        kwargs = {f: rnd.choice(junk) for f in rnd.sample(fields, rnd.randint(1, 3))}
        ids = rnd.choice(prompts) if i % 3 == 0 else [[5, 6, 7]]
        try:
            params = SamplingParams(**{"max_tokens": 3, **kwargs})
            llm.generate(prompt_token_ids=ids, sampling_params=params)
        except (ValueError, ModelError) as e:
            assert "\n" not in str(e) and str(e), repr(e)
        assert_clean(llm)
        if i % 25 == 0:
            assert llm.generate(prompt_token_ids=[[5, 6, 7, 8]], sampling_params=VALID)[0].token_ids == fresh_tokens


# ---- the command line -----------------------------------------------------------------------------------------------
def test_prompt_that_is_not_utf8(capsys, checkpoints):
    bad = b"\xff\xfe text".decode("utf-8", errors="surrogateescape")  # what argv holds for such bytes
    expect_error(capsys, ["--model", checkpoints["v2_qlora"], "--prompt", bad], "--prompt", "UTF-8")


def test_prompt_from_stdin_version_and_tg_na():
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "generate", "--prompt", "-", "-n", "1",
                        "--device", "cpu"], input=b"The function returns", capture_output=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    assert b"prompt 4 tokens" in r.stderr and b"TG n/a" in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "--version"], capture_output=True, env=env)
    assert r.returncode == 0 and r.stdout.startswith(b"mla ")


def test_closed_pipe_and_full_disk():
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "cli.py"), "generate", "--prompt", "The function returns", "-n", "64",
           "--ignore-eos", "--device", "cpu"]
    r = subprocess.run(" ".join(f"'{c}'" for c in cmd) + " | head -c 5", shell=True, capture_output=True, env=env,
                       timeout=600)
    assert b"Traceback" not in r.stderr and b"Error" not in r.stderr, r.stderr.decode()
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            r = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, env=env, timeout=600)
        err = [l for l in r.stderr.decode().splitlines() if l.strip()]
        assert r.returncode == 1 and len(err) == 1 and "cannot write" in err[0], err


def test_chat_survives_a_turn_longer_than_the_context(checkpoints, capsys):
    import io
    args = cli.build_parser().parse_args(["chat", "--model", checkpoints["v2_lite"], "-n", "3", "--ignore-eos"])
    inputs = iter([" ".join(["the value"] * 400), "the name", "/exit"])
    out = io.StringIO()
    cli.cmd_chat(args, read=lambda _: next(inputs), out=out)
    err = capsys.readouterr().err
    assert "context" in err and "/reset" in err
    assert len(out.getvalue().splitlines()) == 1  # the second turn still ran


def test_chat_without_a_chat_template_fails_at_start(checkpoints, tmp_path, capsys):
    import shutil
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoints["v2_qlora"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in d.glob("chat_template*"):
        f.unlink()
    code = cli.main(["chat", "--model", str(d)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "chat template" in err[0]


@pytest.mark.parametrize("argv,needle", [
    (["--top-p", "1.5"], "--top-p"), (["--top-p", "0"], "--top-p"), (["--seed", str(2**70)], "--seed"),
    (["--kv-cache-gib", "inf"], "--kv-cache-gib"), (["--device", "tpu"], "--device"), (["--device", "cuda:x"], "--device"),
])
def test_flags_checked_at_parse_time(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--model", "/no/such/model", "--prompt", "x", *argv])  # never loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0]


def test_bench_refuses_tests_it_cannot_produce(capsys, checkpoints):
    m = checkpoints["v2_qlora"]  # max_position_embeddings 512
    for argv, needle in ((["-p", "0", "-n", "64", "-d", "500"], "context"), (["-p", "0", "-n", "2", "-b", "128"],
                                                                              "max_num_seqs")):
        code = cli.main(["bench", "--model", m, "-r", "1", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and needle in err[-1], err
    assert cli.main(["bench", "--model", m, "-p", "0", "-n", "0", "--output", "csv"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["bench", "--model", m, "--serve", "2", "--prompt-lens", "9,3"])


def test_missing_tokenizer_message(capsys, checkpoints, tmp_path):
    import shutil
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoints["v2_qlora"], d)
    for f in d.glob("tokenizer*"):
        f.unlink()
    err = expect_error(capsys, ["--model", str(d), "--prompt", "hi"], "no tokenizer")
    assert "prompt_token_ids" not in err


@pytest.mark.parametrize("field,value", [
    ("num_hidden_layers", -3), ("num_hidden_layers", 0), ("hidden_size", "64"), ("vocab_size", 12.5),
    ("rms_norm_eps", -1.0), ("kv_lora_rank", True), ("n_group", 0), ("routed_scaling_factor", "big"),
    ("max_position_embeddings", 0), ("tie_word_embeddings", "no"),
])
def test_config_fields_checked_where_read(capsys, checkpoints, tmp_path, field, value):
    import shutil
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoints["v2_qlora"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ["--model", str(d), "--prompt", "hi"], "config.json", field, repr(value))


def test_fewer_layers_than_the_checkpoint_holds(capsys, checkpoints, tmp_path):
    import shutil
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoints["v2_qlora"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] -= 1
    (d / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ["--model", str(d), "--prompt", "hi"], "unexpected tensors", "model.layers.2.")


def test_perplexity_context_limit_message(capsys, checkpoints, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the value of the list " * 300)
    code = cli.main(["perplexity", "--model", checkpoints["v2_qlora"], "--file", str(f), "--ctx", "600"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "at most 511" in err[-1]


def test_no_tokenizer_length_warning(capsys, llm):
    llm.encode("the value " * 2000)
    assert "longer than the specified maximum" not in capsys.readouterr().err
