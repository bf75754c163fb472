"""benchmarks/ab_checkpoints.py at its smallest: every checkpoint is timed in every turn, the
order flipping each turn, and the results (with the host) are written. Nothing timed is
asserted beyond being positive."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ab_checkpoints  # noqa: E402
from serve_helpers import save_tiny_checkpoint  # noqa: E402


def test_checkpoints_take_turns_and_are_written(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = save_tiny_checkpoint(tmp_path / "a"), save_tiny_checkpoint(tmp_path / "b")
    order = []
    real = ab_checkpoints.prefill_seconds
    monkeypatch.setattr(ab_checkpoints, "prefill_seconds",
                        lambda model, length: order.append(id(model)) or real(model, length))
    out = tmp_path / "ab.json"
    ab_checkpoints.main([str(first), str(second), "--turns", "3", "--steps", "2", "--prompt",
                         "8", "--batches", "1", "3", "--output", str(out)])
    assert order[0] == order[3] == order[4] and order[1] == order[2] == order[5] != order[0]
    written = json.loads(out.read_text())
    assert written["host"]["read_gb_per_s"] > 0
    assert json.loads(capsys.readouterr().out) == written["results"]
    for path in (first, second):
        row = written["results"][str(path)]
        assert row["disk_mb"] > 0 and row["decode_b1_tok_s"] > 0 and row["prefill_8_tok_s"] > 0
        assert row["decode_b3_tok_s"] > 0 and "decode_b8_tok_s" not in row
