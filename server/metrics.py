"""Prometheus metrics with vLLM's names under an `mla:` prefix, in a registry of the server's own (so that two
servers in one process, as in tests, do not collide)."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine.async_engine import AsyncEngine, StatsObserver

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics(StatsObserver):
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}
        self.running = Gauge("mla:num_requests_running", "Requests in the engine's running batch", registry=r)
        self.waiting = Gauge("mla:num_requests_waiting", "Requests waiting to be admitted", registry=r)
        self.kv_usage = Gauge("mla:kv_cache_usage_perc", "Share of the KV cache blocks in use (1 = all)", registry=r)
        self.preemptions = Gauge("mla:num_preemptions_total", "Preemptions since the start (cumulative)", registry=r)
        self.prefix_queries = Gauge("mla:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache",
                                    registry=r)
        self.prefix_hits = Gauge("mla:prefix_cache_hits_total", "Prompt tokens found in the prefix cache", registry=r)
        self.prompt_tokens = Counter("mla:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("mla:generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("mla:request_success", "Requests ended (finished or aborted)", registry=r)
        self.ttft = Histogram("mla:time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("mla:inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("mla:e2e_request_latency_seconds", "Arrival to last token", buckets=E2E_BUCKETS,
                             registry=r)
        self.info = Gauge("mla:model_info", "The served model", list(labels), registry=r)
        self.info.labels(**labels).set(1)

    def watch(self, engine: AsyncEngine):
        """The gauges read the engine loop's latest snapshot when scraped."""
        self.running.set_function(lambda: engine.stats.num_running)
        self.waiting.set_function(lambda: engine.stats.num_waiting)
        self.kv_usage.set_function(lambda: engine.stats.kv_cache_usage)
        self.preemptions.set_function(lambda: engine.stats.num_preemptions)
        self.prefix_queries.set_function(lambda: engine.stats.prefix_queried_tokens)
        self.prefix_hits.set_function(lambda: engine.stats.prefix_hit_tokens)

    # StatsObserver: called by the engine loop thread (prometheus_client's metrics are thread-safe)
    def first_token(self, seconds: float):
        self.ttft.observe(seconds)

    def next_token(self, seconds: float):
        self.itl.observe(seconds)

    def finished(self, num_prompt_tokens: int, num_output_tokens: int, seconds: float):
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        self.requests.inc()
        self.e2e.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
