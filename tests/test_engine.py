"""End-to-end engine checks on a tiny random hybrid: the engine must give the plain model's
greedy tokens whatever the batching, chunking, caching or preemption, and return every page."""

from __future__ import annotations

import pytest
import torch

from bamba.config import BambaConfig
from bamba.engine import LLM, SamplingParams
from bamba.model import BambaLM, init_weights

LAYOUTS = {"hybrid": [1, 3], "mamba": [], "attention": [0, 1, 2, 3]}


def tiny_model(layout: str = "hybrid", seed: int = 0) -> BambaLM:
    cfg = BambaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2,
                      attn_layer_indices=LAYOUTS[layout], mamba_n_heads=4, mamba_d_head=16,
                      mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8,
                      initializer_range=0.2, max_position_embeddings=512, eos_token_id=2)
    return init_weights(BambaLM(cfg), seed=seed).eval()


@pytest.fixture(scope="module")
def model() -> BambaLM:
    return tiny_model()


def prompts(lengths: tuple[int, ...], seed: int = 1, prefix: list[int] | None = None
            ) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [(prefix or []) + torch.randint(3, 320, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def reference_greedy(model: BambaLM, prompt: list[int], n: int) -> list[int]:
    """Full forward pass over the whole sequence for every new token, argmax, no cache."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def greedy(max_tokens: int, logprobs: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          logprobs=logprobs)


def assert_pools_full(llm: LLM) -> None:
    stats = llm.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.num_free_slots == stats.num_slots
    assert all(llm.blocks.refcount(i) == 0 for i in range(llm.blocks.num_pages))
    assert all(llm.slots.refcount(i) == 0 for i in range(llm.slots.num_pages))
    assert not llm.has_unfinished_requests()


@pytest.mark.parametrize("layout, budget", [("hybrid", 16), ("hybrid", 4096), ("mamba", 16),
                                            ("attention", 16)])
def test_greedy_equals_model_for_mixed_batch(layout: str, budget: int) -> None:
    """Decode rows batched with prefill chunks (equal-length chunks share one call)."""
    model = tiny_model(layout)
    llm = LLM(model, memory_gb=0.001, block_size=4, max_num_batched_tokens=budget)
    batch = prompts((5, 17, 1, 30, 9, 17))
    lengths = [6, 3, 8, 5, 7, 4]
    outs = llm.generate(batch, [greedy(n) for n in lengths])
    for prompt, n, out in zip(batch, lengths, outs, strict=True):
        assert out.outputs[0].token_ids == reference_greedy(model, prompt, n)
        assert out.outputs[0].finish_reason == "length"
        assert out.prompt_token_ids == prompt
    assert_pools_full(llm)


def test_steps_mix_decode_and_prefill_within_the_token_budget(model: BambaLM) -> None:
    llm = LLM(model, memory_gb=0.001, block_size=4, max_num_batched_tokens=10)
    seen = []
    schedule = llm.scheduler.schedule

    def record():
        out = schedule()
        seen.append(out)
        return out

    llm.scheduler.schedule = record
    batch = prompts((3, 25, 40))
    llm.add_request(batch[0], greedy(12))
    llm.step()
    for p in batch[1:]:
        llm.add_request(p, greedy(4))  # join while the first one decodes
    while llm.has_unfinished_requests():
        llm.step()
    assert all(0 < out.num_tokens <= 10 for out in seen)
    mixed = [out for out in seen if any(c.sample and len(c.token_ids) == 1 for c in out.chunks)
             and any(len(c.token_ids) > 1 for c in out.chunks)]
    assert mixed, "no step mixed a decode token with a prefill chunk"
    assert_pools_full(llm)


def test_prompt_chunks_longer_than_a_query_block_equal_short_ones(
        model: BambaLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention over the cache runs a chunk's queries in blocks (bounded masks): a chunk of
    many blocks gives the tokens and logprobs of chunks within one block."""
    import bamba.model

    batch = prompts((45, 30))
    want = LLM(model, memory_gb=0.001, block_size=4, max_num_batched_tokens=8,
               enable_prefix_caching=False).generate(batch, greedy(5, logprobs=1))
    monkeypatch.setattr(bamba.model, "QUERY_BLOCK", 4)
    got = LLM(model, memory_gb=0.001, block_size=4, enable_prefix_caching=False
              ).generate(batch, greedy(5, logprobs=1))
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor([t.logprob for t in g.outputs[0].logprobs]),
                                   torch.tensor([t.logprob for t in w.outputs[0].logprobs]),
                                   atol=1e-4, rtol=0)


def test_gather_buffers_are_freed_once_decoding_reads_in_place(model: BambaLM) -> None:
    """A prompt's gathered keys and values live in buffers kept between prefill steps; the
    first step that does not gather (native decode reads the pages in place) frees them, so a
    long prompt's buffers do not stay beside its KV cache while it decodes."""
    llm = LLM(model, memory_gb=0.001, block_size=4, enable_prefix_caching=False)
    llm.add_request(prompts((40,))[0], greedy(3))
    llm.step()
    assert llm.runner._scratch
    llm.step()
    if llm.runner._scratch_used:
        pytest.skip("this build's decode gathers keys too (no native decode kernels)")
    assert not llm.runner._scratch
    while llm.has_unfinished_requests():
        llm.step()
    assert_pools_full(llm)


def test_chunked_prefill_equals_one_shot(model: BambaLM) -> None:
    batch = prompts((37, 23, 50))
    results = []
    for budget in (3, 7, 4096):
        llm = LLM(model, memory_gb=0.001, block_size=4, max_num_batched_tokens=budget,
                  enable_prefix_caching=False)
        results.append(llm.generate(batch, greedy(6, logprobs=2)))
    for outs in results[:-1]:
        for got, want in zip(outs, results[-1], strict=True):
            assert got.outputs[0].token_ids == want.outputs[0].token_ids
            got_lp = torch.tensor([t.logprob for t in got.outputs[0].logprobs])
            want_lp = torch.tensor([t.logprob for t in want.outputs[0].logprobs])
            torch.testing.assert_close(got_lp, want_lp, atol=1e-4, rtol=0)


def test_logprobs_match_model(model: BambaLM) -> None:
    llm = LLM(model, memory_gb=0.001, block_size=4)
    prompt = prompts((11,))[0]
    out = llm.generate([prompt], greedy(4, logprobs=3))[0].outputs[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    for step, entry in enumerate(out.logprobs):
        row = logp[len(prompt) - 1 + step]
        assert entry.token_id == out.token_ids[step]
        assert abs(entry.logprob - float(row[entry.token_id])) < 1e-4
        assert list(entry.top) == row.topk(3).indices.tolist()


def test_prefix_cache_on_equals_off(model: BambaLM) -> None:
    system = prompts((26,), seed=5)[0]
    first = prompts((7, 12), seed=6, prefix=system)
    second = prompts((5, 9, 3), seed=7, prefix=system) + [first[0] + [17, 18]]
    off = LLM(model, memory_gb=0.001, block_size=4, max_num_batched_tokens=16,
              enable_prefix_caching=False)
    on = LLM(model, memory_gb=0.001, block_size=4, max_num_batched_tokens=16)
    for wave in (first, second):
        want = off.generate(wave, greedy(5, logprobs=1))
        got = on.generate(wave, greedy(5, logprobs=1))
        for g, w in zip(got, want, strict=True):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
                assert abs(a.logprob - b.logprob) < 1e-4
    stats = on.stats()
    assert stats.prefix_cache_hit_rate > 0.3  # the second wave reuses the system prompt
    assert stats.num_cached_slots > 0 and stats.num_cached_blocks > 0
    assert_pools_full(on)
    on.reset_prefix_cache()
    assert on.stats().num_cached_blocks == on.stats().num_cached_slots == 0


def test_resume_uses_snapshot_not_only_kv(model: BambaLM) -> None:
    """A prompt sharing cached KV blocks but no snapshot at that boundary must recompute from
    the last boundary that has a state (here: from the start)."""
    llm = LLM(model, memory_gb=0.001, block_size=4, max_num_batched_tokens=4096)
    base = prompts((16,), seed=8)[0]
    llm.generate([base], greedy(1))  # one chunk: a snapshot at 16 only, KV blocks 0..3 cached
    extended = base[:10] + [5, 6, 7, 8, 9, 10]
    out = llm.generate([extended], greedy(4))[0]
    assert out.outputs[0].token_ids == reference_greedy(model, extended, 4)
    assert llm.stats().prefix_cache_hit_rate == 0.0  # no boundary <= 10 had a snapshot


def test_shared_prefix_resumes_from_the_last_snapshot_interval(model: BambaLM) -> None:
    """States are saved every snapshot_interval tokens of a prompt, so a later prompt that
    shares 21 tokens resumes at 16 (the last mark before it diverges), not at 0."""
    llm = LLM(model, memory_gb=0.001, block_size=4, snapshot_interval=8,
              max_num_batched_tokens=4096)
    first = prompts((40,), seed=13)[0]
    llm.generate([first], greedy(2))
    second = first[:21] + prompts((9,), seed=14)[0]
    llm.prefix.reset_stats()
    out = llm.generate([second], greedy(5))[0]
    assert llm.prefix.hit_tokens == 16
    assert out.outputs[0].token_ids == reference_greedy(model, second, 5)
    with pytest.raises(ValueError, match="snapshot_interval"):
        LLM(model, memory_gb=0.001, snapshot_interval=0)


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_under_tiny_kv_budget(model: BambaLM, caching: bool) -> None:
    llm = LLM(model, memory_gb=64_000 / 1e9, block_size=4, max_num_batched_tokens=64,
              max_num_seqs=8, enable_prefix_caching=caching, snapshot_interval=8)
    assert llm.plan.num_blocks < 40
    batch = prompts((20, 25, 14, 30), seed=3)
    outs = llm.generate(batch, greedy(10))
    assert llm.stats().num_preemptions > 0
    for prompt, out in zip(batch, outs, strict=True):
        assert out.outputs[0].token_ids == reference_greedy(model, prompt, 10)
    assert_pools_full(llm)


def test_admission_waits_for_state_slots(model: BambaLM) -> None:
    llm = LLM(model, memory_gb=0.001, block_size=4, max_num_seqs=2)
    assert llm.plan.num_slots == 4  # 2 running + 2 for snapshots
    batch = prompts((9, 4, 13, 6, 8))
    for p in batch:
        llm.add_request(p, greedy(3))
    finished = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                finished[out.request_id] = out
        assert llm.stats().num_running <= 2
    assert len(finished) == 5
    assert_pools_full(llm)


def test_seeded_sampling_reproducible_across_batches(model: BambaLM) -> None:
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, seed=1234,
                            max_tokens=12, ignore_eos=True, repetition_penalty=1.1,
                            presence_penalty=0.2, frequency_penalty=0.1, n=2)
    target = prompts((13,), seed=9)[0]
    alone = LLM(model, memory_gb=0.001, block_size=4).generate([target], params)[0]
    crowd = LLM(model, memory_gb=0.001, block_size=4, max_num_batched_tokens=8)
    others = prompts((21, 4, 30), seed=10)
    mixed = crowd.generate(others[:1] + [target] + others[1:],
                           [SamplingParams(temperature=1.0, max_tokens=15, ignore_eos=True)]
                           + [params] + [SamplingParams(temperature=0.7, seed=5)] * 2)[1]
    assert [o.token_ids for o in mixed.outputs] == [o.token_ids for o in alone.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids  # n samples differ
    assert [o.index for o in alone.outputs] == [0, 1]


def test_abort_and_errors_return_every_page(model: BambaLM, monkeypatch) -> None:
    llm = LLM(model, memory_gb=0.001, block_size=4, max_num_batched_tokens=8)
    batch = prompts((30, 6, 12))
    ids = [llm.add_request(p, greedy(20)) for p in batch]
    llm.step()  # request 0 is mid-prefill
    assert llm.abort(ids[0]) and not llm.abort(ids[0])
    for _ in range(4):
        llm.step()  # request 1 and 2 decoding
    assert llm.abort(ids[1])
    assert llm.stats().num_running == 1

    calls = {"n": 0}
    original = llm.runner._forward

    def flaky(rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return original(rows)

    monkeypatch.setattr(llm.runner, "_forward", flaky)
    failed = [o for _ in range(3) for o in llm.step()]
    assert any(o.finished and o.outputs[0].finish_reason == "error" for o in failed)
    assert_pools_full(llm)
    # the engine keeps serving after a failed step
    prompt = prompts((7,), seed=11)[0]
    assert llm.generate([prompt], greedy(3))[0].outputs[0].token_ids == \
        reference_greedy(model, prompt, 3)
    assert_pools_full(llm)


def test_streaming_deltas_add_up(model: BambaLM) -> None:
    llm = LLM(model, memory_gb=0.001, block_size=4, max_num_batched_tokens=8)
    rid = llm.add_request(prompts((10,))[0], greedy(7))
    pieces: list[int] = []
    final = None
    while llm.has_unfinished_requests():
        for out in llm.step():
            assert out.request_id == rid
            pieces += out.outputs[0].new_token_ids
            final = out
    assert final is not None and final.finished
    assert pieces == final.outputs[0].token_ids and len(pieces) == 7


def test_eos_and_stop_token_ids(model: BambaLM) -> None:
    llm = LLM(model, memory_gb=0.001, block_size=4)
    prompt = prompts((8,), seed=12)[0]
    free = reference_greedy(model, prompt, 6)
    stop_at = free[3]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6,
                                                stop_token_ids=[stop_at]))[0].outputs[0]
    first = free.index(stop_at)
    assert out.token_ids == free[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_bf16_state_slots_are_smaller_and_run(model: BambaLM) -> None:
    f32 = LLM(model, memory_gb=0.001, block_size=4)
    bf16 = LLM(model, memory_gb=0.001, block_size=4, state_dtype="bfloat16")
    assert bf16.plan.slot_bytes < f32.plan.slot_bytes
    assert next(iter(bf16.runner.ssm.values())).dtype == torch.bfloat16
    out = bf16.generate([prompts((9,))[0]], greedy(4))[0]
    assert len(out.outputs[0].token_ids) == 4
    assert_pools_full(bf16)


def test_bad_requests_raise_value_error(model: BambaLM) -> None:
    llm = LLM(model, memory_gb=0.001, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="empty"):
        llm.add_request([], greedy(1))
    with pytest.raises(ValueError, match="token ids"):
        llm.add_request([5, 999], greedy(1))
    with pytest.raises(ValueError, match="context"):
        llm.add_request(list(range(3, 40)), greedy(1))
    with pytest.raises(ValueError, match="tokenizer"):
        llm.add_request("text without a tokenizer", greedy(1))
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate([[4, 5]], [greedy(1), greedy(1)])
    rid = llm.add_request([4, 5], greedy(1), request_id="x")
    with pytest.raises(ValueError, match="already"):
        llm.add_request([4, 5], greedy(1), request_id="x")
    llm.abort(rid)
    # max_tokens beyond the context is cut to the room left, finishing with "length"
    out = llm.generate([list(range(3, 30))], greedy(100))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    assert_pools_full(llm)


def test_llm_from_checkpoint_with_text_prompts_and_stop_strings(make_hf_checkpoint) -> None:
    directory = make_hf_checkpoint("hybrid")
    llm = LLM(str(directory), memory_gb=0.001, block_size=4, max_num_batched_tokens=8)
    prompt = "State space models keep"
    ids = llm.tokenizer.encode(prompt)
    out = llm.generate(prompt, greedy(12))[0]
    tokens = out.outputs[0].token_ids
    assert out.prompt == prompt and out.prompt_token_ids == ids
    assert tokens == reference_greedy(llm.model, ids, 12)
    text = out.outputs[0].text
    assert text == llm.tokenizer.decode(tokens)
    stop = text[3:6]
    assert stop.strip() and text.find(stop) == 3
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                stop=[stop]))[0].outputs[0]
    assert cut.text == text[:3] and cut.finish_reason == "stop" and cut.stop_reason == stop
    assert_pools_full(llm)


def test_dtype_cast_keeps_ssm_parameters_float32() -> None:
    llm = LLM(tiny_model(), dtype="bfloat16", memory_gb=0.001, block_size=4)
    assert llm.model.dtype == torch.bfloat16
    mixer = llm.model.model.layers[0].mamba
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == torch.float32
    assert next(iter(llm.runner.keys.values())).dtype == torch.bfloat16
    assert len(llm.generate([[5, 6, 7]], greedy(3))[0].outputs[0].token_ids) == 3
