"""`mla serve`: a real server process on a free port, driven by the official openai client and raw HTTP."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from engine import LLM, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key-123"
NAME = "tiny"
MAX_BODY_MIB = 0.05  # ~52 KB: a small bound, so that the test of it sends little


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, log_path: str, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "cli.py"), "serve", "--model", model, "--host", "127.0.0.1",
             "--port", str(self.port), "--dtype", "float32", "--kv-cache-gib", "0.05", "--served-model-name", NAME,
             *flags], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 300):  # a first run on a machine may build the CPU kernels
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not healthy within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    s = ServerProcess(checkpoints["v2_qlora"], str(tmp_path_factory.mktemp("serve") / "server.log"),
                      "--api-key", KEY, "--max-request-mib", str(MAX_BODY_MIB))
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(checkpoints["v2_qlora"], device="cpu", dtype="float32", progress=False, kv_cache_memory_gib=0.05)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


# ---- results equal the engine's ---------------------------------------------------------------------------------
def test_greedy_completions_equal_llm_generate(client, llm):
    texts = ["the value of the list", "function returns a string"]
    want = llm.generate(texts, greedy(10))
    got = client.completions.create(model=NAME, prompt=texts, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == [w.text for w in want]
    assert [c.finish_reason for c in got.choices] == ["length", "length"]
    assert got.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    assert got.usage.completion_tokens == 20 and got.usage.total_tokens == got.usage.prompt_tokens + 20
    assert got.usage.prompt_tokens_details.cached_tokens == 0
    # token id prompts, one and several
    ids = [[5, 9, 11, 13], [7, 8]]
    want = llm.generate(prompt_token_ids=ids, sampling_params=greedy(6))
    one = client.completions.create(model=NAME, prompt=ids[0], max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert one.choices[0].text == want[0].text
    two = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.text for c in two.choices] == [w.text for w in want]


def test_sampling_fields_reach_the_engine(client, llm):
    kw = dict(temperature=1.3, top_p=0.9, seed=5, presence_penalty=0.5, frequency_penalty=0.3)
    extra = dict(top_k=20, min_p=0.02, repetition_penalty=1.2, ignore_eos=True)
    want = llm.generate("the value", SamplingParams(max_tokens=8, **kw, **extra))[0].text
    got = client.completions.create(model=NAME, prompt="the value", max_tokens=8, **kw, extra_body=extra)
    assert got.choices[0].text == want
    # n > 1: n seeded sequences (seed, seed + 1, ...), as LLM.generate runs them
    want = [o.text for o in llm.generate("the value", SamplingParams(max_tokens=8, n=3, **kw, **extra))]
    got = client.completions.create(model=NAME, prompt="the value", max_tokens=8, n=3, **kw, extra_body=extra)
    assert sorted(c.index for c in got.choices) == [0, 1, 2]
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want
    # stop strings and stop token ids
    free = llm.generate("the value", greedy(12))[0]
    stop = free.text.split()[2]
    got = client.completions.create(model=NAME, prompt="the value", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].finish_reason == "stop" and got.choices[0].text == free.text[:free.text.index(stop)]
    got = client.completions.create(model=NAME, prompt="the value", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [free.token_ids[3]]})
    assert got.choices[0].finish_reason == "stop" and got.usage.completion_tokens == free.token_ids.index(
        free.token_ids[3]) + 1


def test_logprobs_and_echo(client, llm):
    want = llm.generate("the value of", greedy(4, logprobs=2, prompt_logprobs=2))[0]
    got = client.completions.create(model=NAME, prompt="the value of", max_tokens=4, temperature=0, logprobs=2,
                                    echo=True, extra_body={"ignore_eos": True})
    c = got.choices[0]
    assert c.text == "the value of" + want.text  # the prompt as sent
    n_prompt = len(want.prompt_token_ids)
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt + 4
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(
        [e[t] for t, e in zip(want.prompt_token_ids[1:], want.prompt_logprobs[1:])], abs=1e-5)
    assert lp.token_logprobs[n_prompt:] == pytest.approx([e[t] for t, e in zip(want.token_ids, want.logprobs)], abs=1e-5)
    assert all(len(top) >= 2 for top in lp.top_logprobs[n_prompt:])
    # chat style: logprobs + top_logprobs
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "the list"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)  # greedy: the top one is the sampled


def test_streamed_deltas_concatenate_to_the_text(client):
    kw = dict(model=NAME, prompt="the value of the list", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    # chat: the role first, then content deltas, then the finish reason
    msgs = [{"role": "user", "content": "the value"}]
    full = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_goes_through_the_chat_template(client, llm):
    msgs = [{"role": "system", "content": "be short"}, {"role": "user", "content": "the value of the list"},
            {"role": "assistant", "content": "a list"}, {"role": "user", "content": "and the string"}]
    ids = llm.chat_prompt(msgs)
    want = llm.generate(prompt_token_ids=[ids], sampling_params=greedy(8))[0]
    got = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(ids)
    # content as a list of text parts, and max_completion_tokens
    parts = [dict(m, content=[{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}])
             for m in msgs]
    got2 = client.chat.completions.create(model=NAME, messages=parts, max_completion_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert got2.choices[0].message.content == want.text


def test_a_dozen_concurrent_streams(server):
    async def one(c, i):
        n = 5 + 3 * i
        stream = await c.completions.create(model=NAME, prompt=f"the value {i}", max_tokens=n, temperature=0.8,
                                            seed=i, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return n, usage.completion_tokens, finish

    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(12))), 120)
    for asked, got, finish in asyncio.run(main()):
        assert got == asked and finish == "length"


def test_other_routes(server, http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == NAME
    tok = http.post("/tokenize", json={"prompt": "the value"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"].endswith("the value")
    chat_tok = http.post("/tokenize", json={"messages": [{"role": "user", "content": "the value"}]}).json()
    assert chat_tok["count"] > tok["count"]
    text = http.get("/metrics").text
    for name in ("mla:num_requests_running", "mla:num_requests_waiting", "mla:kv_cache_usage_perc",
                 "mla:prompt_tokens_total", "mla:generation_tokens_total", "mla:num_preemptions_total",
                 "mla:time_to_first_token_seconds_bucket", "mla:inter_token_latency_seconds_bucket",
                 "mla:e2e_request_latency_seconds_bucket"):
        assert name in text, name
    assert metric(http, "mla:generation_tokens_total") > 0 and metric(http, "mla:time_to_first_token_seconds_count") > 0


def test_a_repeated_prefix_is_reported_as_cached_tokens(client, server, http):
    """The second request repeats the first one's 200 leading tokens: the prefix cache holds their full blocks (of
    64), and usage says so; /metrics counts the lookups and hits."""
    prefix = [(7 * i) % 120 + 3 for i in range(200)]
    first = client.completions.create(model=NAME, prompt=prefix + [5, 6], max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    hits = metric(http, "mla:prefix_cache_hits_total")
    second = client.completions.create(model=NAME, prompt=prefix + [9], max_tokens=2, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens == 192  # 3 whole blocks of 64 before the last token
    assert metric(http, "mla:prefix_cache_hits_total") - hits == 192
    assert metric(http, "mla:prefix_cache_queries_total") >= 2 * 200


# ---- errors -------------------------------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", b'{"prompt": "x", ', 400, None),  # invalid JSON
    ("/v1/completions", b'[1, 2]', 400, None),  # JSON, but not an object
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),  # missing field
    ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),  # wrong type
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 6.5]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),  # out of range
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {"prompt": [], "max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * 500, "max_tokens": 100}, 400, "max_tokens"),  # longer than the context
    ("/v1/completions", {"prompt": [5] * 600}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 128]}, 400, "prompt"),  # outside the vocabulary
    ("/v1/completions", {"prompt": [5, -1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),  # unknown model
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**6}, 400,
     "max_completion_tokens"),
    ("/detokenize", {"tokens": [1, 500]}, 400, "tokens"),
    ("/v1/nothing-here", {}, 404, None),  # unknown route
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{p}-{i}" for i, (p, *_ ) in enumerate(BAD)])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, http, path, body, status, param):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = http.post(path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    assert "Traceback" not in r.text and "Traceback" not in server.output()
    if param is not None:
        assert err["param"] == param, err
    ok = http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_errors_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics need no key


def test_body_size_limit(server, http):
    big = json.dumps({"prompt": "x" * int(MAX_BODY_MIB * 2**20 + 10)}).encode()
    r = http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: refused while it is read
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]
    r = http.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}).status_code == 200


def _wait_metric(http, name, value, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(http, name) == value:
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_its_stream_aborts_the_request(server, http):
    before = metric(http, "mla:generation_tokens_total")
    body = {"prompt": [5, 6, 7], "max_tokens": 500, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert metric(http, "mla:num_requests_running") == 1
    assert _wait_metric(http, "mla:num_requests_running", 0)
    assert _wait_metric(http, "mla:kv_cache_usage_perc", 0)
    assert metric(http, "mla:generation_tokens_total") - before < 500
    # also a non-streamed request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        # 500 steps take far longer than 0.1 s on any machine
        http.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 500, "ignore_eos": True}, timeout=0.1)
    assert _wait_metric(http, "mla:num_requests_running", 0)
    assert http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}).status_code == 200


def test_bench_url_sends_the_same_requests_as_in_process(server, checkpoints, capsys):
    import cli
    flags = ["--model", checkpoints["v2_qlora"], "--prompt-lens", "4,12", "--gen-lens", "3,7", "--output", "json"]
    assert cli.main(["bench", "--url", server.url, "--api-key", KEY, "--num-prompts", "5", "--concurrency", "1,3",
                     *flags]) == 0
    over_http = json.loads(capsys.readouterr().out)
    assert cli.main(["bench", "--serve", "5", "--concurrency", "1", "--dtype", "float32", "--kv-cache-gib", "0.05",
                     *flags]) == 0
    in_process = json.loads(capsys.readouterr().out)
    assert [r["concurrency"] for r in over_http] == [1, 3] and in_process["concurrency"] == 1
    for r in over_http + [in_process]:
        assert r["requests"] == 5 and r["failed"] == 0
        assert (r["prompt_tokens"], r["output_tokens"]) == (in_process["prompt_tokens"], in_process["output_tokens"])
        assert 0 < r["ttft_p50_s"] <= r["e2e_p99_s"] <= r["wall_s"] and r["output_tps"] > 0
    # chats: the server reports the prompt tokens its cache held (usage) and its preemptions (/metrics)
    assert cli.main(["bench", "--url", server.url, "--api-key", KEY, "--num-prompts", "2", "--turns", "2",
                     "--concurrency", "2", "--model", checkpoints["v2_qlora"], "--prompt-lens", "70,80", "--gen-lens", "3,7",
                     "--output", "json"]) == 0
    chats = json.loads(capsys.readouterr().out)
    assert chats["requests"] == 4 and chats["failed"] == 0
    assert chats["cached_tokens"] >= 2 * 64 and chats["preemptions"] == 0  # each second turn finds a 64-token block
    assert cli.main(["bench", "--url", server.url, "--num-prompts", "1", *flags]) == 1  # no key: a one-line error
    assert "401" in capsys.readouterr().err


def test_a_full_queue_answers_503_then_sigterm_exits_0(checkpoints, tmp_path):
    s = ServerProcess(checkpoints["v2_qlora"], str(tmp_path / "server.log"), "--max-num-seqs", "1",
                      "--max-queued-requests", "1")
    try:
        s.wait_healthy()

        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                body = {"prompt": [5, 6, 7], "max_tokens": 300, "ignore_eos": True}
                return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(5)))
        responses = asyncio.run(main())
        busy = [r for r in responses if r.status_code == 503]
        assert busy and all(r.headers["Retry-After"] and r.json()["error"]["type"] == "server_error" for r in busy)
        assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 300
                   for r in responses if r.status_code != 503)
        # SIGTERM with a stream in flight: it ends, the process exits 0 within a few seconds
        with httpx.stream("POST", s.url + "/v1/completions", timeout=30, json={
                "prompt": [5, 6, 7], "max_tokens": 450, "ignore_eos": True, "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data:"))
            t = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            assert s.proc.wait(15) == 0
            assert time.monotonic() - t < 10
        assert "Traceback" not in s.output()
    finally:
        s.stop()


def _stat(pid) -> tuple[str, int] | None:
    """Linux: (state, parent pid) of a process, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return None
    return state, int(ppid)


def _children(pid: int) -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and (_stat(d) or ("", 0))[1] == pid]


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"  # a zombie has exited (nobody may reap it in a container)


def test_two_ranks_serve_one_ranks_tokens_and_exit_on_sigterm(checkpoints, llm, tmp_path):
    """`mla serve --tp 2`: the engine loop drives both ranks; greedy text equals one rank's, streamed or not, and
    SIGTERM ends the server and its second rank."""
    s = ServerProcess(checkpoints["v2_qlora"], str(tmp_path / "server.log"), "--tp", "2")
    try:
        s.wait_healthy()
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        texts = ["the value of the list", "function returns"]
        want = [w.text for w in llm.generate(texts, greedy(8))]
        got = client.completions.create(model=NAME, prompt=texts, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert [c.text for c in got.choices] == want
        stream = client.completions.create(model=NAME, prompt=texts[0], max_tokens=8, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream if c.choices) == want[0]
        ranks = _children(s.proc.pid)
        assert ranks  # the second rank is a process of the server's
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(20) == 0
        deadline = time.monotonic() + 10
        while any(map(_alive, ranks)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, ranks))
        assert "Traceback" not in s.output()
    finally:
        s.stop()
