"""benchmarks/bench_prefill_products.py at its smallest (tiny shape, one round): both ways of
every row count, its JSON, and the dispatch switch restored. Nothing here is timed."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_prefill_products  # noqa: E402

from bamba.native import dispatch, linear_ops


@pytest.mark.skipif(not dispatch.library_available() or linear_ops.gemm_rows(
    torch.zeros(16, 64, dtype=torch.bfloat16), torch.zeros(4, 64, dtype=torch.bfloat16),
    None) is None, reason="the panel product needs AVX-512 VNNI and BF16")
def test_quick_run_measures_both_ways_and_restores_the_switch(tmp_path: Path) -> None:
    fits = dispatch.gemm_fits
    out = tmp_path / "prefill_products.json"
    assert bench_prefill_products.main(["--quick", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["rows"] for r in result["rows"]] == list(bench_prefill_products.ROWS)
    for row in result["rows"]:
        for part in ("linears", "forward"):
            assert row[part]["panel_ms"] > 0 and row[part]["torch_ms"] > 0
    assert result["max_gemm_rows"] == dispatch.MAX_GEMM_ROWS
    assert dispatch.gemm_fits is fits
