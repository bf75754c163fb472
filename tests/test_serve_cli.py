"""``bamba serve`` as a user runs it: a subprocess on 127.0.0.1 with the API key from
$BAMBA_API_KEY, answering the openai client, and one-line errors for bad options."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from bamba.cli import main  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("bamba serve did not come up")


def test_bamba_serve_subprocess_with_env_api_key(make_hf_checkpoint: Callable[..., Path]) -> None:
    directory = make_hf_checkpoint("hybrid")
    port = _free_port()
    env = {**os.environ, "BAMBA_API_KEY": "k-123", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bamba.cli", "serve", str(directory), "--port", str(port),
         "--dtype", "float32", "--memory-gb", "0.01", "--threads", "1",
         "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/health")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-123",
                          max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == [directory.name]
        out = c.completions.create(model=directory.name, prompt="State space", max_tokens=4,
                                   extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong",
                          max_retries=0).models.list()
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "http://127.0.0.1:" in stderr and "API key required" in stderr
    # the C HTTP parser and event loop the serve extra installs are the ones running
    assert "HTTP httptools, uvloop loop" in stderr


def test_bamba_serve_bad_options_are_one_line_errors(make_hf_checkpoint: Callable[..., Path],
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "bamba serve: error:" in capsys.readouterr().err
    directory = make_hf_checkpoint("hybrid")
    assert main(["serve", str(directory), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", str(directory), "--dtype", "int3"]) == 2
    assert "dtype" in capsys.readouterr().err


def test_missing_http_parser_or_loop_is_a_one_line_error(
        make_hf_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    from bamba.serve import http

    directory = str(make_hf_checkpoint("hybrid"))
    monkeypatch.delitem(http.PROTOCOLS, "httptools", raising=False)
    assert http.http_protocol("auto") == "h11"
    assert main(["serve", directory, "--http", "httptools"]) == 2
    assert "'httptools' is not available" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvloop" else real(name, *a))
    assert main(["serve", directory, "--loop", "uvloop"]) == 2
    assert "uvloop is not installed" in capsys.readouterr().err


def test_busy_port_is_refused_before_the_model_loads(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the checkpoint does not exist: the port must be what is reported, before loading
        assert main(["serve", str(tmp_path / "missing"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bamba serve: error: cannot listen on 127.0.0.1:") and "\n" not in err
    assert main(["serve", str(tmp_path / "missing"), "--max-request-bytes", "0"]) == 2
    assert "--max-request-bytes" in capsys.readouterr().err


def test_the_model_loads_on_a_thread_that_ends_not_the_main_one(
        make_hf_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """The engine's thread must own the only OpenMP pool: a model loaded on the main thread
    left one there and the engine decoded ~1.5x slower (bamba.cores.in_passing_thread)."""
    import threading

    import bamba.engine

    seen: list[threading.Thread] = []

    def record(*args: object, **kwargs: object) -> None:
        seen.append(threading.current_thread())
        raise ValueError("stop after the load")

    monkeypatch.setattr(bamba.engine, "LLM", record)
    assert main(["serve", str(make_hf_checkpoint("hybrid")), "--port", str(_free_port())]) == 2
    assert "stop after the load" in capsys.readouterr().err
    assert seen and seen[0] is not threading.main_thread() and not seen[0].is_alive()
