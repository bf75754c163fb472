"""benchmarks/bench_native.py runs its three decode paths and writes its JSON (tiny preset)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_native  # noqa: E402

from bamba.native import dispatch


@pytest.mark.skipif(not dispatch.linear_available(torch.float32),
                    reason="the native decode paths need AVX-512 and a C compiler")
def test_quick_run_times_three_paths_and_restores_the_switches(tmp_path) -> None:
    fits, fused = dispatch.layer_fits, dispatch.decode_step_fits
    out = tmp_path / "native.json"
    assert bench_native.main(["--quick", "--dtypes", "float32", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert all(row[f"{path}_ms"] > 0 for path in bench_native.PATHS)
    assert dispatch.layer_fits is fits and dispatch.decode_step_fits is fused
