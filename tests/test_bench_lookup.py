"""The prompt-lookup benchmark end to end at its smallest (tiny shapes, a tiny checkpoint).
Nothing here is timed."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_lookup  # noqa: E402


def test_quick_run_reports_passes_and_every_kind(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "lookup.json"
    assert bench_lookup.main(["--quick", "--model", str(tiny_checkpoint), "--dtype", "float32",
                              "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    passes = report["pass_cost"]["passes"]
    assert [p["tokens"] for p in passes] == list(range(1, 10))
    assert passes[0]["rows_over_decode_step"] == 1.0
    assert all(p["rows_ms"] > 0 and p["forward_ms"] > 0 for p in passes)
    rows = report["continuations"]
    assert [(r["kind"], r["prompt_lookup_tokens"]) for r in rows] == \
        [(kind, k) for kind in ("recite", "continue") for k in (0, 3)]
    for row in rows:
        assert row["tok_s"] > 0
        assert row["as_plain_until_first_difference"] == pytest.approx(1.0)  # float32, greedy
    engine = report["engine_continuations"]
    assert [(r["concurrent"], r["kind"], r["num_speculative_tokens"]) for r in engine] == \
        [(n, kind, k) for n in (1, 2) for kind in ("recite", "continue") for k in (0, 3)]
    assert all(r["tok_s"] > 0 for r in engine)
    assert all(r["as_plain_until_first_difference"] == pytest.approx(1.0) for r in engine)
    assert report["host"]["read_gb_per_s"] > 0
