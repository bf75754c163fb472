"""vLLM's /tokenize and /detokenize: a prompt's ids as the engine encodes it, chat messages
(and tools) as /v1/chat/completions renders them, ids back to text; bad bodies are 400s."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from bamba.engine import LLM  # noqa: E402
from bamba.serve.app import build_app  # noqa: E402
from bamba.serve.async_engine import AsyncEngine  # noqa: E402
from bamba.serve.chat import render_chat  # noqa: E402
from serve_helpers import running  # noqa: E402

TEXT = "The hybrid model mixes Mamba2 layers with attention."
CHAT = [{"role": "user", "content": "Hello there"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[tuple[str, LLM]]:
    llm = LLM(str(tiny_checkpoint), memory_gb=0.02, max_model_len=256)
    engine = AsyncEngine(llm).start()
    try:
        with running(build_app(engine, "tiny")) as base:
            yield base, llm
    finally:
        engine.shutdown()


def _post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}{path}", json={"model": "tiny", **body}, timeout=60)


def test_tokenize_and_detokenize_round_trip(server):
    base, llm = server
    r = _post(base, "/tokenize", {"prompt": TEXT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == llm.encode_prompt(TEXT)[1]
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    back = _post(base, "/detokenize", {"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": TEXT}
    assert _post(base, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


def test_chat_messages_count_as_the_chat_endpoint_renders_them(server):
    base, llm = server
    r = _post(base, "/tokenize", {"messages": CHAT, "tools": [TOOL]})
    assert r.status_code == 200, r.text
    rendered = render_chat(llm.tokenizer, CHAT, [TOOL])
    assert r.json()["tokens"] == llm.tokenizer.encode(rendered, add_special_tokens=False)
    chat = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": CHAT, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == r.json()["count"]


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {}), ("/tokenize", {"prompt": "a", "messages": CHAT}),
    ("/tokenize", {"prompt": 5}), ("/detokenize", {"tokens": [1, 99999]}),
    ("/detokenize", {"tokens": [1, -1]}), ("/detokenize", {"tokens": "1 2"}),
    ("/tokenize", {"prompt": "a", "model": "other"}),
])
def test_bad_bodies_are_4xx(server, path, body):
    r = httpx.post(f"{server[0]}{path}", json={"model": "tiny", **body}, timeout=60)
    assert r.status_code == (404 if body.get("model") == "other" else 400), r.text
    assert "error" in r.json()
