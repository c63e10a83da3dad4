"""The serving benchmark, as `vllm bench serve` runs it: random-length requests (prompt token ids, generation
lengths, EOS ignored, greedy) sent with at most `concurrency` in flight, through any OpenAI-compatible server
(run_http: ours, llama.cpp's llama-server, ...) or straight through the engine in this process (run_engine), so
that the two see the same requests. Request throughput, output tok/s, time to first token and inter-token latency
(p50 / p90 / p99), end-to-end latency, and what the server reports of its prefix cache and preemptions.

A workload is a list of sessions, each a list of requests sent one after another (the next when the last has
finished); `concurrency` bounds the sessions in flight. make_requests gives sessions of one request; make_chats gives
multi-turn conversations in which every turn resends the conversation so far (earlier messages and replies) with a
new user message, as a chat client does."""
import asyncio
import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import torch

PERCENTILES = (50, 90, 99)


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class Timing:
    """One request's clock: when it was sent, when each piece of output came (a chunk, or an engine step)."""
    start: float
    output_times: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    cached_tokens: int | None = None
    error: str | None = None


@dataclass
class Result:
    target: str  # the URL, or "in-process"
    concurrency: int
    requests: int
    failed: int
    wall_s: float
    prompt_tokens: int
    output_tokens: int
    request_tps: float  # requests per second
    output_tps: float
    total_tps: float
    ttft_s: dict  # percentile -> seconds
    itl_s: dict
    e2e_s: dict
    cached_tokens: int | None = None  # prompt tokens the server found in its cache (None: it did not say)
    preemptions: int | None = None

    def flat(self) -> dict:
        """One level of keys (ttft_p50_s, ...), for json."""
        d = asdict(self)
        for name in ("ttft", "itl", "e2e"):
            for p, v in d.pop(f"{name}_s").items():
                d[f"{name}_p{p}_s"] = v
        return d


Session = list[BenchRequest]


def make_requests(num: int, prompt_lens: tuple[int, int], gen_lens: tuple[int, int], vocab_size: int,
                  seed: int = 0) -> list[Session]:
    """The same list for the same arguments, whoever serves it. Ids from 3 up: 0..2 are often pad / bos / eos."""
    return make_chats(num, 1, prompt_lens, prompt_lens, gen_lens, vocab_size, seed)


def make_chats(num: int, turns: int, first_lens: tuple[int, int], user_lens: tuple[int, int],
               gen_lens: tuple[int, int], vocab_size: int, seed: int = 0) -> list[Session]:
    """num conversations of `turns` requests: the first message's length from first_lens, later ones' from
    user_lens. Turn k's prompt is every message and reply before it plus the k-th message; a reply stands in the
    history as random ids of the length it was asked for (the same ids whichever server answered, so every server
    is sent the same requests; a server can reuse the previous turn's prompt from its cache, not its reply)."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda lens: int(torch.randint(lens[0], lens[1] + 1, (1,), generator=g))  # noqa: E731
    ids = lambda n: torch.randint(3, vocab_size, (n,), generator=g).tolist()  # noqa: E731
    chats = []
    for _ in range(num):
        history, chat = [], []
        for turn in range(turns):
            n, m = draw(user_lens if turn else first_lens), draw(gen_lens)
            chat.append(BenchRequest(history + ids(n), m))
            if turn + 1 < turns:
                history = chat[-1].prompt_token_ids + ids(m)
        chats.append(chat)
    return chats


def percentile(xs: list[float], p: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); nan for no values."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(target: str, concurrency: int, requests: list[BenchRequest], timings: list[Timing],
              wall: float, cached_tokens: int | None = None, preemptions: int | None = None) -> Result:
    ok = [(r, t) for r, t in zip(requests, timings) if t.error is None and t.output_times]
    ttft = [t.output_times[0] - t.start for _, t in ok]
    itl = [b - a for _, t in ok for a, b in zip(t.output_times, t.output_times[1:])]
    e2e = [t.output_times[-1] - t.start for _, t in ok]
    prompt = sum(len(r.prompt_token_ids) for r, _ in ok)
    output = sum(t.num_output_tokens for _, t in ok)
    pct = lambda xs: {p: percentile(xs, p) for p in PERCENTILES}
    return Result(target, concurrency, len(requests), len(requests) - len(ok), wall, prompt, output, len(ok) / wall,
                  output / wall, (prompt + output) / wall, pct(ttft), pct(itl), pct(e2e), cached_tokens, preemptions)


# ---- through the engine in this process ----------------------------------------------------------------------
def run_engine(llm, sessions: list[Session], concurrency: int, warmup: bool = True) -> Result:
    """At most `concurrency` sessions in the engine at once; a session's next request is added as soon as its last
    finishes, and the next session as soon as one ends."""
    from engine.sampling_params import SamplingParams

    def params(r):
        return SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
    if warmup:
        llm.generate(prompt_token_ids=[sessions[0][0].prompt_token_ids[:16]], sampling_params=SamplingParams(
            max_tokens=2, temperature=0, ignore_eos=True))
    requests = [r for s in sessions for r in s]
    first = [sum(map(len, sessions[:i])) for i in range(len(sessions))]  # index of each session's first request
    pending = deque(range(len(sessions)))
    timings: list[Timing | None] = [None] * len(requests)
    active: dict[int, tuple[int, int]] = {}  # seq_id -> (session, turn)

    def add(session: int, turn: int):
        i = first[session] + turn
        timings[i] = Timing(time.perf_counter())
        active[llm.add_request(requests[i].prompt_token_ids, params(requests[i])).seq_id] = (session, turn)
    before = llm.stats()
    t0 = time.perf_counter()
    while pending or active:
        while pending and len(active) < concurrency:
            add(pending.popleft(), 0)
        events = llm.step()
        now = time.perf_counter()
        for seq, _ in events:
            session, turn = active[seq.seq_id]
            t = timings[first[session] + turn]
            t.output_times.append(now)
            t.num_output_tokens = len(seq.output_token_ids)
            if seq.finished:
                del active[seq.seq_id]
                if turn + 1 < len(sessions[session]):
                    add(session, turn + 1)
    wall = time.perf_counter() - t0
    after = llm.stats()
    return summarize("in-process", concurrency, requests, timings, wall,
                     after.prefix_hit_tokens - before.prefix_hit_tokens, after.num_preemptions - before.num_preemptions)


# ---- through HTTP ----------------------------------------------------------------------------------------------
async def _one(client, url: str, model: str, r: BenchRequest, headers: dict) -> Timing:
    body = {"model": model, "prompt": r.prompt_token_ids, "max_tokens": r.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t = Timing(time.perf_counter())
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                t.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return t
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    t.error = str(chunk["error"])
                    return t
                if chunk.get("usage"):
                    t.num_output_tokens = chunk["usage"].get("completion_tokens", 0)
                    t.cached_tokens = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
                if t.cached_tokens is None and "cache_n" in (chunk.get("timings") or {}):  # llama-server's own field
                    t.cached_tokens = chunk["timings"]["cache_n"]
                if chunk.get("choices"):  # as vllm bench serve: every chunk is output, empty text or not
                    t.output_times.append(time.perf_counter())
                    chunks += 1
    except Exception as e:  # a failed request is counted, the run goes on
        t.error = f"{type(e).__name__}: {e}"
    if not t.num_output_tokens:
        t.num_output_tokens = chunks  # a server without usage in streams: one token per chunk
    return t


async def _preemptions(client, url: str, headers: dict) -> int | None:
    """mla:num_preemptions_total from the server's /metrics, if it has it."""
    r = await client.get(url + "/metrics", headers=headers)
    for line in r.text.splitlines() if r.status_code == 200 else []:
        if line.startswith("mla:num_preemptions_total "):
            return int(float(line.split()[1]))
    return None


async def _run_http(url: str, sessions: list[Session], concurrency: int, api_key: str | None,
                    timeout: float, warmup: bool) -> Result:
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        models = await client.get(url + "/v1/models", headers=headers)
        if models.status_code != 200:
            raise ValueError(f"--url {url}: GET /v1/models answered {models.status_code}")
        model = models.json()["data"][0]["id"]
        if warmup:
            t = await _one(client, url, model, BenchRequest(sessions[0][0].prompt_token_ids[:16], 2), headers)
            if t.error:
                raise ValueError(f"--url {url}: the warm-up request failed ({t.error})")
        gate = asyncio.Semaphore(concurrency)

        async def converse(session):
            async with gate:
                return [await _one(client, url, model, r, headers) for r in session]
        preempted = await _preemptions(client, url, headers)
        t0 = time.perf_counter()
        timings = [t for ts in await asyncio.gather(*(converse(s) for s in sessions)) for t in ts]
        wall = time.perf_counter() - t0
        if preempted is not None:
            preempted = await _preemptions(client, url, headers) - preempted
    cached = [t.cached_tokens for t in timings if t.error is None]
    return summarize(url, concurrency, [r for s in sessions for r in s], timings, wall,
                     sum(cached) if cached and None not in cached else None, preempted)


def run_http(url: str, sessions: list[Session], concurrency: int, api_key: str | None = None,
             timeout: float = 3600.0, warmup: bool = True) -> Result:
    return asyncio.run(_run_http(url.rstrip("/"), sessions, concurrency, api_key, timeout, warmup))


def report(results: list[Result], output: str = "md") -> str:
    if output == "json":
        flat = [r.flat() for r in results]
        return json.dumps(flat[0] if len(flat) == 1 else flat, indent=1)
    ms = lambda d: " / ".join(f"{1e3 * d[p]:.0f}" for p in PERCENTILES)
    head = ["target", "concurrency", "requests", "prompt + output tokens", "req/s", "output tok/s",
            "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms", "E2E p50/p90/p99 ms", "prompt tokens cached", "preemptions"]
    na = lambda x: "-" if x is None else str(x)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        failed = f" ({r.failed} failed)" if r.failed else ""
        lines.append(f"| {r.target} | {r.concurrency} | {r.requests}{failed} | {r.prompt_tokens} + {r.output_tokens} | "
                     f"{r.request_tps:.2f} | {r.output_tps:.2f} | {ms(r.ttft_s)} | {ms(r.itl_s)} | {ms(r.e2e_s)} | "
                     f"{na(r.cached_tokens)} | {na(r.preemptions)} |")
    return "\n".join(lines)
