"""benchmarks/bench_int8_activations.py times both settings per scheme and batch and writes its
JSON (tiny preset); a trained checkpoint adds the decode-path quality of each."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_int8_activations  # noqa: E402

from bamba.native import quant_ops  # noqa: E402


def test_quick_run_measures_both_settings_and_leaves_int8_on(tmp_path, make_hf_checkpoint):
    if not quant_ops.set_int8_activations(True):
        pytest.skip("no AVX-512 VNNI here")
    out = tmp_path / "int8.json"
    trained = make_hf_checkpoint("hybrid")
    assert bench_int8_activations.main(["--quick", "--output", str(out), "--trained",
                                        str(trained), "--files", "1", "--tokens", "12"]) == 0
    result = json.loads(out.read_text())
    quality = result["quality"]
    assert quality["tokens"] == 11
    for scheme in ("int8", "int4"):
        rows = result["shapes"]["tiny"][f"{scheme}_weights"]
        assert [r["batch"] for r in rows] == list(bench_int8_activations.BATCHES)
        assert all(r["bf16_activations_tok_s"] > 0 and r["int8_activations_tok_s"] > 0
                   for r in rows)
        for acts in ("int8", "bf16"):
            setting = quality[f"{scheme}_{acts}_activations"]
            assert abs(setting["vs_bf16"]) < 0.05 and setting["perplexity"] > 1
    assert quant_ops.set_int8_activations(True)
