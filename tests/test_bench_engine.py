"""The engine benchmark's arithmetic: trapezoid integration, derived generation figures, fills."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from engine_decode import (EngineSteps, Timing, fill_, generation_rows,  # noqa: E402
                           predicted_generation_ratio, time_alternating, trapezoid)
from engine_report import render  # noqa: E402

from bamba.analyze import Precision, decode_cost  # noqa: E402
from bamba.config import llama_twin, preset  # noqa: E402
from bamba.model import BambaLM, init_weights  # noqa: E402


def test_trapezoid_is_exact_for_affine_and_stops_at_end():
    xs, ys = [0, 2, 6, 10], [1.0, 5.0, 13.0, 21.0]  # y = 2x + 1
    assert trapezoid(xs, ys, 6) == pytest.approx(6 * 6 + 6)
    assert trapezoid(xs, ys, 10) == pytest.approx(10 * 10 + 10)


def test_generation_rows_match_prediction_when_time_is_bytes():
    cfg = preset("bench")
    contexts = [512, 1536, 4608]
    p = Precision(state="float32")
    points = {"hybrid": {s: decode_cost(cfg, 8, s, p).bytes / 1e10 for s in contexts},
              "twin": {s: decode_cost(llama_twin(cfg), 8, s, p).bytes / 1e10 for s in contexts}}
    rows = generation_rows(points, cfg, 8, 512, [1024, 4096, 999], "float32")
    assert [r["outputs"] for r in rows] == [1024, 4096]  # 999 is not a measured end point
    for r in rows:
        assert r["fraction_of_predicted"] == pytest.approx(1.0)
        assert r["hybrid"]["tok_s"] == pytest.approx(8 * r["outputs"]
                                                     / r["hybrid"]["decode_seconds"])
    ratio = predicted_generation_ratio(cfg, 8, contexts, 4608, "float32")
    assert decode_cost(llama_twin(cfg), 8, 512, p).bytes / decode_cost(cfg, 8, 512, p).bytes \
        < ratio < decode_cost(llama_twin(cfg), 8, 4608, p).bytes / decode_cost(cfg, 8, 4608,
                                                                             p).bytes


def test_fill_covers_every_row():
    t = torch.zeros(130, 3, dtype=torch.bfloat16)
    fill_(t, torch.Generator().manual_seed(0), tile=64)
    assert bool((t != 0).any(dim=1).all())


def test_engine_steps_run_on_tiny_and_report_renders():
    torch.manual_seed(0)
    model = init_weights(BambaLM(preset("tiny")), seed=0).to(torch.bfloat16)
    step = EngineSteps(model, max_batch=2, max_context=40, state_dtype=torch.float32)
    before = step.llm.runner.ssm[0][step.slots[0]].clone()
    out = time_alternating({"step": step}, 2, 33, Timing(steps=1, repeats=2, warmup=0))["step"]
    assert len(out["repeat_step_s"]) == 2 and out["step_s"] > 0
    assert not torch.equal(before, step.llm.runner.ssm[0][step.slots[0]])  # state was updated
    assert render({}) == ""


def test_alternating_timing_swaps_the_order_every_repeat():
    calls = []
    steps = {name: (lambda b, s, name=name: calls.append(name)) for name in ("hybrid", "twin")}
    out = time_alternating(steps, 1, 8, Timing(steps=2, repeats=3, warmup=1))
    assert calls == ["hybrid", "twin"] + ["hybrid"] * 2 + ["twin"] * 4 + ["hybrid"] * 4 + \
        ["twin"] * 2
    assert set(out) == {"hybrid", "twin"}
    assert all(len(t["repeat_step_s"]) == 3 for t in out.values())


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "benchmarks"
                                         / "results").glob("engine*.json")), ids=lambda p: p.name)
def test_report_renders_every_committed_engine_result(path):
    import json

    data = json.loads(path.read_text())
    text = render(data)
    for section in data:  # every section the file holds gets its heading
        heading = {"context": "### Hybrid vs twin", "long": "### Long context",
                   "batched": "### Batched generation", "prefix": "### Prefix cache"}[section]
        assert heading in text
