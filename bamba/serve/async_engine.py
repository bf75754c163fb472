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
from dataclasses import dataclass

from bamba.engine import LLM, RequestOutput, SamplingParams
from bamba.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)

ACCEPTED = "accepted"  # first item on a request's queue once the engine took it


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

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

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
        """Submit a request; raises ValueError at once if the engine refuses it (RuntimeError
        if the engine is not running), then yields outputs until it finishes. Leaving early
        (client gone) aborts it."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        sink = _Sink(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic())
        self._send(("add", request_id, prompt, params, sink))
        try:
            first = await sink.queue.get()
        except asyncio.CancelledError:  # the caller gave up before the engine answered
            self.abort(request_id)
            raise
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
                self._fail_all(RuntimeError(f"the engine failed: {exc}"))
                continue
            self._deliver(outputs)
        stopped = RuntimeError("the server is shutting down")
        self._fail_all(stopped)
        while True:  # answer requests that arrived too late to be added
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _post(command[4], stopped)

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
                    self.metrics.record_finish("abort")
                self._sinks.pop(command[1], None)
            else:
                raise AssertionError(f"unknown engine command {command[0]!r}")
        self.metrics.set_stats(self.llm.stats())

    def _add(self, request_id: str, prompt: str | list[int], params: SamplingParams,
             sink: _Sink) -> None:
        try:
            self.llm.add_request(prompt, params, request_id)
        except ValueError as exc:
            _post(sink, exc)
            return
        except Exception as exc:  # never let one request's bad luck end the engine thread
            log.exception("adding request %s failed", request_id)
            self.llm.abort(request_id)
            _post(sink, RuntimeError(f"the engine could not take the request: {exc}"))
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
                    self.metrics.record_first_token(now - sink.arrival,
                                                    len(out.prompt_token_ids))
                sink.seen_tokens = tokens
                _post(sink, out)
            if out.finished:
                self._sinks.pop(out.request_id, None)
                for o in out.outputs:
                    self.metrics.record_finish(o.finish_reason or "unknown")
        self.metrics.record_step(new_tokens, self.llm.stats())

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
