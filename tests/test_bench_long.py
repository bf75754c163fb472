"""bench_long.py: options, the memory prediction and pool size, when the twin is skipped and
why, and short runs end to end with llama.cpp off (one killed by its budget). Nothing here is
timed."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_long  # noqa: E402

from bamba.analyze import parameter_count  # noqa: E402
from bamba.config import llama_twin, preset  # noqa: E402
from bamba.model import QUERY_BLOCK  # noqa: E402


def test_options_default_to_32k_and_128k_and_quick_keeps_given_ones() -> None:
    args = bench_long.parse_args([])
    assert args.lengths == [32768, 131072] and args.decode_tokens == 32 and args.threads == 2
    assert args.preset == "bench" and args.models == ["hybrid", "twin"]
    quick = bench_long.parse_args(["--quick", "--lengths", "512", "128", "512"])
    assert quick.preset == "tiny" and quick.lengths == [128, 512] and quick.chunk == 512
    assert bench_long.parse_args(["--quick"]).lengths == [1024, 2048]
    for bad in (["--lengths", "0"], ["--twin-max-seconds", "0"], ["--chunk", "0"]):
        with pytest.raises(SystemExit):
            bench_long.parse_args(bad)


def test_prediction_at_128k_is_weights_kv_and_state() -> None:
    hybrid = preset("bench", max_position_embeddings=262144)
    tokens = 131072 + 32
    ours = bench_long.predicted_memory(hybrid, tokens, "float32", 2048)
    twin = bench_long.predicted_memory(llama_twin(hybrid), tokens, "float32", 2048)
    assert ours["weights_mb"] == round(parameter_count(hybrid) * 2 / 1e6, 1)
    # 3 attention layers x K and V x 2 KV heads x 64 x 2 bytes; the twin has 32 such layers
    assert ours["kv_mb"] == round(tokens * 1536 / 1e6, 1)
    assert twin["kv_mb"] == round(tokens * 16384 / 1e6, 1) and twin["state_mb"] == 0
    # 29 Mamba layers: conv state 3 x 1280 and SSM state 16 x 64 x 128, float32
    assert ours["state_mb"] == round(29 * (3 * 1280 + 16 * 64 * 128) * 4 / 1e6, 1)
    assert ours["transient_mask_mb"] == round(QUERY_BLOCK * tokens * 3 / 1e6, 1)
    assert ours["gather_buffers_mb"] == twin["gather_buffers_mb"] == \
        round(1.25 * 2 * tokens * 2 * 64 * 2 / 1e6, 1)


def test_the_engine_pool_holds_exactly_one_request() -> None:
    from bamba.engine.page_pool import plan_pools

    import torch

    config = preset("tiny")
    for tokens in (1000, 1024):
        plan = plan_pools(config, int(bench_long.pool_gb(config, tokens, "float32") * 1e9),
                          bench_long.BLOCK_SIZE, torch.bfloat16, torch.float32, 1, tokens,
                          False)
        assert plan.num_slots == 1 and plan.num_blocks == -(-tokens // 16) + 1


def test_the_twin_is_skipped_when_its_scaled_time_exceeds_the_budget() -> None:
    args = bench_long.parse_args(["--twin-max-seconds", "600"])
    twin = llama_twin(preset("bench", max_position_embeddings=262144))
    small = {"total_mb": 1.0, "transient_mask_mb": 1.0}
    done = bench_long.Case("twin", 32768, "bamba")
    done.runs.append({"prefill_seconds": 100.0})
    why, budget = bench_long.why_not(bench_long.Case("twin", 131072, "bamba"), twin, [done],
                                     small, args)
    assert why is not None and "prefill predicted" in why and budget is None
    # at 32K the twin has no earlier length to scale from: it runs, within the budget
    assert bench_long.why_not(bench_long.Case("twin", 32768, "bamba"), twin, [], small,
                              args) == (None, 600.0)
    # the hybrid always runs, without a budget, unless it cannot fit in memory
    hybrid = bench_long.Case("hybrid", 131072, "bamba")
    assert bench_long.why_not(hybrid, twin, [], small, args) == (None, None)
    huge = {"total_mb": 1e9, "transient_mask_mb": 0.0}
    why, _ = bench_long.why_not(hybrid, twin, [], huge, args)
    assert "available" in why


def test_short_run_with_the_twin_over_its_budget(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # the measuring children too
    out = tmp_path / "long.json"
    assert bench_long.main(["--quick", "--lengths", "64", "160", "--decode-tokens", "2",
                            "--twin-max-seconds", "0.2", "--llama-cpp", "off",
                            "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    cases = {(c["model"], c["length"]): c for c in report["cases"]}
    assert set(cases) == {(m, n) for m in ("hybrid", "twin") for n in (64, 160)}
    for n in (64, 160):
        ours = cases["hybrid", n]["bamba"]
        assert ours["prefill_tok_s"] > 0 and ours["decode_tok_s"] > 0
        assert ours["prefill_chunks"] == 1 and ours["rss_after_decode_mb"] > 0
        assert ours["predicted"]["kv_mb"] == round((n + 2) * 2 * 2 * 2 * 64 * 2 / 1e6, 1)
        assert "ran past the time budget" in cases["twin", n]["bamba"]["skipped"]
        assert cases["hybrid", n]["llama_cpp"] == {"skipped": "--llama-cpp off"}
    assert report["models"]["hybrid"]["max_position_embeddings"] == 8192
    assert [r["length"] for r in report["ratios"]] == [64, 160]
    assert report["ratios"][0]["hybrid_vs_twin_decode_tok_s"] is None


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))
    out = tmp_path / "long.json"
    assert bench_long.main(["--quick", "--llama-cpp", "off", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    for case in report["cases"]:
        assert case["bamba"]["prefill_chunks"] == case["length"] // 512
        assert case["bamba"]["decode_tok_s"] > 0
    assert all(r["hybrid_vs_twin_decode_tok_s"] > 0 for r in report["ratios"])
