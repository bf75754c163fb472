"""Serving the app with uvicorn, with limits for idle and abusive connections.

HTTP is parsed and written by httptools (C) when it is installed, else by h11 (pure Python),
and the event loop is uvloop's when that is installed (uvicorn's ``auto``): with the engine's
threads on every core, the event loop's work on each streamed token competes with the engine
(bench model: ~0.3 ms of loop CPU a token against ~0.4 with asyncio and h11, and the engine's
wait for the GIL between steps ~0.1 ms against ~0.45).

uvicorn closes a keep-alive connection that stays idle for ``timeout_keep_alive`` seconds, but
not one that never completes a request head (it connects and sends nothing, or a few bytes):
the protocols of ``PROTOCOLS`` close those after ``head_timeout`` seconds. ``limit_concurrency``
answers 503 beyond that many connections and tasks, and ``limit_log_rate`` keeps a flood of
accept errors (e.g. out of file descriptors) from filling the log.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import socket
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed
    HttpToolsProtocol = None

HEAD_TIMEOUT = 10.0  # seconds a connection has to send a complete request head
MAX_CONNECTIONS = 512
KEEP_ALIVE_TIMEOUT = 5.0
LOG_INTERVAL = 10.0  # seconds between two records with the same message


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening); ValueError in one line if it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class _HeadTimeout:
    """Mixed into a uvicorn HTTP protocol: closes a connection that has not sent a complete
    request head within ``head_timeout`` seconds of connecting or of its previous response.
    The protocol calls ``_disarm`` when a head arrives."""

    head_timeout = HEAD_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def on_response_complete(self) -> None:
        self._arm()  # before: a pipelined request handled now disarms it again
        super().on_response_complete()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiting = self.cycle is None or self.cycle.response_complete  # type: ignore[attr-defined]
        if waiting and not self.transport.is_closing():  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]


class H11HeadTimeout(_HeadTimeout, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request head arrived


PROTOCOLS: dict[str, type] = {"h11": H11HeadTimeout}
if HttpToolsProtocol is not None:
    class HttpToolsHeadTimeout(_HeadTimeout, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._disarm()  # a request head arrived (a pipelined one: the timer checks)

    PROTOCOLS["httptools"] = HttpToolsHeadTimeout


class RateLimit(logging.Filter):
    """Passes at most one record per message per ``interval`` seconds; the next one passed says
    how many were held back."""

    MAX_MESSAGES = 1000  # distinct messages remembered (forgotten all at once beyond)

    def __init__(self, interval: float = LOG_INTERVAL):
        super().__init__()
        self.interval = interval
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = str(record.msg).split("\n", 1)[0], time.monotonic()  # asyncio adds details
        last, held = self._seen.get(key, (-float("inf"), 0))
        if now - last < self.interval:
            self._seen[key] = (last, held + 1)
            return False
        if len(self._seen) >= self.MAX_MESSAGES:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like it held back)"
        return True


def limit_log_rate(names: tuple[str, ...] = ("asyncio", "uvicorn.error"),
                   interval: float = LOG_INTERVAL) -> None:
    """Rate-limit the loggers that report accept errors and malformed requests."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimit) for f in logger.filters):
            logger.addFilter(RateLimit(interval))


def http_protocol(name: str) -> str:
    """``name`` (a key of ``PROTOCOLS``) or, for ``auto``, httptools when installed, else h11;
    ValueError in one line when it is not available."""
    if name == "auto":
        return "httptools" if "httptools" in PROTOCOLS else "h11"
    if name not in PROTOCOLS:
        raise ValueError(f"HTTP implementation {name!r} is not available (installed: "
                         f"{', '.join(PROTOCOLS)}; httptools: pip install httptools)")
    return name


def event_loop(name: str) -> str:
    """``name`` (uvloop or asyncio) or, for ``auto``, uvloop when installed, else asyncio;
    ValueError in one line when uvloop is asked for and missing."""
    installed = importlib.util.find_spec("uvloop") is not None
    if name == "auto":
        return "uvloop" if installed else "asyncio"
    if name == "uvloop" and not installed:
        raise ValueError("--loop uvloop: uvloop is not installed (pip install uvloop)")
    return name


def uvicorn_config(app: Any, *, head_timeout: float = HEAD_TIMEOUT,
                   keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
                   max_connections: int = MAX_CONNECTIONS, http: str = "auto",
                   **options: Any) -> uvicorn.Config:
    """A uvicorn config for ``app`` with these connection limits and ``http`` (a key of
    ``PROTOCOLS``, or ``auto``: httptools when installed); ``options``: more of uvicorn's, e.g.
    log_level or loop."""
    http = http_protocol(http)
    if not head_timeout > 0 or not keep_alive_timeout > 0:
        raise ValueError(f"timeouts must be positive, got head {head_timeout}, keep-alive "
                         f"{keep_alive_timeout}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    protocol = type("HeadTimeout", (PROTOCOLS[http],), {"head_timeout": head_timeout})
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=keep_alive_timeout,
                          limit_concurrency=max_connections, **options)
