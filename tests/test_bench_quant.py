"""benchmarks/bench_quant.py: its one-process prefill and batch-1 decode over several
checkpoints, the same turns with llama-bench on a GGUF file beside them and their ratios (slow:
it needs the built binaries), and a quick whole run (slow: it quantizes and measures each
scheme in a process of its own)."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_quant  # noqa: E402
import llama_cpp  # noqa: E402


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


def test_turn_ratios_divide_within_each_turn():
    """A peer twice as slow as checkpoint 0 in every turn, whatever the turn's spell, is 2x
    slower; a checkpoint alternately faster and slower than it sits at the median."""
    ours = [[1.0, 1.0], [3.0, 12.0], [0.5, 0.25], [2.0, 2.0], [1.0, 1.0]]
    theirs = [[2.0], [6.0], [1.0], [4.0], [2.0]]
    ratios = bench_quant.turn_ratios(ours, theirs)
    assert ratios[0][0] == 2.0
    assert ratios[0][1] == 2.0  # 2, 0.5, 4, 2, 2 per turn


@pytest.mark.slow
def test_llama_bench_takes_turns_beside_ours_on_its_gguf(make_hf_checkpoint, tmp_path):
    from bamba.checkpoint import from_pretrained, load_tokenizer
    from bamba.gguf.export import export_gguf

    llama_cpp.find_or_build(tool="llama-bench")
    source = make_hf_checkpoint("hybrid")
    gguf = export_gguf(from_pretrained(source), load_tokenizer(source), tmp_path / "m.gguf",
                       "q8_0")
    args = argparse.Namespace(threads=2, cycles=2, prompt_tokens=16, llama_turns=True)
    result = bench_quant.one_process([source, gguf], args)
    llama = result["llama_cpp"]
    assert llama["files"] == [str(gguf)]
    assert len(llama["decode_b1_tok_s"]) == 1 and llama["decode_b1_tok_s"][0] > 0
    assert len(llama["decode_b1_vs_file"]) == 1 and len(llama["decode_b1_vs_file"][0]) == 2
    assert all(r > 0 for r in llama["decode_b1_vs_file"][0])


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
