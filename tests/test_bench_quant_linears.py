"""benchmarks/bench_quant_linears.py times every linear of a shape per format and row count
and writes its JSON (tiny preset)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_quant_linears  # noqa: E402


def test_linear_shapes_are_the_models_but_the_lm_head():
    from bamba.config import preset

    config = preset("tiny")
    shapes = bench_quant_linears.linear_shapes("tiny")
    d_inner = config.mamba_n_heads * config.mamba_d_head
    assert (d_inner * 2 + 2 * config.mamba_n_groups * config.mamba_d_state
            + config.mamba_n_heads, config.hidden_size) in shapes
    assert (config.vocab_size, config.hidden_size) not in shapes
    attention = len(config.attn_layer_indices)  # q k v o + the MLP's gate up down
    assert len(shapes) == 5 * (config.num_hidden_layers - attention) + 7 * attention


def test_quick_run_times_every_format_at_every_row_count(tmp_path):
    out = tmp_path / "linears.json"
    try:
        assert bench_quant_linears.main(["--quick", "--rows", "1", "2", "40", "--output",
                                         str(out)]) == 0
    except SystemExit as exc:
        pytest.skip(str(exc))
    result = json.loads(out.read_text())["shapes"]["tiny"]
    rows = result["results"]
    assert {(r["rows"], r["format"]) for r in rows} == \
        {(m, f) for m in (1, 2, 40) for f in bench_quant_linears.FORMATS} | \
        {(40, f) for f in bench_quant_linears.TILES}  # the tiles' path at prefill rows only
    assert all(r["ms"] > 0 and r["gb_per_s"] > 0 for r in rows)
    size = {r["format"]: r["weight_mb"] for r in rows}
    assert size["int4"] < size["int8"] < size["bf16"]
