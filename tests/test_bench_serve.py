"""The server benchmark end to end at its smallest (tiny model, bamba's side, a few requests),
and how it records a llama.cpp peer it cannot find. Nothing here is timed."""

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_serve  # noqa: E402
import llama_cpp  # noqa: E402


def test_quick_run_reports_every_level_of_both_bamba_sides(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # the server subprocess too
    monkeypatch.setattr(llama_cpp, "CACHE", tmp_path / "no-llama-cpp")
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    out = tmp_path / "serve.json"
    assert bench_serve.main(["--quick", "--llama-cpp", "cached", "--requests", "3",
                             "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    levels = {(lv["concurrency"], lv["stream"]): lv for lv in report["bamba"]["levels"]}
    assert set(levels) == {(1, True), (1, False), (4, True)}
    for (_, stream), lv in levels.items():
        assert lv["requests"] == 3 and lv["output_tok_per_s"] > 0
        assert ("itl_p99_ms" in lv and "ttft_p50_s" in lv) == stream
        assert lv["server_cpu_ms_per_token"] > 0 and lv["client_cpu_ms_per_token"] > 0
        assert lv["engine_step_ms_per_token"] > lv["engine_between_steps_ms_per_token"] > 0
    assert [(lv["concurrency"], lv["stream"]) for lv in report["offline"]["levels"]] == \
        [(1, True), (1, False), (4, True)]
    assert report["bamba"]["server_metrics_after"]["bamba_kv_blocks_in_use"] == 0
    assert "no llama-server" in report["llama_cpp"]["missing"]
    assert report["host"]["threads"] == 2
    assert [(r["concurrency"], r["stream"], len(r["vs_offline"]["rounds"]))
            for r in report["ratios"]] == [(1, True, 1), (1, False, 1), (4, True, 1)]


def test_peer_missing_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    with pytest.raises(llama_cpp.PeerMissing, match="building is off"):
        llama_cpp.find_or_build(tmp_path, build=False)
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "absent"))
    with pytest.raises(llama_cpp.PeerMissing, match="not an executable"):
        llama_cpp.find_or_build(tmp_path)


def test_output_lengths_spread_around_max_tokens_alike_for_every_side() -> None:
    args = bench_serve.parse_args(["--max-tokens", "64", "--output-spread", "0.5"])
    args.vocab = 1000
    batch = bench_serve.requests(200, args, seed=3)
    lengths = [n for _, n in batch]
    assert min(lengths) >= 32 and max(lengths) <= 96 and len(set(lengths)) > 20
    assert batch == bench_serve.requests(200, args, seed=3)  # every side gets the same
    args.output_spread = 0.0
    assert {n for _, n in bench_serve.requests(20, args, seed=3)} == {64}


def test_each_level_keeps_its_best_round() -> None:
    def level(c: int, stream: bool, tok_s: float) -> dict:
        return {"concurrency": c, "stream": stream, "output_tok_per_s": tok_s, "itl_p50_ms": tok_s}

    levels = [level(1, True, 60.0), level(1, True, 65.0), level(1, False, 70.0),
              level(1, False, 66.0), level(8, True, 200.0)]
    best = {(lv["concurrency"], lv["stream"]): lv for lv in bench_serve.best_levels(levels)}
    assert best[1, True]["itl_p50_ms"] == 65.0 and best[1, True]["rounds_tok_per_s"] == [60, 65]
    assert best[1, True]["rounds_itl_p50_ms"] == [60, 65]  # every round's latency too
    assert "rounds_itl_p99_ms" not in best[1, True]  # not measured: not invented
    assert best[1, False]["output_tok_per_s"] == 70.0 and best[8, True]["rounds_tok_per_s"] == [200]


def test_ratios_pair_the_rounds_of_each_level() -> None:
    """bamba over each side round by round (not best over best), and their median."""
    def level(c: int, stream: bool, tok_s: float) -> dict:
        return {"concurrency": c, "stream": stream, "output_tok_per_s": tok_s}

    measured = {"bamba": [level(1, True, 60.0), level(1, True, 90.0), level(1, True, 66.0),
                          level(8, True, 200.0)],
                "offline": [level(1, True, 50.0), level(1, True, 100.0), level(1, True, 60.0),
                            level(8, True, 100.0)],
                "llama_cpp": []}
    ratios = {(r["concurrency"], r["stream"]): r for r in bench_serve.round_ratios(measured)}
    assert ratios[1, True]["vs_offline"] == {"rounds": [1.2, 0.9, 1.1], "median": 1.1}
    assert ratios[8, True]["vs_offline"]["median"] == 2.0
    assert "vs_llama_cpp" not in ratios[1, True]


class _Recorder:
    """A side that answers every request with ``tok_s`` tokens a second, noting its turns."""

    def __init__(self, name: str, turns: list, tok_s: float):
        self.name, self.turns, self.tok_s = name, turns, tok_s

    def measure(self, c: int, batch: list, stream: bool) -> dict:
        self.turns.append((self.name, c, len(batch)))
        results = [{"ttft": None, "gaps": [], "latency": n / self.tok_s, "tokens": n}
                   for _, n in batch]
        return {"results": results, "wall": sum(r["latency"] for r in results)}


def test_concurrency_one_takes_turns_request_by_request() -> None:
    """At concurrency 1 every request runs on each side in turn (the first side rotating);
    a level is then the sum of a side's requests. Higher levels go side after side."""
    args = bench_serve.parse_args(["--max-tokens", "8", "--rounds", "2"])
    args.vocab = 100
    turns: list = []
    sides = {"bamba": _Recorder("bamba", turns, 40.0), "offline": _Recorder("offline", turns, 50.0)}
    measured = bench_serve.run_rotation(sides, {1: 3, 4: 5}, args, {})
    first = [t for t in turns if t[1] == 1][:6]
    assert first == [("bamba", 1, 1), ("offline", 1, 1), ("offline", 1, 1), ("bamba", 1, 1),
                     ("bamba", 1, 1), ("offline", 1, 1)]
    assert [t for t in turns if t[1] == 4] == [("bamba", 4, 5), ("offline", 4, 5),
                                                ("offline", 4, 5), ("bamba", 4, 5)]
    levels = measured["bamba"]
    assert [(lv["concurrency"], lv["stream"], lv["requests"]) for lv in levels] == \
        [(1, True, 3)] * 2 + [(1, False, 3)] * 2 + [(4, True, 5)] * 2
    assert all(lv["output_tok_per_s"] == 40.0 for lv in levels)
    ratios = bench_serve.round_ratios(measured)
    assert {r["vs_offline"]["median"] for r in ratios} == {0.8}


def test_percentiles_and_summary_of_streamed_requests() -> None:
    results = [{"ttft": 0.1, "latency": 1.0, "tokens": 4, "gaps": [0.01, 0.02, 0.03]},
               {"ttft": 0.3, "latency": 2.0, "tokens": 4, "gaps": [0.01, 0.01, 0.5]}]
    summary = bench_serve.summarize(results, wall=2.0)
    assert summary["output_tok_per_s"] == 4.0 and summary["seconds_per_request"] == 1.5
    assert summary["ttft_p50_s"] == pytest.approx(0.2)
    assert summary["itl_p50_ms"] == pytest.approx(15.0)
    assert summary["itl_p99_ms"] > 400


async def _serve_once(response: bytes) -> tuple[asyncio.AbstractServer, int, list[bytes]]:
    """A started HTTP server on 127.0.0.1 answering any request with ``response`` sent in
    pieces of 7 bytes (chunk boundaries fall anywhere); returns it, its port and the list the
    requests it gets go to."""
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        seen.append(head + await reader.readexactly(length))
        for i in range(0, len(response), 7):
            writer.write(response[i:i + 7])
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def test_raw_client_reads_chunked_streams_and_refuses_errors() -> None:
    events = b"".join(b'data: {"choices": [{"text": "%d"}]}\n\n' % i for i in range(3))
    events += b'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\ndata: [DONE]\n\n'
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                       for part in (events[:50], events[50:51], events[51:])) + b"0\r\n\r\n"
    streamed = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    refused = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\nbad request"

    async def run(response: bytes) -> tuple[dict, list[bytes]]:
        server, port, seen = await _serve_once(response)
        async with server:
            return await bench_serve.one_request(port, [5, 6], 3, stream=True), seen

    result, seen = asyncio.run(run(streamed))
    assert result["tokens"] == 3 and len(result["gaps"]) == 2 and result["ttft"] > 0
    body = json.loads(seen[0].split(b"\r\n\r\n", 1)[1])
    assert body["prompt"] == [5, 6] and body["stream"] and body["max_tokens"] == 3
    with pytest.raises(RuntimeError, match="status 400: b'bad request'"):
        asyncio.run(run(refused))
