"""The serving benchmark, as `vllm bench serve` runs it: random-length requests (prompt token ids, generation
lengths, EOS ignored, greedy) sent with at most `concurrency` in flight, through any OpenAI-compatible server
(run_http: ours, llama.cpp's llama-server, ...) or straight through the engine in this process (run_engine), so
that the two see the same requests. Request throughput, output tok/s, time to first token and inter-token latency
(p50 / p90 / p99), end-to-end latency."""
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

    def flat(self) -> dict:
        """One level of keys (ttft_p50_s, ...), for json."""
        d = asdict(self)
        for name in ("ttft", "itl", "e2e"):
            for p, v in d.pop(f"{name}_s").items():
                d[f"{name}_p{p}_s"] = v
        return d


def make_requests(num: int, prompt_lens: tuple[int, int], gen_lens: tuple[int, int], vocab_size: int,
                  seed: int = 0) -> list[BenchRequest]:
    """The same list for the same arguments, whoever serves it. Ids from 3 up: 0..2 are often pad / bos / eos."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        n = int(torch.randint(prompt_lens[0], prompt_lens[1] + 1, (1,), generator=g))
        m = int(torch.randint(gen_lens[0], gen_lens[1] + 1, (1,), generator=g))
        out.append(BenchRequest(torch.randint(3, vocab_size, (n,), generator=g).tolist(), m))
    return out


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
              wall: float) -> Result:
    ok = [(r, t) for r, t in zip(requests, timings) if t.error is None and t.output_times]
    ttft = [t.output_times[0] - t.start for _, t in ok]
    itl = [b - a for _, t in ok for a, b in zip(t.output_times, t.output_times[1:])]
    e2e = [t.output_times[-1] - t.start for _, t in ok]
    prompt = sum(len(r.prompt_token_ids) for r, _ in ok)
    output = sum(t.num_output_tokens for _, t in ok)
    pct = lambda xs: {p: percentile(xs, p) for p in PERCENTILES}
    return Result(target, concurrency, len(requests), len(requests) - len(ok), wall, prompt, output, len(ok) / wall,
                  output / wall, (prompt + output) / wall, pct(ttft), pct(itl), pct(e2e))


# ---- through the engine in this process ----------------------------------------------------------------------
def run_engine(llm, requests: list[BenchRequest], concurrency: int, warmup: bool = True) -> Result:
    """At most `concurrency` requests in the engine at once; the next is added as soon as one finishes."""
    from engine.sampling_params import SamplingParams

    def params(r):
        return SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
    if warmup:
        llm.generate(prompt_token_ids=[requests[0].prompt_token_ids[:16]], sampling_params=SamplingParams(
            max_tokens=2, temperature=0, ignore_eos=True))
    pending = deque(enumerate(requests))
    timings: list[Timing | None] = [None] * len(requests)
    active: dict[int, int] = {}  # seq_id -> request index
    t0 = time.perf_counter()
    while pending or active:
        while pending and len(active) < concurrency:
            i, r = pending.popleft()
            timings[i] = Timing(time.perf_counter())
            active[llm.add_request(r.prompt_token_ids, params(r)).seq_id] = i
        events = llm.step()
        now = time.perf_counter()
        for seq, _ in events:
            t = timings[active[seq.seq_id]]
            t.output_times.append(now)
            t.num_output_tokens = len(seq.output_token_ids)
            if seq.finished:
                del active[seq.seq_id]
    return summarize("in-process", concurrency, requests, timings, time.perf_counter() - t0)


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
                if chunk.get("choices"):  # as vllm bench serve: every chunk is output, empty text or not
                    t.output_times.append(time.perf_counter())
                    chunks += 1
    except Exception as e:  # a failed request is counted, the run goes on
        t.error = f"{type(e).__name__}: {e}"
    if not t.num_output_tokens:
        t.num_output_tokens = chunks  # a server without usage in streams: one token per chunk
    return t


async def _run_http(url: str, requests: list[BenchRequest], concurrency: int, api_key: str | None,
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
            t = await _one(client, url, model, BenchRequest(requests[0].prompt_token_ids[:16], 2), headers)
            if t.error:
                raise ValueError(f"--url {url}: the warm-up request failed ({t.error})")
        gate = asyncio.Semaphore(concurrency)

        async def limited(r):
            async with gate:
                return await _one(client, url, model, r, headers)
        t0 = time.perf_counter()
        timings = await asyncio.gather(*(limited(r) for r in requests))
        wall = time.perf_counter() - t0
    return summarize(url, concurrency, requests, timings, wall)


def run_http(url: str, requests: list[BenchRequest], concurrency: int, api_key: str | None = None,
             timeout: float = 3600.0, warmup: bool = True) -> Result:
    return asyncio.run(_run_http(url.rstrip("/"), requests, concurrency, api_key, timeout, warmup))


def report(results: list[Result], output: str = "md") -> str:
    if output == "json":
        flat = [r.flat() for r in results]
        return json.dumps(flat[0] if len(flat) == 1 else flat, indent=1)
    ms = lambda d: " / ".join(f"{1e3 * d[p]:.0f}" for p in PERCENTILES)
    head = ["target", "concurrency", "requests", "prompt + output tokens", "req/s", "output tok/s",
            "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms", "E2E p50/p90/p99 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        failed = f" ({r.failed} failed)" if r.failed else ""
        lines.append(f"| {r.target} | {r.concurrency} | {r.requests}{failed} | {r.prompt_tokens} + {r.output_tokens} | "
                     f"{r.request_tps:.2f} | {r.output_tps:.2f} | {ms(r.ttft_s)} | {ms(r.itl_s)} | {ms(r.e2e_s)} |")
    return "\n".join(lines)
