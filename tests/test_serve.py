"""The OpenAI-compatible server, end to end over HTTP on 127.0.0.1: the official client
(completions and chat, streaming too), malformed requests answered with 4xx, engine failures
that stay inside their request, client disconnects that free memory, and a concurrent load with
cancellations that must leave no request, KV block or state slot behind."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from bamba.engine import LLM  # noqa: E402
from bamba.serve.app import build_app  # noqa: E402
from bamba.serve.async_engine import AsyncEngine  # noqa: E402
from serve_helpers import running, save_tiny_checkpoint  # noqa: E402

NAME = "tiny-bamba"
KEY = "secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
POISON = 299  # a prompt holding this token makes the model runner fail (see `failing_runner`)


class ErrorLog(logging.Handler):
    """Collects ERROR records of the server's loggers (uvicorn's and ours)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, AsyncEngine]]:
    directory = save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt")
    llm = LLM(str(directory), memory_gb=0.002, block_size=4, max_num_seqs=128,
              max_num_batched_tokens=256, max_model_len=96)
    engine = AsyncEngine(llm).start()
    with running(build_app(engine, NAME, KEY)) as base:
        yield base, engine
    engine.shutdown()


@pytest.fixture
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "bamba")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)


def client(base: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)


def wait_idle(engine: AsyncEngine, timeout: float = 30) -> None:
    """Wait until no request runs or waits and every KV block and state slot is free."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.llm.stats() if not engine.llm.has_unfinished_requests() else None
        if s and s.num_running == s.num_waiting == 0 and s.num_free_blocks == s.num_blocks \
                and s.num_free_slots == s.num_slots:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.metrics.stats}")


def test_openai_client_completions_stream_and_not(server) -> None:
    base, engine = server
    c = client(base)
    whole = c.completions.create(model=NAME, prompt="State space models", max_tokens=8,
                                 temperature=0, extra_body={"ignore_eos": True}, logprobs=2)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 8
    assert whole.usage.prompt_tokens == len(engine.llm.tokenizer.encode("State space models"))
    assert len(choice.logprobs.token_logprobs) == 8 and len(choice.logprobs.top_logprobs[0]) == 2
    pieces = c.completions.create(model=NAME, prompt="State space models", max_tokens=8,
                                  temperature=0, extra_body={"ignore_eos": True}, stream=True,
                                  stream_options={"include_usage": True})
    chunks = list(pieces)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == choice.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    ids = c.completions.create(model=NAME, prompt=[5, 17, 42], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens <= 3
    wait_idle(engine)


def test_openai_client_chat_stream_and_not(server) -> None:
    base, engine = server
    c = client(base)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Attention layers keep keys"}]
    whole = c.chat.completions.create(model=NAME, messages=messages, max_tokens=6,
                                      temperature=0, seed=3)
    assert whole.choices[0].message.role == "assistant"
    prompt = engine.llm.tokenizer.encode(
        "<|system|>\nBe brief.\n<|user|>\nAttention layers keep keys\n<|assistant|>\n")
    assert whole.usage.prompt_tokens == len(prompt)  # the documented default template
    stream = c.chat.completions.create(model=NAME, messages=messages, max_tokens=6,
                                       temperature=0, seed=3, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == \
        whole.choices[0].message.content
    sampled = [c.chat.completions.create(model=NAME, messages=messages, max_tokens=6,
                                         temperature=1.0, seed=11).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded
    parts = [{"role": "user", "content": [{"type": "text", "text": "Attention layers "},
                                          {"type": "text", "text": "keep keys"}]}]
    joined = c.chat.completions.create(model=NAME, messages=parts, max_tokens=2, temperature=0)
    assert joined.usage.prompt_tokens == len(engine.llm.tokenizer.encode(
        "<|user|>\nAttention layers keep keys\n<|assistant|>\n"))
    assert [m.id for m in c.models.list().data] == [NAME]
    wait_idle(engine)


def test_chat_n_samples_stream_each_choice(server) -> None:
    base, engine = server
    stream = client(base).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Numbers"}], max_tokens=5, n=3,
        temperature=1.0, seed=5, stream=True, extra_body={"ignore_eos": True})
    texts: dict[int, str] = {}
    roles, finished = set(), set()
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.delta.role == "assistant":
                roles.add(ch.index)
            if ch.finish_reason:
                finished.add(ch.index)
    assert roles == finished == {0, 1, 2}
    whole = client(base).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Numbers"}], max_tokens=5, n=3,
        temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    assert [texts[i] for i in range(3)] == [ch.message.content for ch in whole.choices]
    wait_idle(engine)


def _post(base: str, path: str, body: object) -> "httpx.Response":
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(base + path, content=content, timeout=30,
                      headers={**AUTH, "Content-Type": "application/json"})


HI = {"model": NAME, "prompt": "hi"}
BAD = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"", 400),
    ("/v1/completions", {"model": "other", "prompt": "hi"}, 404),
    ("/v1/completions", {"model": NAME, "prompt": "word " * 200}, 400),
    ("/v1/completions", {"model": NAME, "prompt": list(range(3, 99))}, 400),
    ("/v1/completions", {**HI, "max_tokens": 0}, 400),
    ("/v1/completions", {**HI, "max_tokens": -3}, 400),
    ("/v1/completions", {**HI, "max_tokens": 2.5}, 400),
    ("/v1/completions", {**HI, "max_tokens": "8"}, 400),
    ("/v1/completions", {**HI, "temperature": -1}, 400),
    ("/v1/completions", {**HI, "temperature": "hot"}, 400),
    ("/v1/completions", {**HI, "temperature": "0.5"}, 400),
    ("/v1/completions", {**HI, "temperature": True}, 400),
    ("/v1/completions", {**HI, "top_p": 2}, 400),
    ("/v1/completions", {**HI, "top_p": 0}, 400),
    ("/v1/completions", {**HI, "min_p": 1.5}, 400),
    ("/v1/completions", {**HI, "top_k": -2}, 400),
    ("/v1/completions", {**HI, "top_k": 10**30}, 400),
    ("/v1/completions", {**HI, "presence_penalty": 3}, 400),
    ("/v1/completions", {**HI, "frequency_penalty": -2.5}, 400),
    ("/v1/completions", {**HI, "repetition_penalty": 0}, 400),
    ("/v1/completions", {**HI, "seed": 2**64}, 400),
    ("/v1/completions", {**HI, "seed": -1}, 400),
    ("/v1/completions", {**HI, "n": "two"}, 400),
    ("/v1/completions", {**HI, "n": 0}, 400),
    ("/v1/completions", {**HI, "n": 1000}, 400),
    ("/v1/completions", {**HI, "logprobs": 1000}, 400),
    ("/v1/completions", {**HI, "stop": [""]}, 400),
    ("/v1/completions", {**HI, "stop": 5}, 400),
    ("/v1/completions", {**HI, "stop_token_ids": [2**40]}, 400),
    ("/v1/completions", {**HI, "stream": "yes"}, 400),
    ("/v1/completions", {**HI, "echo": True, "stream": True}, 400),
    ("/v1/completions", {**HI, "max_tokens": 0, "logprobs": 1}, 400),
    ("/v1/completions", {**HI, "logit_bias": {"x": 10}}, 400),
    ("/v1/completions", {**HI, "logit_bias": {"5": 101}}, 400),
    ("/v1/completions", {**HI, "logit_bias": {"5": "10"}}, 400),
    ("/v1/completions", {**HI, "logit_bias": {"99999": 1}}, 400),
    ("/v1/completions", {"model": NAME, "prompt": [1, 99999]}, 400),
    ("/v1/completions", {"model": NAME, "prompt": [1, -5]}, 400),
    ("/v1/completions", {"model": NAME, "prompt": [1, True]}, 400),
    ("/v1/completions", {"model": NAME, "prompt": ["a", ""]}, 400),
    ("/v1/completions", {"model": NAME, "prompt": ["a", "b"], "stream": True}, 400),
    ("/v1/completions", {"model": NAME, "prompt": [[5, 6]] * 300}, 400),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400),
    ("/v1/completions", {"model": NAME, "prompt": []}, 400),
    ("/v1/completions", {"model": NAME, "prompt": {"text": "hi"}}, 400),
    ("/v1/completions", {"model": NAME}, 400),
    ("/v1/completions", {"prompt": "hi"}, 400),
    ("/v1/completions", {"model": 7, "prompt": "hi"}, 400),
    ("/v1/completions", [1, 2, 3], 400),
    ("/v1/completions", "just a string", 400),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "x", "content": "a"}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"content": "a"}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": "hello"}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": [
        {"role": "user", "content": "word " * 200}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "top_logprobs": 50, "logprobs": True,
                              "messages": [{"role": "user", "content": "a"}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "max_completion_tokens": 0,
                              "messages": [{"role": "user", "content": "a"}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "tools": [{"type": "function"}],
                              "messages": [{"role": "user", "content": "a"}]}, 400),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "a"}]},
     404),
    ("/v1/nothing", {}, 404),
]


@pytest.mark.parametrize("path, body, status", BAD)
def test_bad_requests_get_openai_style_4xx(server, path: str, body: object, status: int) -> None:
    base, engine = server
    r = _post(base, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and set(error) == {"message", "type", "param", "code"}
    assert httpx.get(base + "/health").json() == {"status": "ok"}


def test_wrong_method_and_named_params(server) -> None:
    base, _ = server
    r = httpx.get(base + "/v1/completions", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["message"]
    assert _post(base, "/v1/completions", {**HI, "temperature": "hot"}).json()["error"][
        "param"] == "temperature"
    assert _post(base, "/v1/completions", {**HI, "top_p": 2}).json()["error"]["param"] == "top_p"
    long = _post(base, "/v1/completions", {"model": NAME, "prompt": "word " * 200}).json()
    assert long["error"]["code"] == "context_length_exceeded"
    assert _post(base, "/v1/completions", {"model": "x", "prompt": "a"}).json()["error"][
        "code"] == "model_not_found"


def test_bad_requests_then_good_ones(server, error_log: ErrorLog) -> None:
    base, engine = server
    for _, body, _ in BAD[:12]:
        assert 400 <= _post(base, "/v1/completions", body).status_code < 500
    good = _post(base, "/v1/completions", {**HI, "max_tokens": 3, "temperature": None,
                                           "top_p": None, "unknown_field": 1})
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"]
    chat = _post(base, "/v1/chat/completions",
                 {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 2})
    assert chat.status_code == 200
    wait_idle(engine)
    assert not error_log.records


def test_api_key_required(server) -> None:
    base, _ = server
    r = httpx.post(base + "/v1/completions", json=HI)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(base + "/v1/completions", json=HI,
                      headers={"Authorization": "Bearer nope"}).status_code == 401
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(base + "/health").status_code == 200  # not behind the key


def _metric(text: str, name: str) -> float:
    values = [line.split()[-1] for line in text.splitlines() if line.split(" ")[0] == name]
    assert len(values) == 1, (name, values)
    return float(values[0])


def test_metrics_expose_pools_rates_and_ttft_histogram(server) -> None:
    base, engine = server
    wait_idle(engine)
    client(base).completions.create(model=NAME, prompt="Numbers 0123", max_tokens=3)
    text = httpx.get(base + "/metrics").text
    for name in ("bamba_requests_running", "bamba_requests_waiting", "bamba_kv_blocks_in_use",
                 "bamba_state_slots_in_use", "bamba_prefix_cache_hit_rate",
                 "bamba_generation_tokens_per_second"):
        assert _metric(text, name) >= 0
    s = engine.llm.stats()
    assert _metric(text, "bamba_kv_blocks_total") == s.num_blocks
    assert _metric(text, "bamba_state_slots_total") == s.num_slots
    assert _metric(text, "bamba_generation_tokens_total") >= 3
    assert _metric(text, "bamba_engine_step_seconds_total") > 0
    assert 0 < _metric(text, "bamba_engine_between_steps_seconds_total") < \
        _metric(text, "bamba_engine_step_seconds_total")
    buckets = [float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("bamba_time_to_first_token_seconds_bucket")]
    count = _metric(text, "bamba_time_to_first_token_seconds_count")
    assert count >= 1 and buckets == sorted(buckets) and buckets[-1] == count
    assert "# TYPE bamba_time_to_first_token_seconds histogram" in text


@pytest.fixture
def failing_runner(server) -> Iterator[list[int]]:
    """Make the runner raise on a step holding a sequence whose prompt contained POISON, at
    its third generated token; yields the list of failures seen."""
    _, engine = server
    runner = engine.llm.runner
    real, poisoned, failures = runner.execute, {}, []

    def execute(chunks: list[Any]) -> Any:
        for c in chunks:
            if POISON in c.token_ids and c.start == 0:
                poisoned[c.seq_id] = c.start + len(c.token_ids)
            if c.seq_id in poisoned and c.start >= poisoned[c.seq_id] + 2:
                failures.append(c.seq_id)
                raise RuntimeError("injected failure")
        return real(chunks)

    runner.execute = execute
    yield failures
    runner.execute = real


def test_engine_failure_fails_only_that_request(server, failing_runner: list[int],
                                                 error_log: ErrorLog) -> None:
    base, engine = server
    wait_idle(engine)
    c = client(base)
    body = {"model": NAME, "prompt": [5, POISON, 7], "max_tokens": 10, "ignore_eos": True}
    r = _post(base, "/v1/completions", body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    wait_idle(engine)
    events = []
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True},
                      headers=AUTH, timeout=30) as s:
        assert s.status_code == 200
        events = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "choices" in events[0] and events[-1]["error"]["type"] == "server_error"
    with pytest.raises(openai.APIError):
        list(c.completions.create(model=NAME, prompt=[5, POISON, 7], max_tokens=10,
                                  stream=True, extra_body={"ignore_eos": True}))
    assert len(failing_runner) == 3
    assert any("injected failure" in str(r.exc_info) for r in error_log.records)  # logged
    wait_idle(engine)  # the failed requests' blocks and slots are back
    ok = c.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=10,
                              extra_body={"ignore_eos": True})
    assert ok.choices[0].finish_reason == "length" and ok.usage.completion_tokens == 10


@pytest.fixture
def slow_engine(server) -> Iterator[None]:
    """Each engine step takes at least 50 ms, so a request outlives a short client timeout."""
    runner = server[1].llm.runner
    real = runner.execute

    def execute(chunks: list[Any]) -> Any:
        time.sleep(0.05)
        return real(chunks)

    runner.execute = execute
    yield
    runner.execute = real


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_and_frees(server, slow_engine: None, stream: bool) -> None:
    base, engine = server
    wait_idle(engine)
    aborted = engine.metrics.finished.get("abort", 0)
    body = {**HI, "max_tokens": 80, "ignore_eos": True, "stream": stream}
    if stream:  # leave after the first event
        with httpx.stream("POST", base + "/v1/completions", json=body, headers=AUTH,
                          timeout=30) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    else:  # give up waiting for the whole answer
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json=body, headers=AUTH,
                       timeout=httpx.Timeout(30, read=0.6))
    assert engine.llm.has_unfinished_requests()  # still running when the client left
    wait_idle(engine, timeout=5)  # far less than the 80 steps x 50 ms it would take
    assert engine.metrics.finished.get("abort", 0) == aborted + 1


async def _one(http: "httpx.AsyncClient", i: int, cancel: bool) -> str:
    body = {"model": NAME, "prompt": f"The hybrid model {i}", "max_tokens": 12, "stream": True,
            "temperature": 0.8, "seed": i, "ignore_eos": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return f"status:{r.status_code}"
        finish, text = None, ""
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return f"done:{finish}:{bool(text)}"
            payload = json.loads(line[6:])
            if "error" in payload:
                return f"error:{payload['error']['message']}"
            finish = payload["choices"][0]["finish_reason"] or finish
            text += payload["choices"][0]["text"]
            if cancel and text:
                return "cancelled"  # leaving the block closes the connection mid-stream
    return "truncated"


def test_load_100_concurrent_streams_with_cancellations(server, error_log: ErrorLog) -> None:
    base, engine = server
    wait_idle(engine)
    aborted = engine.metrics.finished.get("abort", 0)
    n, cancelled = 110, set(range(0, 110, 5))  # 22 of 110 (20%) leave mid-stream

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=base, headers=AUTH, limits=limits,
                                     timeout=60) as http:
            return await asyncio.gather(*(_one(http, i, i in cancelled) for i in range(n)))

    peak, done = [0], threading.Event()

    def watch() -> None:  # how many requests the engine holds at once
        while not done.wait(0.01):
            s = engine.metrics.stats
            peak[0] = max(peak[0], s.num_running + s.num_waiting)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - start
    done.set()
    watcher.join()
    assert elapsed < 60 and peak[0] >= 100, (elapsed, peak)
    assert [results[i] for i in sorted(cancelled)] == ["cancelled"] * len(cancelled)
    others = [r for i, r in enumerate(results) if i not in cancelled]
    assert others == ["done:length:True"] * (n - len(cancelled)), results
    wait_idle(engine)
    s = engine.llm.stats()
    assert s.num_free_blocks == s.num_blocks and s.num_free_slots == s.num_slots
    assert engine.metrics.finished.get("abort", 0) > aborted  # cancellations reached the engine
    assert not error_log.records, [r.getMessage() for r in error_log.records]
    assert httpx.get(base + "/health").json() == {"status": "ok"}

