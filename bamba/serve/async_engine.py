"""The engine on its own thread, driven from asyncio.

One thread owns the ``LLM`` and is the only one to call it: it takes commands (add, abort) from
a queue, runs steps while there is work, and hands each request's outputs to the mailbox of the
coroutine that waits for them. Outputs are deltas (only what is new), and a mailbox holds at
most one: while its coroutine has not taken it, newer deltas are folded into it. A coroutine
that falls more than ``max_pending_outputs`` steps behind (its client does not read) has its
request aborted, which frees its KV blocks and state slot. Counters for /metrics are updated on
the engine thread, once a step.

Hand-offs to the event loop are the server's cost over the offline engine: each wakes a third
thread on cores that the engine's OpenMP team keeps busy. So the engine thread wakes a coroutine
only when it waits for something new (never twice for one wait), and a ``final_only`` request
(a non-streaming response) only when it ends: one hand-off for a whole request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from bamba.engine import LLM, RequestOutput, SamplingParams
from bamba.engine.params import merge_delta
from bamba.native import steady_weights
from bamba.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)
MAX_PENDING_OUTPUTS = 256  # engine steps a request's reader may fall behind before its abort
T = TypeVar("T")


class FellBehind(RuntimeError):
    """The request's reader took its outputs too slowly; the request was aborted."""


class _Mailbox:
    """One request's outputs on their way from the engine thread to its coroutine: whether the
    engine accepted it, at most one pending (coalesced) delta output, then maybe an error."""

    def __init__(self, loop: asyncio.AbstractEventLoop, final_only: bool = False):
        self.loop, self.arrival, self.final_only = loop, time.monotonic(), final_only
        self.seen_tokens = 0  # engine thread only (metrics)
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._waiting = False  # the coroutine waits for a notification that is not yet sent
        self._accepted = False
        self._pending: RequestOutput | None = None
        self._pending_steps = 0
        self._error: Exception | None = None

    # ---- engine thread ----------------------------------------------------------------------
    def accept(self) -> None:
        with self._lock:
            self._accepted = True
            wake = self._claim_wake()
        self._notify(wake)

    def put(self, out: RequestOutput) -> int:
        """Hand over a delta output; returns how many steps' outputs wait untaken (0 for a
        ``final_only`` mailbox, whose coroutine takes only the last one)."""
        with self._lock:
            if self._pending is None:
                self._pending = out
            else:
                merge_delta(self._pending, out)
            if self.final_only:
                waiting = 0
                wake = out.finished and self._claim_wake()
            else:
                self._pending_steps += 1
                waiting = self._pending_steps
                wake = self._claim_wake()
        self._notify(wake)
        return waiting

    def fail(self, exc: Exception) -> None:
        """End the request with ``exc`` (after whatever output is still pending)."""
        with self._lock:
            self._error = exc
            wake = self._claim_wake()
        self._notify(wake)

    def _claim_wake(self) -> bool:
        """Whether to wake the coroutine (it waits, and nobody woke it yet); holds the lock."""
        wake, self._waiting = self._waiting, False
        return wake

    def _notify(self, wake: bool) -> None:
        if not wake:
            return
        try:
            self.loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the request's event loop is closed: nobody is listening
            log.debug("dropped a notification for a closed event loop")

    # ---- the request's coroutine --------------------------------------------------------------
    async def accepted(self) -> None:
        """Return once the engine took the request; raise what it refused it with."""
        await self._until(lambda: True if self._accepted else self._raise_error())

    async def take(self) -> RequestOutput:
        """The next output (all deltas since the last take, folded; for a ``final_only``
        mailbox, the whole finished output); raises the error that ended the request once
        nothing is pending."""
        return await self._until(self._take_pending)

    def _take_pending(self) -> RequestOutput | None:
        out = self._pending
        if out is not None and self.final_only and not out.finished and self._error is None:
            return None
        self._pending, self._pending_steps = None, 0
        return out if out is not None else self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    async def _until(self, check: Callable[[], T | None]) -> T:
        while True:
            with self._lock:
                result = check()
                if result is None:
                    self._ready.clear()
                    self._waiting = True
            if result is not None:
                return result
            await self._ready.wait()


class AsyncEngine:
    def __init__(self, llm: LLM, max_pending_outputs: int = MAX_PENDING_OUTPUTS):
        if max_pending_outputs < 1:
            raise ValueError(f"max_pending_outputs must be >= 1, got {max_pending_outputs}")
        self.llm, self.max_pending_outputs = llm, max_pending_outputs
        self.metrics = ServerMetrics(stats=llm.stats())
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, _Mailbox] = {}
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
                       request_id: str, final_only: bool = False
                       ) -> AsyncIterator[RequestOutput]:
        """Submit a request; raises ValueError at once if the engine refuses it (RuntimeError
        if the engine is not running), then yields delta outputs (``merge_delta`` folds them)
        until it finishes; with ``final_only``, one output holding everything (or what there
        was before an error). Leaving early (client gone) aborts it."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        if params.output_kind != "delta":
            params = dataclasses.replace(params, output_kind="delta")
        sink = _Mailbox(asyncio.get_running_loop(), final_only)
        self._send(("add", request_id, prompt, params, sink))
        try:
            await sink.accepted()
        except asyncio.CancelledError:  # the caller gave up before the engine answered
            self.abort(request_id)
            raise
        return self._stream(request_id, sink)

    async def _stream(self, request_id: str, sink: _Mailbox) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                try:
                    output = await sink.take()
                except Exception:
                    finished = True
                    raise
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
            with steady_weights():  # weights are checked again after each idle spell
                self._run_while_busy()
        stopped = RuntimeError("the server is shutting down")
        self._fail_all(stopped)
        while True:  # answer requests that arrived too late to be added
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                command[4].fail(stopped)

    def _drain(self) -> None:
        if self._commands.empty():
            return
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
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
             sink: _Mailbox) -> None:
        try:
            self.llm.add_request(prompt, params, request_id)
        except ValueError as exc:
            sink.fail(exc)
            return
        except Exception as exc:  # never let one request's bad luck end the engine thread
            log.exception("adding request %s failed", request_id)
            self.llm.abort(request_id)
            sink.fail(RuntimeError(f"the engine could not take the request: {exc}"))
            return
        self._sinks[request_id] = sink
        sink.accept()

    def _run_while_busy(self) -> None:
        """Steps until no request is left (or the server stops), taking new commands between
        steps."""
        last_end = None  # when the previous step ended
        while not self._stopping and self.llm.has_unfinished_requests():
            start = time.perf_counter()
            try:
                outputs = self.llm.step()
            except Exception as exc:  # a bug in a step must not kill the server's engine
                log.exception("engine step failed")
                self._fail_all(RuntimeError(f"the engine failed: {exc}"))
                return
            end = time.perf_counter()
            self.metrics.record_engine_time(end - start, 0.0 if last_end is None
                                            else start - last_end)
            last_end = end
            self._deliver(outputs)
            self._wake.clear()
            self._drain()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        new_tokens = 0
        now = time.monotonic()
        for out in outputs:
            tokens = sum(len(o.token_ids) for o in out.outputs)
            new_tokens += tokens
            sink = self._sinks.get(out.request_id)
            if sink is not None:
                if sink.seen_tokens == 0 and tokens:
                    self.metrics.record_first_token(now - sink.arrival,
                                                    len(out.prompt_token_ids))
                sink.seen_tokens += tokens
                waiting = sink.put(out)
                if not out.finished and waiting > self.max_pending_outputs:
                    self._drop_slow_reader(out.request_id, sink)
            if out.finished:
                self._sinks.pop(out.request_id, None)
                for o in out.outputs:
                    self.metrics.record_finish(o.finish_reason or "unknown")
        self.metrics.record_step(new_tokens, self.llm.stats())

    def _drop_slow_reader(self, request_id: str, sink: _Mailbox) -> None:
        log.warning("request %s: its reader fell %d outputs behind; aborting it", request_id,
                    self.max_pending_outputs)
        if self.llm.abort(request_id):
            self.metrics.record_finish("abort")
        self._sinks.pop(request_id, None)
        sink.fail(FellBehind(f"the client read its stream too slowly (more than "
                             f"{self.max_pending_outputs} outputs behind); request aborted"))

    def _fail_all(self, exc: Exception) -> None:
        for request_id, sink in list(self._sinks.items()):
            self.llm.abort(request_id)
            sink.fail(exc)
        self._sinks.clear()
