"""The engine on its own thread, driven from asyncio.

One thread owns the ``LLM`` and is the only one to call it: it takes commands (add, abort) from
a queue, runs steps while there is work, and hands each request's outputs to the asyncio queue
of the coroutine that waits for them. Counters for /metrics are updated on the same thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from bamba.engine import LLM, EngineStats, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

ACCEPTED = "accepted"  # first item on a request's queue once the engine took it


@dataclass
class ServerMetrics:
    """Counters kept by the engine thread (read, never written, by request handlers)."""

    stats: EngineStats | None = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    ttft_sum: float = 0.0
    ttft_count: int = 0
    recent: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens) per step

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        points = [(t, n) for t, n in self.recent if now - t <= window]
        return sum(n for _, n in points) / window if points else 0.0


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    seen_tokens: int = 0


class AsyncEngine:
    def __init__(self, llm: LLM):
        self.llm = llm
        self.metrics = ServerMetrics(stats=llm.stats())
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, _Sink] = {}
        self._stopping = False
        self._ids = 0
        self._thread = threading.Thread(target=self._loop, name="bamba-engine", daemon=True)

    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids}-{time.time_ns() % 10**9}"

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Submit a request; raises ValueError at once if the engine refuses it, then yields
        outputs until it finishes. Leaving early (client gone) aborts it."""
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic())
        self._send(("add", request_id, prompt, params, sink))
        first = await sink.queue.get()
        if isinstance(first, Exception):
            raise first
        return self._stream(request_id, sink)

    async def _stream(self, request_id: str, sink: _Sink) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                output = await sink.queue.get()
                if isinstance(output, Exception):
                    finished = True
                    raise output
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- the engine thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._drain()
            if not self.llm.has_unfinished_requests():
                self._wake.wait(0.5)
                continue
            try:
                outputs = self.llm.step()
            except Exception as exc:  # a bug in a step must not kill the server's engine
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            self._deliver(outputs)
            self.metrics.stats = self.llm.stats()
        self._fail_all(RuntimeError("server is shutting down"))

    def _drain(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._add(*command[1:])
            elif command[0] == "abort":
                if self.llm.abort(command[1]):
                    self._count_finish("abort")
                self._sinks.pop(command[1], None)
            else:
                raise AssertionError(f"unknown engine command {command[0]!r}")
        self.metrics.stats = self.llm.stats()

    def _add(self, request_id: str, prompt: str | list[int], params: SamplingParams,
             sink: _Sink) -> None:
        try:
            self.llm.add_request(prompt, params, request_id)
        except ValueError as exc:
            _post(sink, exc)
            return
        self._sinks[request_id] = sink
        _post(sink, ACCEPTED)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        new_tokens = 0
        now = time.monotonic()
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            tokens = sum(len(o.token_ids) for o in out.outputs)
            new_tokens += tokens - (sink.seen_tokens if sink else 0)
            if sink is not None:
                if sink.seen_tokens == 0 and tokens:
                    self.metrics.ttft_sum += now - sink.arrival
                    self.metrics.ttft_count += 1
                    self.metrics.prompt_tokens += len(out.prompt_token_ids)
                sink.seen_tokens = tokens
                _post(sink, out)
            if out.finished:
                self._sinks.pop(out.request_id, None)
                for o in out.outputs:
                    self._count_finish(o.finish_reason or "unknown")
        self.metrics.generation_tokens += new_tokens
        self.metrics.recent = [(t, n) for t, n in self.metrics.recent if now - t <= 60]
        self.metrics.recent.append((now, new_tokens))

    def _count_finish(self, reason: str) -> None:
        self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1

    def _fail_all(self, exc: Exception) -> None:
        for request_id, sink in list(self._sinks.items()):
            self.llm.abort(request_id)
            _post(sink, exc)
        self._sinks.clear()


def _post(sink: _Sink, item: object) -> None:
    """Put an item on a request's asyncio queue from the engine thread."""
    try:
        sink.loop.call_soon_threadsafe(sink.queue.put_nowait, item)
    except RuntimeError:  # the request's event loop is closed: nobody is listening
        log.debug("dropped an output for a closed event loop")
