"""OpenAI-compatible HTTP API over an ``AsyncEngine``: /v1/completions, /v1/chat/completions,
/v1/models, /health, /metrics (Prometheus text), /openapi.json (the request schemas).

Bad input never reaches the engine as an exception: malformed JSON, wrong types, unknown models,
out-of-range values and over-long prompts are answered with a 4xx and an OpenAI-style error body
(``{"error": {"message", "type", "param", "code"}}``); the engine's own checks raise
``ParameterError``, which carries the param and code. Bodies over ``max_request_bytes`` get a
413. Prompts are rendered and tokenized on worker threads, never on the event loop. A request
the engine fails gets a 500 with such a body (or, when streaming, an ``error`` event) and
nothing else is disturbed. A client that goes away aborts its request, which frees its KV
blocks and state slot.
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
from bamba.engine.params import merge_delta
from bamba.engine.prompts import check_token_ids
from bamba.sampling import ParameterError
from bamba.serve.async_engine import AsyncEngine
from bamba.serve.chat import render_chat
from bamba.serve.protocol import (ChatRequest, CompletionRequest, DetokenizeRequest,
                                  TokenizeRequest, auto_tool_chunks, chat_response,
                                  completion_response, error_body, stream_chunks,
                                  tool_dicts, tool_reply_chunks, usage, usage_chunk)
from bamba.serve.tools import PARSERS, AutoToolStream, ToolMode

log = logging.getLogger(__name__)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context
MAX_REQUEST_BYTES = 8 * 2**20  # request bodies beyond this get a 413


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)


def _bad_value(exc: ValueError) -> APIError:
    """A 400 for a refused request: a ParameterError names its param (and maybe a code)."""
    if isinstance(exc, ParameterError):
        return APIError(400, str(exc), param=exc.param, code=exc.code)
    return APIError(400, str(exc))


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


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
              max_request_bytes: int = MAX_REQUEST_BYTES,
              tool_call_parser: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` under the id ``model_name``; with ``api_key``,
    every /v1/ route needs ``Authorization: Bearer <api_key>``; ``tool_call_parser``
    (``serve.tools.PARSERS``) reads the calls of replies to tool_choice "auto"."""
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    if tool_call_parser not in (None, *PARSERS):
        raise ValueError(f"unknown tool-call parser {tool_call_parser!r}; known: "
                         f"{', '.join(PARSERS)}")
    app = FastAPI(title="bamba", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    _install_error_handlers(app)
    server = _Server(engine, model_name, tool_call_parser)

    if api_key:
        app.add_middleware(_RequireKey, api_key=api_key)
    app.add_middleware(_LimitBody, limit=max_request_bytes)

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
            params = body.completion_params(engine.llm.generation_defaults,
                                            COMPLETION_MAX_TOKENS)
            prompts = body.prompts()
            encoded = await asyncio.to_thread(server.encode_all, prompts)
            await asyncio.to_thread(engine.llm.compile_structured_outputs, params)
        except ValueError as exc:
            raise _bad_value(exc) from None
        if body.stream:  # one prompt, no echo (``prompts`` and ``completion_params`` say so)
            return await server.respond(request, body, encoded[0], params, chat=False)
        return await server.complete(request, body, prompts, encoded, params)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        server.check_model(body.model)
        if server.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: use /v1/completions with token ids")
        try:
            tool_mode = body.tool_mode(server.tool_call_parser)
            params = body.chat_sampling_params(engine.llm.generation_defaults, tool_mode)
            prompt = await asyncio.to_thread(server.encode_chat,
                                             [m.model_dump() for m in body.messages],
                                             body.tool_list())
            await asyncio.to_thread(engine.llm.compile_structured_outputs, params)
        except ValueError as exc:
            raise _bad_value(exc) from None
        return await server.respond(request, body, prompt, params, chat=True,
                                    tool_mode=tool_mode)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        server.check_model(body.model)
        try:
            body.check()
            tokens = await asyncio.to_thread(server.tokenize, body)
        except ValueError as exc:
            raise _bad_value(exc) from None
        return {"count": len(tokens), "max_model_len": engine.llm.max_model_len,
                "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        server.check_model(body.model)
        try:
            text = await asyncio.to_thread(server.detokenize, body.tokens)
        except ValueError as exc:
            raise _bad_value(exc) from None
        return {"prompt": text}

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


class _LimitBody:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413, whether it declares its
    length or streams in chunks (then it is cut off once it has sent too much)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await JSONResponse(self._body(), status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # answered by the HTTPException handler
                raise HTTPException(413, self._body()["error"]["message"])
            return message

        await self.app(scope, limited, send)

    def _body(self) -> dict[str, Any]:
        return error_body(f"the request body exceeds {self.limit} bytes",
                          code="request_too_large")


class _Server:
    """What the routes share: the engine, the model's id, its tokenizer and context length."""

    def __init__(self, engine: AsyncEngine, model_name: str, tool_call_parser: str | None):
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.llm.tokenizer
        self.tool_call_parser = tool_call_parser

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer \
            else str(ids[0])

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist (serving {self.model_name!r})",
                           param="model", code="model_not_found")

    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        """Checked token ids of a prompt (the engine's checks; run it off the event loop)."""
        return self.engine.llm.encode_prompt(prompt, param)[1]

    def encode_all(self, prompts: list[str | list[int]]) -> list[list[int]]:
        return [self.encode(p, "prompt") for p in prompts]

    def tokenize(self, body: TokenizeRequest) -> list[int]:
        """/tokenize: the ids of a text (special tokens added unless told not to), or of chat
        messages as rendered for /v1/chat/completions (the template writes its own)."""
        self._need_tokenizer()
        if body.prompt is not None:
            return self.tokenizer.encode(body.prompt, body.add_special_tokens is not False)
        messages = [m.model_dump() for m in body.messages or []]
        return self.tokenizer.encode(render_chat(self.tokenizer, messages, tool_dicts(body.tools)),
                                     body.add_special_tokens is True)

    def detokenize(self, tokens: list[int]) -> str:
        """/detokenize: the text of token ids (special tokens written out)."""
        self._need_tokenizer()
        if not tokens:
            return ""
        check_token_ids(tokens, self.engine.llm.config.vocab_size, "tokens")
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ParameterError("this model has no tokenizer", "model")

    def encode_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.encode(render_chat(self.tokenizer, messages, tools), "messages")

    async def respond(self, request: Request, body: Any, prompt: list[int],
                      params: SamplingParams, chat: bool, tool_mode: ToolMode | None = None
                      ) -> Response:
        """One request's reply; a reply held to the tools' schemas (``tool_mode`` required or a
        tool's name) streams whole."""
        rid = self.engine.new_id("chatcmpl" if chat else "cmpl")
        final_only = not body.stream or (tool_mode is not None and tool_mode.held)
        try:
            stream = await self.engine.generate(prompt, params, rid, final_only=final_only)
        except ValueError as exc:
            raise _bad_value(exc) from None
        except RuntimeError as exc:
            raise APIError(503, str(exc), "server_error") from None
        if body.stream:
            events = self._sse(stream, rid, chat, body.include_usage, len(prompt), tool_mode)
            return StreamingResponse(events, media_type="text/event-stream")
        finals = await _collect_unless_gone(request, [stream])
        if finals is None:  # the client is gone: nobody reads this
            return _gone()
        if chat:
            return JSONResponse(chat_response(finals[0], self.model_name, rid, self.decode,
                                              tool_mode))
        return JSONResponse(completion_response(finals, self.model_name, rid, self.decode))

    async def complete(self, request: Request, body: CompletionRequest,
                       prompts: list[str | list[int]], encoded: list[list[int]],
                       params: SamplingParams) -> Response:
        """A whole (non-streamed) completion of one or several prompts, each its own engine
        request; echoed prompts come back as sent (token ids as their decoded text)."""
        rid = self.engine.new_id("cmpl")
        ids = [f"{rid}-{i}" for i in range(len(encoded))]
        streams = []
        try:
            for request_id, prompt in zip(ids, encoded, strict=True):
                streams.append(await self.engine.generate(prompt, params, request_id,
                                                          final_only=True))
            finals = await _collect_unless_gone(request, streams)
        except BaseException as exc:  # no prompt of a failed request runs on
            self._abort(ids)
            if isinstance(exc, ValueError):
                raise _bad_value(exc) from None
            if isinstance(exc, RuntimeError):
                raise APIError(503, str(exc), "server_error") from None
            raise
        if finals is None:  # the client is gone: nobody reads this
            self._abort(ids)
            return _gone()
        echoed = None if not body.echo else \
            [p if isinstance(p, str) else self.decode(tokens)
             for p, tokens in zip(prompts, encoded, strict=True)]
        return JSONResponse(completion_response(finals, self.model_name, rid, self.decode,
                                                echoed, body.logprobs is not None))

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)

    async def _sse(self, stream: AsyncIterator[RequestOutput], rid: str, chat: bool,
                   include_usage: bool, prompt_tokens: int, tool_mode: ToolMode | None = None
                   ) -> AsyncIterator[str]:
        """Server-sent events, one per delta output; the engine failing this request ends it
        with an error event. Being cancelled (the client went away) closes ``stream``, which
        aborts the request."""
        started: set[int] = set()
        auto: dict[int, AutoToolStream] = {}
        generated = 0
        try:
            async for out in stream:
                _raise_if_failed(out)
                generated += sum(len(o.token_ids) for o in out.outputs)
                if tool_mode is None:
                    chunks = stream_chunks(out, self.model_name, rid, chat, started, self.decode)
                elif not tool_mode.held:
                    chunks = auto_tool_chunks(out, self.model_name, rid, auto, self.decode,
                                              tool_mode.parser or "hermes")
                else:
                    chunks = tool_reply_chunks(out, self.model_name, rid, tool_mode, self.decode)
                for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage:
                counts = usage(prompt_tokens, generated)
                yield f"data: {json.dumps(usage_chunk(counts, self.model_name, rid, chat))}\n\n"
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


def _gone() -> JSONResponse:
    return JSONResponse(error_body("client closed the request", "cancelled"), 499)


async def _collect_unless_gone(request: Request, streams: list[AsyncIterator[RequestOutput]]
                               ) -> list[RequestOutput] | None:
    """The finished outputs (each stream's deltas folded), or None when the client
    disconnected first (which aborts the requests: cancelling the consumers closes their
    streams). Raises APIError if the engine failed one of them."""

    async def consume(stream: AsyncIterator[RequestOutput]) -> RequestOutput | None:
        final = None
        try:
            async for out in stream:
                if final is None:
                    final = out
                else:
                    merge_delta(final, out)
        finally:
            await stream.aclose()
        return final

    async def watch() -> None:
        # The body is read: the server's next message is the disconnect (no polling, which
        # would wake the event loop on cores the engine needs).
        while (await request.receive())["type"] != "http.disconnect":
            pass

    consumers = [asyncio.create_task(consume(s)) for s in streams]
    gathered = asyncio.gather(*consumers)
    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait([gathered, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (*consumers, watcher):
            task.cancel()
        await asyncio.gather(*consumers, watcher, return_exceptions=True)
    if not gathered.done() or gathered.cancelled():
        return None
    try:
        finals = gathered.result()
    except RuntimeError as exc:  # the engine failed or is shutting down
        raise APIError(500, str(exc), "server_error", code="engine_error") from None
    for final in finals:
        if final is None:
            return None
        _raise_if_failed(final)
    return finals
