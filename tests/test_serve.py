"""The OpenAI-compatible server, end to end over HTTP: the official client (streaming too),
malformed requests answered with 4xx, and a concurrent load with cancellations that must leave
no request, KV block or state slot behind."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
import uvicorn  # noqa: E402

from bamba.engine import LLM  # noqa: E402
from bamba.serve.app import build_app  # noqa: E402
from bamba.serve.async_engine import AsyncEngine  # noqa: E402
from conftest import build_tokenizer, hf_model  # noqa: E402

NAME = "tiny-bamba"
KEY = "secret"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, AsyncEngine]]:
    directory: Path = tmp_path_factory.mktemp("serve") / "ckpt"
    hf_model("hybrid").save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    llm = LLM(str(directory), memory_gb=0.002, block_size=4, max_num_seqs=128,
              max_num_batched_tokens=256, max_model_len=96)
    engine = AsyncEngine(llm).start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(engine, NAME, KEY), log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()
    sock.close()


def client(base: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)


def wait_idle(engine: AsyncEngine, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.metrics.stats
        if (s.num_running == s.num_waiting == 0 and s.num_free_blocks == s.num_blocks
                and s.num_free_slots == s.num_slots and not engine.llm.has_unfinished_requests()):
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
    assert len(choice.logprobs.token_logprobs) == 8 and len(choice.logprobs.top_logprobs[0]) == 2
    pieces = c.completions.create(model=NAME, prompt="State space models", max_tokens=8,
                                  temperature=0, extra_body={"ignore_eos": True}, stream=True)
    chunks = list(pieces)
    assert "".join(ch.choices[0].text for ch in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"
    wait_idle(engine)


def test_openai_client_chat_stream_and_not(server) -> None:
    base, engine = server
    c = client(base)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Attention layers keep keys"}]
    whole = c.chat.completions.create(model=NAME, messages=messages, max_tokens=6,
                                      temperature=0, seed=3)
    assert whole.choices[0].message.role == "assistant"
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
    assert [m.id for m in c.models.list().data] == [NAME]
    wait_idle(engine)


BAD = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", {"model": "other", "prompt": "hi"}, 404),
    ("/v1/completions", {"model": NAME, "prompt": "word " * 200}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": -3}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": -1}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 2}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "n": "two"}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2.5}, 400),
    ("/v1/completions", {"model": NAME, "prompt": [1, 99999]}, 400),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400),
    ("/v1/completions", {"model": NAME}, 400),
    ("/v1/completions", [1, 2, 3], 400),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "x", "content": "a"}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": "hello"}, 400),
]


@pytest.mark.parametrize("path, body, status", BAD)
def test_bad_requests_get_openai_style_4xx(server, path: str, body: object, status: int) -> None:
    base, engine = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(base + path, content=content, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    wait_idle(engine)


def test_api_key_required(server) -> None:
    base, _ = server
    r = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_metrics_expose_pools_and_rates(server) -> None:
    base, _ = server
    client(base).completions.create(model=NAME, prompt="Numbers 0123", max_tokens=3)
    text = httpx.get(base + "/metrics").text
    for name in ("bamba_requests_running", "bamba_requests_waiting", "bamba_kv_blocks_in_use",
                 "bamba_state_slots_in_use", "bamba_prefix_cache_hit_rate",
                 "bamba_generation_tokens_per_second", "bamba_time_to_first_token_seconds_count"):
        assert f"\n{name} " in "\n" + text, name
    count = [line for line in text.splitlines()
             if line.startswith("bamba_time_to_first_token_seconds_count")][0]
    assert float(count.split()[-1]) >= 1


async def _one(http: "httpx.AsyncClient", i: int, cancel: bool) -> str:
    body = {"model": NAME, "prompt": f"The hybrid model {i}", "max_tokens": 12, "stream": True,
            "temperature": 0.8, "seed": i, "ignore_eos": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        finish = None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return f"done:{finish}"
            payload = json.loads(line[6:])
            assert "error" not in payload, payload
            finish = payload["choices"][0]["finish_reason"] or finish
            if cancel:
                return "cancelled"  # leaving the block closes the connection mid-stream
    return "truncated"


def test_load_100_concurrent_streams_with_cancellations(server) -> None:
    base, engine = server

    async def main() -> list[str]:
        headers = {"Authorization": f"Bearer {KEY}"}
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits,
                                     timeout=120) as http:
            return await asyncio.gather(*(_one(http, i, cancel=i % 4 == 0) for i in range(104)))

    results = asyncio.run(main())
    assert results.count("cancelled") == 26
    assert results.count("done:length") == 78, results
    wait_idle(engine)
    aborted = engine.metrics.finished.get("abort", 0)
    assert aborted >= 1  # at least some cancellations reached the engine before finishing
