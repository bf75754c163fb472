"""The mixed-steps benchmark end to end at its smallest (tiny model). Nothing here is timed."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_mixed_steps  # noqa: E402


def test_quick_run_reports_each_setting(tmp_path: Path) -> None:
    out = tmp_path / "mixed.json"
    assert bench_mixed_steps.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    levels = report["levels"]
    assert [(lv["concurrency"], lv["mixed_step_tokens"]) for lv in levels] == [(4, None), (4, 16)]
    for lv in levels:
        assert lv["output_tok_per_s"] > 0 and lv["steps"] > 0 and len(lv["rounds_tok_per_s"]) == 1
        assert lv["itl_p99_ms"] >= lv["itl_p50_ms"] > 0 and lv["ttft_p99_s"] >= lv["ttft_p50_s"]


def test_percentiles_are_bench_serves() -> None:
    """One definition of p50/p99 for the in-process and the HTTP view (interpolated)."""
    import bench_serve

    assert bench_mixed_steps.percentile is bench_serve.percentile
    assert bench_mixed_steps.percentile([5.0, 1.0, 3.0, 2.0], 50) == 2.5
