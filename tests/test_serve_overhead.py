"""What one request costs the server beyond the offline engine, in counts rather than seconds:
engine steps, detokenizer calls, ``stats()`` calls and hand-offs from the engine thread to the
event loop (each wakes a thread that competes with the engine's OpenMP team for the cores)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from bamba.engine import LLM, SamplingParams  # noqa: E402
from bamba.engine.detok import IncrementalDetokenizer  # noqa: E402
from bamba.serve.app import build_app  # noqa: E402
from bamba.serve.async_engine import AsyncEngine  # noqa: E402
from serve_helpers import running, save_tiny_checkpoint  # noqa: E402

NAME = "tiny-bamba"
TOKENS = 24
LLM_OPTIONS: dict[str, Any] = {"memory_gb": 0.002, "block_size": 4, "max_num_seqs": 8,
                               "max_num_batched_tokens": 256, "max_model_len": 96}


class Counts:
    """Calls counted while a request runs: forward steps and ``stats()`` of one ``LLM``,
    detokenizer additions, and ``call_soon_threadsafe`` made on the engine thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, llm: LLM):
        self.calls: Counter[str] = Counter()
        self._count(monkeypatch, llm.runner, "execute", "steps")
        self._count(monkeypatch, llm, "stats", "stats")
        self._count(monkeypatch, IncrementalDetokenizer, "add", "detok")
        real = asyncio.BaseEventLoop.call_soon_threadsafe

        def call_soon_threadsafe(loop: asyncio.BaseEventLoop, *args: Any, **kw: Any) -> Any:
            if threading.current_thread().name == "bamba-engine":
                self.calls["handoffs"] += 1
            return real(loop, *args, **kw)

        monkeypatch.setattr(asyncio.BaseEventLoop, "call_soon_threadsafe", call_soon_threadsafe)

    def _count(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, key: str) -> None:
        real = getattr(owner, name)

        def counted(*args: Any, **kw: Any) -> Any:
            self.calls[key] += 1
            return real(*args, **kw)

        monkeypatch.setattr(owner, name, counted)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("overhead") / "ckpt"))


@pytest.fixture(scope="module")
def server(checkpoint: str) -> Iterator[tuple[str, AsyncEngine]]:
    engine = AsyncEngine(LLM(checkpoint, **LLM_OPTIONS)).start()
    # asyncio's loop, whose call_soon_threadsafe ``Counts`` can wrap (uvloop's is C); which
    # loop runs does not change when the engine thread hands off
    with running(build_app(engine, NAME), loop="asyncio") as base:
        yield base, engine
    engine.shutdown()


def offline_counts(checkpoint: str, monkeypatch: pytest.MonkeyPatch, prompt: str
                   ) -> Counter[str]:
    llm = LLM(checkpoint, **LLM_OPTIONS)
    with monkeypatch.context() as patch:
        counts = Counts(patch, llm)
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=TOKENS,
                                                  ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == TOKENS
    return counts.calls


def served_counts(server: tuple[str, AsyncEngine], monkeypatch: pytest.MonkeyPatch,
                  stream: bool, prompt: str) -> Counter[str]:
    """Counts of one request; ``prompt`` must be new to the server (a prefix-cache hit would
    save a prefill step)."""
    base, engine = server
    body = {"model": NAME, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    with monkeypatch.context() as patch:
        counts = Counts(patch, engine.llm)
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
    if stream:
        usage = [line for line in r.text.splitlines() if '"usage"' in line and '"prompt_tokens"'
                 in line]
        assert usage and f'"completion_tokens": {TOKENS}' in usage[-1]
    else:
        assert r.json()["usage"]["completion_tokens"] == TOKENS
    return counts.calls


@pytest.mark.parametrize("stream", [False, True])
def test_server_steps_and_detokenizes_as_often_as_the_offline_engine(
        checkpoint: str, server: tuple[str, AsyncEngine], monkeypatch: pytest.MonkeyPatch,
        stream: bool) -> None:
    prompt = f"The hybrid model, streaming {stream}"
    offline = offline_counts(checkpoint, monkeypatch, prompt)
    served = served_counts(server, monkeypatch, stream, prompt)
    assert offline["steps"] >= TOKENS and offline["detok"] == TOKENS
    assert served["steps"] == offline["steps"]
    assert served["detok"] == offline["detok"]
    # /metrics is refreshed once a step, plus once for the command that added the request.
    assert served["stats"] <= served["steps"] + 1


def test_non_streaming_request_wakes_the_event_loop_twice(
        server: tuple[str, AsyncEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepted, then finished: not once a token."""
    served = served_counts(server, monkeypatch, stream=False, prompt="State space models")
    assert served["handoffs"] == 2


def test_streaming_request_wakes_the_event_loop_at_most_once_a_step(
        server: tuple[str, AsyncEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    served = served_counts(server, monkeypatch, stream=True, prompt="Attention layers")
    assert 2 <= served["handoffs"] <= served["steps"] + 1
