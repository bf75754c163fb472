"""The server benchmark end to end at its smallest (tiny model, bamba's side, a few requests),
and how it records a llama.cpp peer it cannot find. Nothing here is timed."""

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
    assert [lv["concurrency"] for lv in report["offline"]["levels"]] == [1, 4]
    assert report["bamba"]["server_metrics_after"]["bamba_kv_blocks_in_use"] == 0
    assert "no llama-server" in report["llama_cpp"]["missing"]
    assert report["host"]["threads"] == 2


def test_peer_missing_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMA_SERVER", raising=False)
    with pytest.raises(llama_cpp.PeerMissing, match="building is off"):
        llama_cpp.find_or_build(tmp_path, build=False)
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "absent"))
    with pytest.raises(llama_cpp.PeerMissing, match="not an executable"):
        llama_cpp.find_or_build(tmp_path)


def test_percentiles_and_summary_of_streamed_requests() -> None:
    results = [{"ttft": 0.1, "latency": 1.0, "tokens": 4, "gaps": [0.01, 0.02, 0.03]},
               {"ttft": 0.3, "latency": 2.0, "tokens": 4, "gaps": [0.01, 0.01, 0.5]}]
    summary = bench_serve.summarize(results, wall=2.0)
    assert summary["output_tok_per_s"] == 4.0 and summary["seconds_per_request"] == 1.5
    assert summary["ttft_p50_s"] == pytest.approx(0.2)
    assert summary["itl_p50_ms"] == pytest.approx(15.0)
    assert summary["itl_p99_ms"] > 400
