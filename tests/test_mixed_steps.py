"""Mixed steps: a newcomer's prompt chunks beside decoding sequences, cut to
``mixed_step_tokens`` and run with the decoding rows in one native call (a row per token, the
chunk's rows advancing its state token by token), equal to the plain model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_engine import assert_pools_full, greedy, prompts, reference_greedy, tiny_model

from bamba.cache import ContiguousCache
from bamba.cache_protocol import KVLayout
from bamba.config import preset
from bamba.engine import LLM
from bamba.engine.page_pool import PagePool
from bamba.engine.scheduler import Scheduler, SchedulerConfig, Sequence, Status
from bamba.model import BambaLM, init_weights
from bamba.native import accelerate, decode_ops, dispatch, plan

native = pytest.mark.skipif(not dispatch.linear_available(torch.float32),
                            reason="the native decode step needs AVX-512 and a C compiler")


def _scheduler(mixed_step_tokens: int | None, budget: int = 64) -> Scheduler:
    return Scheduler(PagePool(64, "KV block"), PagePool(16, "state slot"), None,
                     SchedulerConfig(4, 8, budget, True, 16, mixed_step_tokens))


def _decoding(seq_id: int, scheduler: Scheduler) -> Sequence:
    """A running sequence with one token left to compute."""
    seq = Sequence(seq_id, list(range(9)), 8, status=Status.RUNNING, num_computed=8,
                   block_ids=scheduler.blocks.allocate(3), slot=scheduler.slots.allocate(1)[0])
    scheduler.seqs[seq_id] = seq
    scheduler.running.append(seq)
    return seq


def test_prompt_chunks_are_cut_to_fit_beside_decoders() -> None:
    scheduler = _scheduler(mixed_step_tokens=8)
    for seq_id in range(4):
        _decoding(seq_id, scheduler)
    scheduler.add(Sequence(4, list(range(30)), 30))
    scheduler.add(Sequence(5, list(range(30)), 30))
    out = scheduler.schedule()
    assert [len(c.token_ids) for c in out.chunks] == [1, 1, 1, 1, 4]  # 8 - 4 decoders
    scheduler.update(out)
    for seq_id in range(4):
        scheduler.seqs[seq_id].token_ids.append(5)  # the sampled tokens
    out = scheduler.schedule()  # the prefilling one takes the room; no room for a second
    assert [len(c.token_ids) for c in out.chunks] == [1, 1, 1, 1, 4]
    scheduler.add(Sequence(6, list(range(30)), 30))
    scheduler.add(Sequence(7, list(range(30)), 30))  # 4 prompts in progress beside 4 decoders
    assert [len(c.token_ids) for c in scheduler.schedule().chunks] == [1, 1, 1, 1, 4]


def test_prompts_that_cannot_be_admitted_do_not_lift_the_cut() -> None:
    """A queue beyond max_num_seqs (8 here) is not a burst this step could take."""
    scheduler = _scheduler(mixed_step_tokens=16)
    for seq_id in range(7):
        _decoding(seq_id, scheduler)
    for seq_id in range(7, 17):
        scheduler.add(Sequence(seq_id, list(range(30)), 30))
    assert [len(c.token_ids) for c in scheduler.schedule().chunks] == [1] * 7 + [9]


def test_without_decoders_room_or_majority_prompts_take_the_whole_budget() -> None:
    alone = _scheduler(mixed_step_tokens=6)
    alone.add(Sequence(0, list(range(30)), 30))
    assert [len(c.token_ids) for c in alone.schedule().chunks] == [30]

    crowded = _scheduler(mixed_step_tokens=2)  # the decoders alone fill it
    _decoding(0, crowded)
    _decoding(1, crowded)
    crowded.add(Sequence(2, list(range(30)), 30))
    assert [len(c.token_ids) for c in crowded.schedule().chunks] == [1, 1, 30]

    burst = _scheduler(mixed_step_tokens=16)  # 2 decoders, 3 newcomers
    for seq_id in range(2):
        _decoding(seq_id, burst)
    for seq_id in range(2, 5):
        burst.add(Sequence(seq_id, list(range(20)), 20))
    assert [len(c.token_ids) for c in burst.schedule().chunks] == [1, 1, 20, 20, 20]

    uncapped = _scheduler(mixed_step_tokens=None)
    for seq_id in range(4):
        _decoding(seq_id, uncapped)
    uncapped.add(Sequence(4, list(range(30)), 30))
    assert [len(c.token_ids) for c in uncapped.schedule().chunks] == [1, 1, 1, 1, 30]
    with pytest.raises(ValueError, match="mixed_step_tokens must be at least 2"):
        _scheduler(mixed_step_tokens=1)


def _record_steps(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """(each step's chunk lengths, each native one-call step's row count)."""
    steps, calls = [], []
    schedule, real = llm.scheduler.schedule, decode_ops.decode_layers

    def record():
        out = schedule()
        steps.append([len(c.token_ids) for c in out.chunks])
        return out

    def counted(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    llm.scheduler.schedule = record
    monkeypatch.setattr(decode_ops, "decode_layers", counted)
    return steps, calls


def _join_while_decoding(llm: LLM, first: list[list[int]], later: list[list[int]],
                         n: int) -> list:
    """``first`` decoding, then each of ``later`` joining a few steps apart; the outputs in
    that order."""
    ids = [llm.add_request(p, greedy(n + 12, logprobs=1)) for p in first]
    llm.step()
    outs = {}
    for prompt in later:
        ids.append(llm.add_request(prompt, greedy(n, logprobs=1)))
        for _ in range(4):
            for out in llm.step():
                if out.finished:
                    outs[out.request_id] = out
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                outs[out.request_id] = out
    return [outs[i] for i in ids]


@native
@pytest.mark.parametrize("layout", ["hybrid", "mamba", "attention"])
def test_mixed_steps_run_as_one_native_call_and_equal_the_model(
        layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(layout)
    llm = LLM(model, memory_gb=0.001, block_size=4, mixed_step_tokens=6,
              enable_prefix_caching=False)
    steps, calls = _record_steps(llm, monkeypatch)
    batch = prompts((5, 7, 6, 23, 11))
    outs = _join_while_decoding(llm, batch[:3], batch[3:], 5)
    for prompt, out in zip(batch, outs, strict=True):
        n = len(out.outputs[0].token_ids)
        assert out.outputs[0].token_ids == reference_greedy(model, prompt, n)
    capped = [s for s in steps if s.count(1) == 3 and max(s) > 1 and sum(s) == 6]
    assert len(capped) >= 3  # the 23-token prompt, 3 tokens a step beside 3 decoders
    assert sorted(calls) == sorted(sum(s) for s in steps)  # every step: one call
    assert_pools_full(llm)


@native
def test_mixed_steps_with_prefix_snapshots_and_logprobs_equal_uncapped_steps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefix caching cuts chunks at block boundaries and snapshots the state there; the
    tokens and logprobs equal those of whole-prompt steps (a torch prefill pass)."""
    model = tiny_model("hybrid")
    shared = prompts((12,), seed=3)[0]
    batch = prompts((5, 9, 3, 14, 10), prefix=shared)

    def run(mixed: int | None) -> list:
        llm = LLM(model, memory_gb=0.001, block_size=4, mixed_step_tokens=mixed,
                  snapshot_interval=8)
        outs = _join_while_decoding(llm, batch[:3], batch[3:], 6)
        assert_pools_full(llm)
        return outs

    want, got = run(None), run(5)
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor([t.logprob for t in g.outputs[0].logprobs]),
                                   torch.tensor([t.logprob for t in w.outputs[0].logprobs]),
                                   atol=1e-4, rtol=0)


@native
def test_a_hooked_layer_sends_mixed_steps_to_the_grouped_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward hook must see every call: the one-call step declines before touching any
    state, and the step runs per chunk length instead, still equal to the model."""
    model = tiny_model("hybrid")
    seen = []
    handle = model.model.layers[0].register_forward_hook(lambda *args: seen.append(1))
    try:
        llm = LLM(model, memory_gb=0.001, block_size=4, mixed_step_tokens=6)
        batch = prompts((5, 4, 6, 13))
        outs = _join_while_decoding(llm, batch[:3], batch[3:], 4)
    finally:
        handle.remove()
    assert seen
    for prompt, out in zip(batch, outs, strict=True):
        n = len(out.outputs[0].token_ids)
        assert out.outputs[0].token_ids == reference_greedy(model, prompt, n)


@native
def test_rows_of_one_slot_must_be_adjacent_and_successive() -> None:
    cfg = preset("tiny", attn_layer_indices=[1])
    model = accelerate(init_weights(BambaLM(cfg), seed=0).eval())
    layers = model.model.layers
    cache = ContiguousCache(cfg, 2, 8, torch.float32)
    tensors = [plan.layer_tensors(layers[0]).whole(), plan.layer_tensors(layers[1]).whole()]
    storage = [decode_ops.LayerStorage(cache.conv[0], cache.ssm[0]),
               decode_ops.LayerStorage(*cache.kv_pages(1)[:2])]
    kv = cache.kv_pages(1)[2]

    def step(slots: list[int], positions: list[int]) -> torch.Tensor:
        m = len(slots)
        rows = decode_ops.StepRows(torch.tensor(slots), torch.tensor(positions),
                                   torch.ones(m, cfg.rotary_dim), torch.zeros(m, cfg.rotary_dim),
                                   torch.tensor([s * 8 + p for s, p in zip(slots, positions)]),
                                   torch.tensor([[s * 8 + t for t in range(8)] for s in slots]))
        with torch.inference_mode():
            return decode_ops.decode_layers(torch.zeros(m, cfg.hidden_size), tensors,
                                            [False, True], storage, rows, layers[0].step_dims,
                                            layers[1].step_dims, kv, cfg.rms_norm_eps,
                                            (0.0, float("inf")))

    assert step([0, 1, 1, 1], [3, 0, 1, 2]).shape == (4, cfg.hidden_size)
    with pytest.raises(ValueError, match="rows on one state slot must be adjacent, at succ"):
        step([1, 0, 1], [3, 0, 4])
    with pytest.raises(ValueError, match="rows on one state slot must be adjacent, at succ"):
        step([0, 1, 1], [3, 0, 2])


@native
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_a_run_may_start_from_another_slots_state(state_dtype: torch.dtype) -> None:
    """``StepRows.sources``: a run of rows on slot 2 whose first row reads slot 0's state
    gives what copying slot 0 into slot 2 and stepping there gives, bit for bit, and leaves
    slot 0 as it was; a run without a source beside it steps in place."""
    cfg = preset("tiny", attn_layer_indices=[])
    model = accelerate(init_weights(BambaLM(cfg), seed=0).eval())
    layers = model.model.layers
    tensors = [plan.layer_tensors(layer).whole() for layer in layers]
    cache = ContiguousCache(cfg, 3, 8, torch.float32, state_dtype=state_dtype)
    pools = [*cache.conv.values(), *cache.ssm.values()]
    for i, pool in enumerate(pools):
        pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(i)))
    start = [pool.clone() for pool in pools]
    x = torch.randn(4, cfg.hidden_size, generator=torch.Generator().manual_seed(9))

    def step(sources: list[int] | None) -> torch.Tensor:
        storage = [decode_ops.LayerStorage(cache.conv[i], cache.ssm[i])
                   for i in range(len(layers))]
        rows = decode_ops.StepRows(torch.tensor([2, 2, 2, 1]), torch.tensor([3, 4, 5, 3]),
                                   torch.ones(4, 0), torch.zeros(4, 0),
                                   torch.zeros(4, dtype=torch.long),
                                   torch.zeros(4, 8, dtype=torch.long),
                                   None if sources is None else torch.tensor(sources))
        with torch.inference_mode():
            return decode_ops.decode_layers(x, tensors, [False] * len(layers), storage, rows,
                                            layers[0].step_dims, plan.NO_LAYER,
                                            KVLayout(0, 0), cfg.rms_norm_eps,
                                            (0.0, float("inf")))

    got = step([0, 2, 2, 1])
    after = [pool.clone() for pool in pools]
    for pool, first in zip(pools, start, strict=True):  # again: slot 0 copied in by hand
        pool.copy_(first)
        pool[2] = first[0]
    want = step(None)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(after, pools, strict=True))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(after, start, strict=True))
    assert not all(torch.equal(a[2], b[0]) for a, b in zip(after, start, strict=True))


def test_bad_mixed_step_tokens_are_refused(capsys: pytest.CaptureFixture) -> None:
    from bamba.cli import main

    with pytest.raises(ValueError, match="mixed_step_tokens must be 'auto', None or a count"):
        LLM(tiny_model(), memory_gb=0.001, mixed_step_tokens="fast")
    with pytest.raises(ValueError, match="mixed_step_tokens must be at least 2"):
        LLM(tiny_model(), memory_gb=0.001, mixed_step_tokens=1)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "unused-dir", "--mixed-step-tokens", "1"])
    assert exit_info.value.code == 2
    assert "expected auto, 0 or at least 2, got 1" in capsys.readouterr().err


@pytest.mark.skipif(not dispatch.linear_available(torch.bfloat16),
                    reason="the bf16 decode step needs AVX-512 BF16")
def test_bf16_mixed_steps_match_the_grouped_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same schedule run per chunk length (a torch prefill pass for the chunks) instead of
    as one call: in bf16 the two round differently (a scan against token by token), so the
    logprobs agree within bf16's rounding, not bit for bit."""
    cfg = dataclasses.replace(tiny_model("hybrid").config, intermediate_size=64)  # k % 32 == 0
    model = init_weights(BambaLM(cfg), seed=0).to(torch.bfloat16).eval()
    batch = prompts((5, 7, 6, 23, 11))

    def run(one_call: bool) -> tuple[list, int]:
        llm = LLM(model, memory_gb=0.001, block_size=4, mixed_step_tokens=6,
                  enable_prefix_caching=False)
        as_rows, calls = llm.runner._forward_as_rows, []
        monkeypatch.setattr(llm.runner, "_forward_as_rows",
                            lambda chunks: calls.append(1) or as_rows(chunks))
        if not one_call:
            monkeypatch.setattr(llm.runner, "_fits_one_call", lambda chunks: False)
        return _join_while_decoding(llm, batch[:3], batch[3:], 5), len(calls)

    (got, one_calls), (want, none) = run(True), run(False)
    assert one_calls >= 3 and none == 0
    for g, w in zip(got, want, strict=True):
        # Rows summed in other groupings round apart in bf16: a near tie may pick another
        # token later on; up to there the logprobs agree.
        same = 0
        while same < len(w.outputs[0].token_ids) and \
                g.outputs[0].token_ids[same] == w.outputs[0].token_ids[same]:
            same += 1
        assert same >= 4
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in g.outputs[0].logprobs[:same]]),
            torch.tensor([t.logprob for t in w.outputs[0].logprobs[:same]]), atol=0.05, rtol=0)
