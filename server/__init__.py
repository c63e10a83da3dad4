"""`mla serve`: an OpenAI-compatible HTTP server on the engine (protocol.py: request bodies, app.py: routes,
metrics.py: Prometheus, run.py: start and stop)."""
