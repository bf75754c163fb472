"""bench_llamacpp.py and the measuring helpers it shares (benchmarks/measure.py): options, the
parsers of llama-bench's and llama-batched-bench's outputs (captured from the real binaries on a
tiny model), the retry when llama-batched-bench loses its rows, peers that overrun their
budget, and a short run end to end with llama.cpp off. Nothing here is timed."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_llamacpp  # noqa: E402
import llama_cpp  # noqa: E402
import measure  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "llama_cpp"


def test_options_default_to_the_issue_s_figures_and_quick_keeps_given_ones() -> None:
    args = bench_llamacpp.parse_args([])
    assert (args.prompts, args.batches, args.formats) == ([512, 4096], [1, 8, 32],
                                                          ["bf16", "int8", "int4"])
    assert args.models == ["hybrid", "twin"] and args.rounds == 2
    quick = bench_llamacpp.parse_args(["--quick", "--batches", "1", "2"])
    assert quick.preset == "tiny" and quick.prompts == [64, 256] and quick.batches == [1, 2]
    for bad in (["--batches", "0"], ["--decode-context", "-1"], ["--formats", "fp8"]):
        with pytest.raises(SystemExit):
            bench_llamacpp.parse_args(bad)


def test_llama_bench_json_parses_per_prompt_generation_and_depth() -> None:
    rows = measure.parse_llama_bench((FIXTURES / "llama_bench_pp64_tg8.json").read_text())
    assert set(rows) == {(64, 0, 0), (0, 8, 0)}
    assert rows[64, 0, 0]["tok_s"] == pytest.approx(1215.572445)
    assert rows[0, 8, 0]["samples_tok_s"] == [462.6, 312.018]
    depth = measure.parse_llama_bench((FIXTURES / "llama_bench_tg4_d16.json").read_text())
    assert list(depth) == [(0, 4, 16)]
    with pytest.raises(ValueError, match="no results"):
        measure.parse_llama_bench("[]")


def test_batched_bench_jsonl_parses_every_batch() -> None:
    rows = measure.parse_batched_bench(
        (FIXTURES / "batched_bench_pp64_tg8_pl1_4.jsonl").read_text())
    assert set(rows) == {(64, 8, 1), (64, 8, 4)}
    assert rows[64, 8, 4] == {"prefill_seconds": pytest.approx(0.201984),
                              "prefill_tok_s": pytest.approx(1267.427124),
                              "decode_seconds": pytest.approx(0.086731),
                              "decode_tok_s": pytest.approx(368.956879)}
    with pytest.raises(ValueError, match="no results"):
        measure.parse_batched_bench("llama_batched_bench: n_kv_max = 1024\n")


def fake_tool(cache: Path, name: str, script: str) -> Path:
    """An executable named like a llama.cpp tool in a fake build directory of ``cache``."""
    binary = cache / "build" / "bin" / name
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text("#!/bin/sh\n" + script)
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    return binary


def test_batched_bench_runs_again_when_its_rows_are_lost(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp, "CACHE", tmp_path)
    runs = tmp_path / "runs"
    fixture = FIXTURES / "batched_bench_pp64_tg8_pl1_4.jsonl"
    # the first run prints nothing (rows lost at exit), the second prints them
    fake_tool(tmp_path, "llama-batched-bench",
              f'echo run >> {runs}\n[ "$(wc -l < {runs})" -ge 2 ] && cat {fixture}\nexit 0\n')
    rows = measure.run_batched_bench(tmp_path / "m.gguf", 2, [], [(64, 8, 4)], build=False)
    assert rows[64, 8, 4]["decode_tok_s"] == pytest.approx(368.956879)
    assert runs.read_text().count("run") == 2
    with pytest.raises(llama_cpp.PeerMissing, match=r"no row for \[\(64, 8, 32\)\] in 2 runs"):
        measure.run_batched_bench(tmp_path / "m.gguf", 2, [], [(64, 8, 32)], tries=2,
                                  build=False)


def test_a_tool_past_its_budget_is_killed_and_a_failing_one_says_why(tmp_path: Path) -> None:
    with pytest.raises(measure.ChildTimeout, match="within 0.2 s"):
        measure.run_tool(["sleep", "30"], timeout=0.2)
    with pytest.raises(llama_cpp.PeerMissing, match="exited 3: broken"):
        measure.run_tool(["sh", "-c", "echo broken >&2; exit 3"])
    code = "import time; b = bytearray(200 * 2**20); time.sleep(0.5); print('ok')"
    run = measure.run_tool([sys.executable, "-c", code])
    assert run.stdout.strip() == "ok" and 200 < run.peak_rss_mb < 400
    # its own peak, not this (larger) process's memory before exec
    ballast = b"x" * (600 * 2**20)
    assert measure.run_tool(["sleep", "0.3"]).peak_rss_mb < 50 and ballast


def test_best_round_is_fastest_and_smallest() -> None:
    runs = [{"prefill_tok_s": 10.0, "rss_model_mb": 5.0, "prefill_seconds": 2.0, "note": "a"},
            {"prefill_tok_s": 12.0, "rss_model_mb": 6.0, "prefill_seconds": 1.5, "note": "b"}]
    assert measure.best(runs) == {"prefill_tok_s": 12.0, "rss_model_mb": 5.0,
                                  "prefill_seconds": 1.5, "note": "a"}


def test_rows_compare_the_figures_both_sides_have() -> None:
    ours = {"rss_model_mb": 300.0, "prefill_512_tok_s": 900.0, "decode_b8_tok_s": 300.0}
    peer = {"size_mb": 340.0, "prefill_512_tok_s": 600.0}
    assert bench_llamacpp.compare(ours, peer) == [
        {"figure": "prefill_512", "bamba_tok_s": 900.0, "llama_cpp_tok_s": 600.0, "ratio": 1.5}]


def test_short_run_without_llama_cpp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # the measuring child too
    out = tmp_path / "llamacpp.json"
    assert bench_llamacpp.main(["--quick", "--llama-cpp", "off", "--models", "hybrid",
                                "--formats", "bf16", "int8", "--prompts", "32", "--batches",
                                "1", "2", "--steps", "2", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    [bf16] = [r for r in report["results"] if r["format"] == "bf16"]
    assert set(bf16["bamba"]) == {"rss_model_mb", "prefill_32_tok_s", "decode_b1_tok_s",
                                  "decode_b2_tok_s"}
    assert all(v > 0 for v in bf16["bamba"].values())
    assert bf16["llama_cpp"] == {"missing": "--llama-cpp off"} and bf16["rows"] == []
    quant_missing = bench_llamacpp.quant_missing()
    if quant_missing:  # no `bamba quantize` yet: the int8 rows say why
        assert report["skipped_formats"] == {"int8": quant_missing}
    else:
        assert any(r["format"] == "int8" for r in report["results"])
    assert report["host"]["threads"] == 2 and report["models"]["hybrid"]["model_type"] == "bamba"


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    out = tmp_path / "llamacpp.json"
    assert bench_llamacpp.main(["--quick", "--llama-cpp", "off", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {(r["model"], r["format"]) for r in report["results"]} >= {("hybrid", "bf16"),
                                                                      ("twin", "bf16")}


@pytest.mark.slow
def test_the_twin_converts_as_llama(tmp_path: Path) -> None:
    """llama.cpp's converter (from the cached sdist) writes the all-attention twin as `llama`."""
    source = llama_cpp.CACHE / "sdist" / "vendor" / "llama.cpp"
    if not source.is_dir():
        pytest.skip("llama.cpp's source is not in the cache")
    from bamba.config import llama_twin, preset

    measure.write_random(tmp_path / "twin", llama_twin(preset("tiny", bos_token_id=1,
                                                              eos_token_id=2, pad_token_id=0)))
    gguf = measure.llama_ggufs(tmp_path / "twin", tmp_path, kinds=())["BF16"]
    sys.path.insert(0, str(source / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.remove(str(source / "gguf-py"))
    field = GGUFReader(gguf).fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
