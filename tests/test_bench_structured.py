"""The structured-outputs benchmark end to end at its smallest (tiny preset, its own BPE).
Nothing here is timed."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("llguidance")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_structured  # noqa: E402


def test_quick_run_reports_every_kind_at_both_batch_sizes(tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    assert bench_structured.main(["--quick", "--rounds", "1", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["n"], r["kind"]) for r in report["rows"]] == \
        [(n, kind) for n in (1, 8) for kind in bench_structured.KINDS]
    for row in report["rows"]:
        assert row["tok_s"] > 0 and row["step_ms"] > 0
        assert row["over_plain"] == 1.0 if row["kind"] == "plain" else row["over_plain"] > 0
    assert set(report["compile_seconds"]) == {"first_constraint", *bench_structured.KINDS}
    assert report["host"]["read_gb_per_s"] > 0
