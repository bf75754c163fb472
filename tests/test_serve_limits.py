"""What a hostile or careless client must not do to the server: values that overflow float32,
lone surrogates, huge bodies and prompts, streams nobody reads, idle sockets. Each is refused or
contained, and every other request, /health, and the KV blocks and state slots are unharmed."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from bamba.engine import LLM, SamplingParams  # noqa: E402
from bamba.serve.app import build_app  # noqa: E402
from bamba.serve.async_engine import AsyncEngine, FellBehind  # noqa: E402
from bamba.serve.http import PROTOCOLS, RateLimit  # noqa: E402
from serve_helpers import running, save_tiny_checkpoint  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("limits") / "ckpt")


def make_llm(checkpoint: Path) -> LLM:
    return LLM(str(checkpoint), memory_gb=0.002, block_size=4, max_num_seqs=16,
               max_num_batched_tokens=128, max_model_len=96)


@pytest.fixture(scope="module", params=sorted(PROTOCOLS))
def served(checkpoint: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, AsyncEngine]]:
    """The server over each HTTP implementation installed (httptools, h11)."""
    engine = AsyncEngine(make_llm(checkpoint)).start()
    app = build_app(engine, NAME, max_request_bytes=20_000)
    with running(app, head_timeout=1.0, http=request.param) as base:
        yield base, engine
    engine.shutdown()


def wait_idle(engine: AsyncEngine, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.llm.stats()
        if not engine.llm.has_unfinished_requests() and s.num_free_blocks == s.num_blocks \
                and s.num_free_slots == s.num_slots:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.llm.stats()}")


def post(base: str, body: object, path: str = "/v1/completions") -> "httpx.Response":
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(base + path, content=content, timeout=30,
                      headers={"Content-Type": "application/json"})


HI = {"model": NAME, "prompt": "hi", "max_tokens": 5}
CHAT = {"model": NAME, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
FLOAT32_TRAPS = [("temperature", 1e39), ("temperature", 1e-30), ("repetition_penalty", 1e39),
                 ("repetition_penalty", 1e-39), ("repetition_penalty", 1e30),
                 ("presence_penalty", -1e39), ("frequency_penalty", 1e39), ("top_p", 1e-46),
                 ("min_p", 1e39)]


@pytest.mark.parametrize("param, value", FLOAT32_TRAPS)
def test_values_that_break_float32_are_refused_naming_the_param(served, param: str,
                                                                 value: float) -> None:
    base, engine = served
    for path, body in (("/v1/completions", HI), ("/v1/chat/completions", CHAT)):
        r = post(base, {**body, param: value}, path)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
    ok = post(base, {**HI, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
    wait_idle(engine)


@pytest.mark.parametrize("field, value, reasons", [
    ("temperature", 1e39, {"error"}),  # inf in float32: building the batch raises
    ("temperature", 1e-42, {"error", "length"}),  # logits / T overflow: that row is NaN
    ("repetition_penalty", 3e38, {"error", "length"}),  # penalised logits reach -inf
])
def test_a_bad_row_fails_or_garbles_only_its_request(checkpoint: Path, field: str,
                                                     value: float, reasons: set[str]) -> None:
    """Values that slipped past admission (set after validation) either make batched
    sampling raise, and only their request ends with an error, or turn their own row into
    NaNs: the other requests draw exactly what they draw alone."""
    llm = make_llm(checkpoint)
    good = SamplingParams(max_tokens=6, temperature=0.9, seed=3, ignore_eos=True,
                          repetition_penalty=1.3, logprobs=2)
    alone = llm.generate([5, 6, 7], good)[0].outputs[0].token_ids
    bad = SamplingParams(max_tokens=6, temperature=0.9, ignore_eos=True)
    setattr(bad, field, value)
    llm.add_request([5, 6, 8], bad, "bad")
    llm.add_request([5, 6, 7], good, "good")
    finished = {}
    while llm.has_unfinished_requests():
        finished.update({o.request_id: o for o in llm.step() if o.finished})
    assert finished["bad"].outputs[0].finish_reason in reasons
    assert finished["good"].outputs[0].finish_reason == "length"
    assert finished["good"].outputs[0].token_ids == alone
    s = llm.stats()
    assert s.num_free_blocks == s.num_blocks and s.num_free_slots == s.num_slots


LONE = "a\ud800b"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {**HI, "prompt": LONE}),
    ("/v1/completions", {**HI, "stop": [LONE]}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": LONE}]}),
    ("/v1/chat/completions", {**CHAT, "stop": LONE}),
])
def test_lone_surrogates_are_400(served, path: str, body: dict) -> None:
    base, _ = served
    raw = json.dumps(body).encode()  # json.dumps writes the surrogate as the escape \ud800
    assert b"\\ud800" in raw
    r = post(base, raw, path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("prompt", "messages", "stop")


def test_request_bodies_over_the_limit_get_413(served) -> None:
    base, engine = served
    big = {**HI, "prompt": "x" * 30_000}
    assert post(base, big).status_code == 413  # declared by Content-Length

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off once too much arrived
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    r = httpx.post(base + "/v1/completions", content=chunks(), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"]
    assert post(base, {**HI, "prompt": "x" * 20}).status_code == 200
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    wait_idle(engine)


def test_prompt_that_cannot_fit_is_refused_without_tokenizing(served) -> None:
    base, engine = served
    tokenizer = engine.llm.tokenizer
    calls = []
    real = tokenizer.encode
    tokenizer.encode = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        r = post(base, {**HI, "prompt": "word " * 3000})
    finally:
        del tokenizer.encode
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert not calls
    assert post(base, {**HI, "prompt": "word " * 100}).json()["error"]["code"] == \
        "context_length_exceeded"  # fits the byte bound, tokenized, then refused


def test_health_answers_while_a_prompt_is_tokenized(served) -> None:
    base, engine = served
    tokenizer = engine.llm.tokenizer
    real = tokenizer.encode
    started = threading.Event()

    def slow(*args: Any, **kwargs: Any) -> list[int]:
        started.set()
        time.sleep(3)
        return real(*args, **kwargs)

    tokenizer.encode = slow
    try:
        result: list[int] = []
        worker = threading.Thread(target=lambda: result.append(post(base, HI).status_code))
        worker.start()
        assert started.wait(10)
        t0 = time.monotonic()
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        assert time.monotonic() - t0 < 1.0
        worker.join(30)
    finally:
        del tokenizer.encode
    assert result == [200]
    wait_idle(engine)


def test_a_stream_nobody_reads_stays_bounded_and_is_aborted(checkpoint: Path) -> None:
    engine = AsyncEngine(make_llm(checkpoint), max_pending_outputs=4).start()
    params = SamplingParams(max_tokens=60, n=3, ignore_eos=True, logprobs=3, seed=1)

    async def main() -> tuple[int, Exception | None]:
        stream = await engine.generate([5, 6, 7], params, "unread")
        while engine.llm.has_unfinished_requests():  # the client reads nothing meanwhile
            await asyncio.sleep(0.02)
        held, error = 0, None
        try:
            async for out in stream:
                held += sum(len(o.token_ids) for o in out.outputs)
        except FellBehind as exc:
            error = exc
        return held, error

    try:
        held, error = asyncio.run(main())
        assert isinstance(error, FellBehind)
        assert 0 < held <= 5 * params.n  # at most max_pending_outputs + 1 steps were kept
        assert engine.metrics.finished.get("abort") == 1
        wait_idle(engine)
    finally:
        engine.shutdown()


def test_a_slow_reader_gets_coalesced_deltas_that_add_up(checkpoint: Path) -> None:
    llm = make_llm(checkpoint)
    params = SamplingParams(max_tokens=30, n=2, ignore_eos=True, logprobs=2, seed=9,
                            temperature=0.8)
    expected = llm.generate([5, 6, 7], params)[0]
    engine = AsyncEngine(llm).start()

    async def main() -> tuple[dict[int, list[int]], dict[int, str], int]:
        stream = await engine.generate([5, 6, 7], params, "slow")
        ids: dict[int, list[int]] = {0: [], 1: []}
        texts, reads = {0: "", 1: ""}, 0
        async for out in stream:
            reads += 1
            for o in out.outputs:
                ids[o.index] += o.token_ids
                texts[o.index] += o.text
                assert len(o.logprobs) == len(o.token_ids)
            await asyncio.sleep(0.05)
        return ids, texts, reads

    try:
        ids, texts, reads = asyncio.run(main())
    finally:
        engine.shutdown()
    assert reads < 30  # outputs were folded while the reader slept
    assert [ids[o.index] for o in expected.outputs] == [o.token_ids for o in expected.outputs]
    assert [texts[o.index] for o in expected.outputs] == [o.text for o in expected.outputs]


def test_idle_and_half_sent_connections_are_closed(served) -> None:
    base, _ = served
    port = int(base.rsplit(":", 1)[1])
    socks = []
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 2:
            s.sendall(b"GET /hea")  # a request line that never ends
        socks.append(s)
    try:
        assert httpx.get(base + "/health", timeout=5).status_code == 200
        deadline = time.monotonic() + 5
        for s in socks:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            assert s.recv(1024) == b""  # closed by the server within the head timeout
        assert httpx.get(base + "/health", timeout=5).status_code == 200
    finally:
        for s in socks:
            s.close()


def test_keep_alive_connection_is_closed_after_its_head_timeout(served) -> None:
    base, _ = served
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):  # head and body may come apart
            answer += s.recv(4096)
        assert b"200 OK" in answer
        s.sendall(b"GET /health HTTP/1.1\r\n")  # then never finishes the next head
        assert s.recv(1024) == b""


def test_repeated_log_messages_are_rate_limited() -> None:
    logger = logging.getLogger("bamba.test.rate")
    logger.propagate = False
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    limit = RateLimit(interval=0.3)
    logger.addFilter(limit)
    try:
        for _ in range(1000):
            logger.error("socket.accept() out of system resource")
        logger.error("something else")
        time.sleep(0.35)
        logger.error("socket.accept() out of system resource")
    finally:
        logger.removeFilter(limit)
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "socket.accept() out of system resource", "something else",
        "socket.accept() out of system resource (999 more like it held back)"]


def test_connections_beyond_the_limit_get_503(served) -> None:
    _, engine = served
    with running(build_app(engine, NAME), max_connections=3) as base:
        port = int(base.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            time.sleep(0.2)  # let the server take them
            assert httpx.get(base + "/health", timeout=5).status_code == 503
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 5
        while httpx.get(base + "/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_an_http_client_that_stops_reading_has_its_request_aborted(checkpoint: Path) -> None:
    """Small socket buffers on both ends: the stream's writes block soon, its events pile up
    in the request's mailbox, and the engine aborts the request instead of finishing it."""
    engine = AsyncEngine(make_llm(checkpoint), max_pending_outputs=4).start()
    body = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 90, "n": 8, "logprobs": 5,
            "ignore_eos": True, "stream": True}
    payload = json.dumps(body).encode()
    try:
        with running(build_app(engine, NAME), send_buffer=4096) as base:
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", int(base.rsplit(":", 1)[1])))
            try:
                client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                               b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(payload), payload))  # and never read the answer
                deadline = time.monotonic() + 60
                while engine.metrics.finished.get("abort", 0) == 0:
                    assert time.monotonic() < deadline, engine.metrics.finished
                    time.sleep(0.05)
                wait_idle(engine)
                assert "length" not in engine.metrics.finished  # no sample ran to its end
            finally:
                client.close()
    finally:
        engine.shutdown()
