"""Start `mla serve`: load the model, start the engine loop, serve HTTP until SIGINT / SIGTERM, then stop taking
requests, give in-flight ones a few seconds, abort the rest and exit 0."""
import logging
import signal
import sys

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams

from .app import build_app
from .metrics import Metrics

GRACE_S = 3  # in-flight requests get this long after a signal before they are aborted


def serve(config: EngineConfig, host: str, port: int, model_name: str, api_key: str | None = None,
          max_queued_requests: int | None = None, max_body_bytes: int = 16 * 2**20, log_level: str = "info"):
    import uvicorn
    llm = LLM(config)
    # one token through the engine before listening: one-time work (the CPU kernels' build, allocations) is not
    # charged to the first client, and /health answers only when requests run at full speed
    llm.generate(prompt_token_ids=[[0]], sampling_params=SamplingParams(max_tokens=1, temperature=0))
    metrics = Metrics(model_name)
    engine = AsyncEngine(llm, max_queued_requests, metrics)
    metrics.watch(engine)
    app = build_app(engine, metrics, model_name, api_key, max_body_bytes)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=GRACE_S, lifespan="off"))
    # uvicorn re-raises the signal it caught once it has stopped; with these handlers that ends nothing, and the
    # command returns 0 (a signal is how a server is meant to stop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    engine.start()
    print(f"mla serve: {model_name} loaded (max context {llm.config.max_model_len} tokens); the API will be at "
          f"http://{host}:{port}/v1", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        engine.stop()
        llm.close()
    if not server.started:
        raise ValueError(f"cannot listen on {host}:{port} (in use, or not an address of this machine?)")
