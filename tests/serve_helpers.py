"""What the server tests share: a tiny checkpoint on disk and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from bamba.serve.http import uvicorn_config
from conftest import build_tokenizer, hf_model


def save_tiny_checkpoint(directory: Path) -> Path:
    """A random tiny hybrid with the test tokenizer, saved by transformers into ``directory``."""
    hf_model("hybrid").save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


@contextlib.contextmanager
def running(app: Any, send_buffer: int | None = None, **options: Any) -> Iterator[str]:
    """Serve ``app`` with ``uvicorn_config(app, **options)`` on a free 127.0.0.1 port; yields
    its base URL. ``send_buffer``: the kernel's send buffer (bytes) of every connection."""
    sock = socket.socket()
    if send_buffer is not None:  # accepted sockets inherit it from the listening one
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn_config(app, log_level="warning", **options))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()
