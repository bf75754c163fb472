"""OpenAI-compatible HTTP server over the engine (``bamba serve``); needs the ``serve`` extra.

- ``async_engine.AsyncEngine``: the ``LLM`` on its own thread; requests in, outputs out through
  per-request asyncio queues; leaving a stream early aborts the request.
- ``app.build_app(engine, model_name, api_key=None)``: the FastAPI app (/v1/completions,
  /v1/chat/completions, /v1/models, /health, /metrics).
- ``protocol``: request models (strict types) and response payloads; ``chat``: chat template
  rendering and the default template; ``metrics``: counters and Prometheus text.
"""
