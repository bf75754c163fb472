"""OpenAI-compatible HTTP API over an ``AsyncEngine``: /v1/completions, /v1/chat/completions,
/v1/models, /health, /metrics (Prometheus text).

Bad input never reaches the engine as an exception: malformed JSON, wrong types, unknown models,
out-of-range values and over-long prompts are answered with a 4xx and an OpenAI-style error body
(``{"error": {"message", "type", "param", "code"}}``). A request the engine fails gets a 500
with such a body (or, when streaming, an ``error`` event) and nothing else is disturbed. A
client that goes away aborts its request, which frees its KV blocks and state slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from bamba.engine import RequestOutput, SamplingParams
from bamba.serve.async_engine import AsyncEngine
from bamba.serve.chat import render_chat
from bamba.serve.protocol import (ChatRequest, CompletionRequest, chat_response,
                                  completion_response, error_body, stream_chunks, usage_chunk)

log = logging.getLogger(__name__)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context
DISCONNECT_POLL = 0.25  # seconds between checks that a non-streaming client is still there
_FIELDS = set(CompletionRequest.model_fields) | set(ChatRequest.model_fields)


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)


def _bad_value(exc: ValueError) -> APIError:
    """A 400 for a ValueError whose message starts with the offending field's name."""
    message = str(exc)
    head = message.split(maxsplit=1)[0].rstrip(":") if message else ""
    return APIError(400, message, param=head if head in _FIELDS else None)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"{where or 'request body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(message, param=where), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"),
                            status_code=500)


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` under the id ``model_name``; with ``api_key``,
    every /v1/ route needs ``Authorization: Bearer <api_key>``."""
    app = FastAPI(title="bamba", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)
    server = _Server(engine, model_name)

    if api_key:
        app.add_middleware(_RequireKey, api_key=api_key)

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "bamba",
                                            "max_model_len": engine.llm.max_model_len}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        server.check_model(body.model)
        try:
            prompt = server.prompt_ids(body.single_prompt(), "prompt")
            params = body.sampling_params(body.logprobs, COMPLETION_MAX_TOKENS)
        except ValueError as exc:
            raise _bad_value(exc) from None
        return await server.respond(request, body, prompt, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        server.check_model(body.model)
        if server.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: use /v1/completions with token ids")
        try:
            params = body.chat_sampling_params()
            text = render_chat(server.tokenizer, [m.model_dump() for m in body.messages])
            prompt = server.prompt_ids(text, "messages")
        except ValueError as exc:
            raise _bad_value(exc) from None
        return await server.respond(request, body, prompt, params, chat=True)

    return app


class _RequireKey:
    """ASGI middleware: /v1/ routes need ``Authorization: Bearer <key>`` (compared in constant
    time). Plain ASGI rather than ``@app.middleware`` so that handlers still see disconnects."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = error_body("invalid or missing API key", "authentication_error",
                                  code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Server:
    """What the routes share: the engine, the model's id, its tokenizer and context length."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.llm.tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer \
            else str(ids[0])

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist (serving {self.model_name!r})",
                           param="model", code="model_not_found")

    def prompt_ids(self, prompt: str | list[int], param: str) -> list[int]:
        """Token ids of a prompt, checked against the vocabulary and the context length."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{param}: this model has no tokenizer; send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = prompt
        vocab, limit = self.engine.llm.config.vocab_size, self.engine.llm.max_model_len
        if not ids:
            raise ValueError(f"{param}: the prompt is empty")
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"{param}: token ids must be in [0, {vocab})")
        if len(ids) >= limit:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is "
                           f"{limit} tokens and must leave room for one generated token",
                           param=param, code="context_length_exceeded")
        return ids

    async def respond(self, request: Request, body: Any, prompt: list[int],
                      params: SamplingParams, chat: bool) -> Response:
        rid = self.engine.new_id("chatcmpl" if chat else "cmpl")
        try:
            stream = await self.engine.generate(prompt, params, rid)
        except ValueError as exc:
            raise _bad_value(exc) from None
        except RuntimeError as exc:
            raise APIError(503, str(exc), "server_error") from None
        if body.stream:
            events = self._sse(stream, rid, chat, body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        final = await _collect_unless_gone(request, stream)
        if final is None:  # the client is gone: nobody reads this
            return JSONResponse(error_body("client closed the request", "cancelled"), 499)
        build = chat_response if chat else completion_response
        return JSONResponse(build(final, self.model_name, rid, self.decode))

    async def _sse(self, stream: AsyncIterator[RequestOutput], rid: str, chat: bool,
                   include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events; the engine failing this request ends it with an error event.
        Being cancelled (the client went away) closes ``stream``, which aborts the request."""
        started: set[int] = set()
        last = None
        try:
            async for out in stream:
                last = out
                _raise_if_failed(out)
                for chunk in stream_chunks(out, self.model_name, rid, chat, started,
                                           self.decode):
                    yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage and last is not None:
                yield f"data: {json.dumps(usage_chunk(last, self.model_name, rid, chat))}\n\n"
        except (APIError, RuntimeError) as exc:
            body = exc.body if isinstance(exc, APIError) else error_body(str(exc), "server_error")
            yield f"data: {json.dumps(body)}\n\n"
        except Exception as exc:  # a bug here must end this stream cleanly, not the server
            log.exception("stream %s failed", rid)
            yield f"data: {json.dumps(error_body(type(exc).__name__, 'server_error'))}\n\n"
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"


def _raise_if_failed(out: RequestOutput) -> None:
    if any(o.finish_reason == "error" for o in out.outputs):
        raise APIError(500, "the engine failed on this request; it was stopped",
                       "server_error", code="engine_error")


async def _collect_unless_gone(request: Request,
                               stream: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    """The finished output, or None when the client disconnected first (which aborts the
    request: cancelling the consumer closes ``stream``). Raises APIError if the engine failed."""

    async def consume() -> RequestOutput | None:
        final = None
        try:
            async for out in stream:
                final = out
        finally:
            await stream.aclose()
        return final

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL)

    consumer, watcher = asyncio.create_task(consume()), asyncio.create_task(watch())
    try:
        await asyncio.wait([consumer, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (consumer, watcher):
            task.cancel()
        await asyncio.gather(consumer, watcher, return_exceptions=True)
    if not consumer.done() or consumer.cancelled():
        return None
    try:
        final = consumer.result()
    except RuntimeError as exc:  # the engine failed or is shutting down
        raise APIError(500, str(exc), "server_error", code="engine_error") from None
    if final is not None:
        _raise_if_failed(final)
    return final
