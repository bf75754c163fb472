"""OpenAI-compatible HTTP API over an ``AsyncEngine``: /v1/completions, /v1/chat/completions,
/v1/models, /health, /metrics (Prometheus text).

Bad input never reaches the engine as an exception: malformed JSON, wrong types, unknown models,
out-of-range values and over-long prompts are answered with a 4xx and an OpenAI-style error body.
A client that goes away aborts its request, which frees its KV blocks and state slot.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from bamba.serve.async_engine import AsyncEngine
from bamba.serve.protocol import (DEFAULT_CHAT_TEMPLATE, ChatRequest, CompletionRequest,
                                  chat_response, completion_response, error_body, stream_chunks)

log = logging.getLogger(__name__)


def _error(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return JSONResponse(error_body(message, **kwargs), status_code=status)


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="bamba", docs_url=None, redoc_url=None)
    tokenizer = engine.llm.tokenizer

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False) if tokenizer else str(ids[0])

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return _error(400, f"{where or 'request'}: {first.get('msg', 'invalid request')}",
                      param=where)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "invalid or missing API key", kind="authentication_error",
                              code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "bamba"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(engine))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        try:
            prompt, params = body.single_prompt(), body.sampling_params(body.logprobs)
        except ValueError as exc:
            return _error(400, str(exc))
        return await _serve(request, body, prompt, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        if tokenizer is None:
            return _error(400, "this model has no tokenizer: use /v1/completions with token ids")
        try:
            params = body.sampling_params(body.chat_logprobs())
            if tokenizer.chat_template is None:
                tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
            prompt = tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
        except ValueError as exc:
            return _error(400, str(exc))
        except Exception as exc:  # a template that fails to render on these messages
            return _error(400, f"chat template failed: {exc}")
        return await _serve(request, body, prompt, params, chat=True)

    async def _serve(request: Request, body: Any, prompt: Any, params: Any,
                     chat: bool) -> Response:
        if body.model != model_name:
            return _error(404, f"model {body.model!r} does not exist (serving {model_name!r})",
                          param="model", code="model_not_found")
        rid = engine.new_id("chatcmpl" if chat else "cmpl")
        try:
            stream = await engine.generate(prompt, params, rid)
        except ValueError as exc:
            return _error(400, str(exc))
        if body.stream:
            return StreamingResponse(_sse(stream, rid, chat), media_type="text/event-stream")
        final = None
        try:
            async for out in stream:
                final = out
                if await request.is_disconnected():
                    break
        finally:  # leaving early (disconnect, cancellation) aborts the request
            await stream.aclose()
        if final is None or not final.finished:
            return _error(499, "client closed the request", kind="cancelled")
        if any(o.finish_reason == "error" for o in final.outputs):
            return _error(500, "the engine failed on this request", kind="server_error")
        build = chat_response if chat else completion_response
        return JSONResponse(build(final, model_name, rid, decode))

    async def _sse(stream: AsyncIterator, rid: str, chat: bool) -> AsyncIterator[str]:
        first = True
        try:
            async for out in stream:
                for chunk in stream_chunks(out, model_name, rid, chat, first, decode):
                    yield f"data: {json.dumps(chunk)}\n\n"
                first = False
        except RuntimeError as exc:  # the engine failed or is shutting down
            yield f"data: {json.dumps(error_body(str(exc), kind='server_error'))}\n\n"
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"

    return app


def render_metrics(engine: AsyncEngine) -> str:
    """Prometheus text exposition of the engine's gauges and counters."""
    m, s = engine.metrics, engine.metrics.stats
    lines = []

    def add(name: str, kind: str, value: float, help_text: str, labels: str = "") -> None:
        if not labels or not any(line.startswith(f"# TYPE {name} ") for line in lines):
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.append(f"{name}{labels} {value}")

    add("bamba_requests_running", "gauge", s.num_running, "Requests running.")
    add("bamba_requests_waiting", "gauge", s.num_waiting, "Requests waiting for memory.")
    add("bamba_kv_blocks_in_use", "gauge", s.num_blocks - s.num_free_blocks, "KV blocks in use.")
    add("bamba_kv_blocks_total", "gauge", s.num_blocks, "KV blocks in the pool.")
    add("bamba_state_slots_in_use", "gauge", s.num_slots - s.num_free_slots,
        "Mamba state slots in use.")
    add("bamba_state_slots_total", "gauge", s.num_slots, "Mamba state slots in the pool.")
    add("bamba_prefix_cache_hit_rate", "gauge", s.prefix_cache_hit_rate,
        "Share of prompt tokens served from the prefix cache.")
    add("bamba_preemptions_total", "counter", s.num_preemptions, "Sequences preempted.")
    add("bamba_prompt_tokens_total", "counter", m.prompt_tokens, "Prompt tokens processed.")
    add("bamba_generation_tokens_total", "counter", m.generation_tokens, "Tokens generated.")
    add("bamba_generation_tokens_per_second", "gauge", m.tokens_per_second(),
        "Tokens generated per second over the last 10 s.")
    add("bamba_time_to_first_token_seconds_sum", "counter", m.ttft_sum,
        "Total time to first token.")
    add("bamba_time_to_first_token_seconds_count", "counter", m.ttft_count,
        "Requests that produced a first token.")
    for reason, count in sorted(m.finished.items()):
        add("bamba_requests_finished_total", "counter", count, "Finished sequences by reason.",
            f'{{finish_reason="{reason}"}}')
    return "\n".join(lines) + "\n"
