"""benchmarks/bench_quant.py: its one-process prefill and batch-1 decode over several
checkpoints, and a quick whole run (slow: it quantizes and measures each scheme in a process of
its own)."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_quant  # noqa: E402


def test_one_process_times_every_checkpoint_against_the_first(make_hf_checkpoint):
    first, second = make_hf_checkpoint("hybrid"), make_hf_checkpoint("hybrid", seed=1)
    args = argparse.Namespace(threads=2, cycles=3, prompt_tokens=16)
    result = bench_quant.one_process([first, second, first], args)
    assert set(result) == {"prefill", "decode_b1"}
    for figure in result.values():
        assert len(figure["tok_s"]) == len(figure["vs_first"]) == 3
        assert all(v > 0 for v in figure["tok_s"])
        assert figure["vs_first"][0] == 1.0  # the first against itself, turn by turn
        assert 0.2 < figure["vs_first"][2] < 5  # the same weights again: about 1


@pytest.mark.slow
def test_quick_run_reports_every_scheme_with_its_one_process_ratio(tmp_path):
    out = tmp_path / "quant.json"
    assert bench_quant.main(["--quick", "--quality", "off", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["shapes"]["tiny"]["bamba"]
    assert set(rows) == set(bench_quant.SCHEMES)
    for figure in ("prefill", "decode_b1"):
        assert rows["bf16"][f"{figure}_one_process_vs_bf16"] == 1.0
        assert all(r[f"{figure}_one_process_tok_s"] > 0 for r in rows.values())
    assert rows["int4"]["disk_mb"] < rows["int8"]["disk_mb"] < rows["bf16"]["disk_mb"]
