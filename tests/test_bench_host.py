"""benchmarks/host.py: the host's measured limits recorded beside every benchmark figure."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import host  # noqa: E402


def test_describe_host_measures_positive_rates() -> None:
    info = host.describe_host(quick=True)
    assert info["bf16_matmul_tflops"] > 0 and info["fp32_matmul_tflops"] > 0
    assert info["read_gb_per_s"] > 0
    assert info["threads"] >= 1 and len(info["load_average"]) == 3
    json.dumps(info)  # goes into the benchmark's JSON as it is


def test_write_json_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "results" / "x.json"
    host.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        host.write_json(target, {"a": object()})  # not serialisable: the old file stays
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]  # no temp file left
