"""Prompt-lookup decoding gives the tokens plain decoding gives, whatever the drafts.

The n-gram proposer is tested on its own; the verification (one pass over pending tokens, the
last token and the drafts; Mamba states checkpointed and restored on a rejection) is tested with
an oracle proposer that knows the plain continuation and corrupts a chosen share of its drafts,
so every pattern of acceptance, rejection and pending tokens is reached on a random model.
"""

import random

import pytest
import torch

import bamba.generation
from bamba.checkpoint import from_pretrained
from bamba.cli import main
from bamba.config import BambaConfig
from bamba.generation import GenerationConfig, GenerationStream, generate
from bamba.model import BambaLM, init_weights
from bamba.sampling import (ParameterError, SamplingBatch, choose_against_draft, filtered_logits)
from bamba.speculative import MAX_PASS_TOKENS, PromptLookup, propose

VOCAB = 64
PROMPT = [5, 9, 2, 7, 5, 9, 2, 7, 5, 9, 2, 30, 31, 32, 5, 9]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(attn_layers=(1, 3), seed=0) -> BambaLM:
    config = BambaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         attn_layer_indices=list(attn_layers), mamba_n_heads=4, mamba_d_head=16,
                         mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8,
                         max_position_embeddings=128, initializer_range=0.3, eos_token_id=None)
    return init_weights(BambaLM(config), seed=seed).eval()


# ---- the proposer ------------------------------------------------------------------------------
def _propose(tokens, k=4, lo=1, hi=3, limit=100):
    return propose(torch.tensor(tokens), PromptLookup(k, lo, hi), limit)


def test_propose_copies_what_followed_the_latest_longest_match():
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 4, 9, 2, 3, 8, 7, 2, 3]
    assert _propose(tokens) == [8, 7, 2, 3]  # "2 3" last occurred at 5..6, followed by 8 7 2 3
    assert _propose(tokens, k=2) == [8, 7]
    assert _propose(tokens, limit=1) == [8]
    assert _propose(tokens, limit=0) == []
    # "9 2 3" (n = 3) beats the later "2 3" when the sequence ends with it
    assert _propose([9, 2, 3, 5, 6, 1, 2, 3, 7, 9, 2, 3]) == [5, 6, 1, 2]
    # a match may run into the end of the sequence: the draft is what remains of it
    assert _propose([4, 4, 4]) == [4]


def test_propose_respects_the_ngram_range_and_finds_nothing_new():
    assert _propose([1, 2, 3, 4]) == []  # no earlier occurrence of any suffix
    assert _propose([1, 2, 3, 3], lo=2) == []  # only a 1-gram ("3") matches
    assert _propose([1, 2, 3, 3], lo=1) == [3]
    assert _propose([5]) == []  # a single token has nothing before it
    assert _propose([7, 1, 2, 8, 1, 2], hi=1) == [8, 1, 2]  # n = 1: "2" at 2, then 8 1 2


@pytest.mark.parametrize("values, match", [
    (dict(prompt_lookup_tokens=-1), "prompt_lookup_tokens"),
    (dict(prompt_lookup_tokens=2, prompt_lookup_min=0), "prompt_lookup_min"),
    (dict(prompt_lookup_tokens=2, prompt_lookup_min=3, prompt_lookup_max=2), "must not exceed"),
    (dict(prompt_lookup_tokens=1.5), "prompt_lookup_tokens"),
    (dict(prompt_lookup_tokens=MAX_PASS_TOKENS), "at most 7"),
])
def test_bad_lookup_values_are_refused(values, match):
    with pytest.raises(ParameterError, match=match):
        GenerationConfig(**values)


# ---- one position against its draft -----------------------------------------------------------
def test_greedy_keeps_the_argmax_and_says_whether_it_was_the_draft():
    logits = torch.tensor([[0.1, 2.0, 0.5, -1.0]])
    batch = SamplingBatch.build(1, temperature=0.0)
    assert choose_against_draft(logits, batch, 1) == (1, True)
    assert choose_against_draft(logits, batch, 2) == (1, False)


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=3),
                                    dict(temperature=1.3, top_p=0.8, min_p=0.05)])
@pytest.mark.parametrize("draft", [0, 2, 5])
def test_sampling_against_a_draft_draws_the_target_distribution(params, draft):
    """Whatever the draft (likely, unlikely, filtered out), the token is distributed as the
    sampler's own distribution: accept with p(draft), else draw from the rest."""
    logits = torch.tensor([[1.0, 0.2, 2.0, -0.5, 0.7, -3.0]])
    batch = SamplingBatch.build(1, seeds=[11], **params)
    target = torch.softmax(filtered_logits(logits, batch), dim=-1)[0]
    draws = 20000
    counts = torch.zeros(6)
    agreed = 0
    for _ in range(draws):
        token, same = choose_against_draft(logits, batch, draft)
        counts[token] += 1
        agreed += same
        assert same == (token == draft)
    assert (counts / draws - target).abs().sum() / 2 < 0.015  # total variation
    assert abs(agreed / draws - float(target[draft])) < 0.015
    assert counts[target == 0].sum() == 0  # a filtered-out token is never drawn


# ---- whole continuations -----------------------------------------------------------------------
def _oracle(plain: list[int], prompt_len: int, wrong: float, seed: int):
    """A proposer that drafts the plain continuation, each draft token wrong with chance
    ``wrong`` (and then surely wrong)."""
    rng = random.Random(seed)

    def draft(sequence, lookup, limit):
        done = len(sequence) - prompt_len
        return _corrupt(plain[done:done + min(lookup.tokens, limit)], wrong, rng)
    return draft


def _oracles(runs: list[tuple[list[int], list[int]]], wrong: float, seed: int):
    """``_oracle`` for several sequences: ``runs`` holds (prompt, plain continuation) pairs,
    a sequence's found by its prompt."""
    rng = random.Random(seed)

    def draft(sequence, lookup, limit):
        tokens = sequence.tolist()
        prompt, plain = next((p, c) for p, c in runs if tokens[:len(p)] == p)
        done = len(tokens) - len(prompt)
        return _corrupt(plain[done:done + min(lookup.tokens, limit)], wrong, rng)
    return draft


def _corrupt(right: list[int], wrong: float, rng: random.Random) -> list[int]:
    return [t if rng.random() >= wrong else (t + 1 + rng.randrange(VOCAB - 1)) % VOCAB
            for t in right]


@pytest.fixture(params=["rows", "forward"])
def verify_path(request, monkeypatch):
    """How a pass runs: its tokens as rows of one native step on the sequence's state (when
    they fit), or one forward pass over them (the fallback: no native step, or too many)."""
    if request.param == "forward":
        monkeypatch.setattr(bamba.generation, "decode_rows", lambda model: 0)
    return request.param


@pytest.mark.parametrize("attn_layers", [(1, 3), (), (0, 1, 2, 3)],
                         ids=["hybrid", "all-mamba", "all-attention"])
@pytest.mark.parametrize("wrong", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("k", [1, 4])
def test_any_drafts_give_the_plain_greedy_tokens(attn_layers, wrong, k, verify_path,
                                                 monkeypatch):
    model = _model(attn_layers)
    plain = generate(model, [PROMPT], GenerationConfig(max_new_tokens=40))[0]
    monkeypatch.setattr(bamba.generation, "propose",
                        _oracle(plain.token_ids, len(PROMPT), wrong, seed=k))
    (spec,) = generate(model, [PROMPT], GenerationConfig(max_new_tokens=40,
                                                         prompt_lookup_tokens=k))
    assert spec.token_ids == plain.token_ids
    assert spec.finish_reason == "length"
    assert spec.draft_tokens > 0
    if wrong == 0.0:  # all taken: each pass decides the drafts and one more token
        assert spec.accepted_draft_tokens == spec.draft_tokens
    if wrong == 1.0:  # none taken: pending tokens pile up to a full pass, then are flushed
        assert spec.accepted_draft_tokens == 0 and 39 > MAX_PASS_TOKENS


@pytest.mark.parametrize("values", [
    dict(repetition_penalty=1.6, presence_penalty=0.5, frequency_penalty=0.3),
    dict(min_tokens=10, logit_bias={3: 4.0, 7: -100.0}),
    dict(allowed_token_ids=list(range(0, VOCAB, 3))),
])
def test_token_rules_and_penalties_see_each_accepted_token(values, verify_path, monkeypatch):
    """Each position is judged with the penalties and rules of the tokens accepted before it
    in the same pass, as plain decoding judges it."""
    model = _model()
    config = dict(max_new_tokens=30, eos_token_ids=[2], **values)
    plain = generate(model, [PROMPT], GenerationConfig(**config))[0]
    monkeypatch.setattr(bamba.generation, "propose",
                        _oracle(plain.token_ids, len(PROMPT), 0.25, seed=3))
    (spec,) = generate(model, [PROMPT], GenerationConfig(**config, prompt_lookup_tokens=3))
    assert spec.token_ids == plain.token_ids
    assert spec.finish_reason == plain.finish_reason


def test_a_stop_token_inside_the_drafts_ends_there(monkeypatch):
    model = _model()
    plain = generate(model, [PROMPT], GenerationConfig(max_new_tokens=40))[0].token_ids
    stop = plain[17]
    want = plain[:plain.index(stop) + 1]
    monkeypatch.setattr(bamba.generation, "propose", _oracle(plain, len(PROMPT), 0.0, seed=0))
    (spec,) = generate(model, [PROMPT], GenerationConfig(max_new_tokens=40, eos_token_ids=[stop],
                                                         prompt_lookup_tokens=5))
    assert spec.token_ids == want and spec.finish_reason == "stop"


def test_real_lookup_on_a_repetitive_prompt_and_batches():
    """The n-gram proposer itself; a batch of prompts decodes plainly until one row is left."""
    model = _model((0, 1, 2, 3))
    prompts = [PROMPT, PROMPT[:9], [3, 4]]
    plain = generate(model, prompts, GenerationConfig(max_new_tokens=40))
    spec = generate(model, prompts, GenerationConfig(max_new_tokens=40, prompt_lookup_tokens=3))
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    (alone,) = generate(model, [PROMPT], GenerationConfig(max_new_tokens=40,
                                                          prompt_lookup_tokens=3))
    assert alone.token_ids == plain[0].token_ids
    assert alone.accepted_draft_tokens > 0  # this model repeats itself: drafts are taken


def test_seeded_sampling_with_lookup_is_reproducible(monkeypatch):
    model = _model()
    plain = generate(model, [PROMPT], GenerationConfig(max_new_tokens=30))[0].token_ids
    config = GenerationConfig(max_new_tokens=30, temperature=0.8, top_k=8, seed=4,
                              prompt_lookup_tokens=4)
    runs = []
    for _ in range(2):  # the same drafts each time (as the n-gram proposer's would be)
        monkeypatch.setattr(bamba.generation, "propose",
                            _oracle(plain, len(PROMPT), 0.2, seed=1))
        runs.append(generate(model, [PROMPT], config)[0])
    first, again = runs
    assert first.token_ids == again.token_ids and len(first.token_ids) == 30
    assert first.draft_tokens > 0


def test_a_stream_finished_early_keeps_only_the_tokens_it_yielded(monkeypatch):
    model = _model()
    plain = generate(model, [PROMPT], GenerationConfig(max_new_tokens=20))[0].token_ids
    monkeypatch.setattr(bamba.generation, "propose", _oracle(plain, len(PROMPT), 0.0, seed=0))
    stream = GenerationStream(model, PROMPT, GenerationConfig(max_new_tokens=20,
                                                              prompt_lookup_tokens=6))
    taken = []
    for token in stream:
        taken.append(token)
        if len(taken) == 3:  # mid-pass: the first pass decided 1 + 6 tokens after the prefill
            stream.finish("stop")
    assert taken == plain[:3] and stream.result.token_ids == taken
    assert stream.result.finish_reason == "stop"


def test_structured_outputs_with_lookup(tiny_checkpoint, monkeypatch):
    from bamba.engine import StructuredOutputsParams
    from bamba.tokenizer import load_tokenizer

    model = from_pretrained(tiny_checkpoint)
    tokenizer = load_tokenizer(tiny_checkpoint)
    prompt = tokenizer.encode("Numbers 0123456789, numbers")
    config = dict(max_new_tokens=16, structured_outputs=StructuredOutputsParams(
        regex=r"[0-9]{3}(, [0-9]{3})*"))
    plain = generate(model, [prompt], GenerationConfig(**config), tokenizer=tokenizer)[0]
    monkeypatch.setattr(bamba.generation, "propose",
                        _oracle(plain.token_ids, len(prompt), 0.3, seed=2))
    (spec,) = generate(model, [prompt], GenerationConfig(**config, prompt_lookup_tokens=3),
                       tokenizer=tokenizer)
    assert spec.token_ids == plain.token_ids and spec.draft_tokens > 0


def test_cli_prompt_lookup_prints_the_same_text(tiny_checkpoint, capsys):
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "the hybrid the hybrid the",
            "--max-new-tokens", "24", "--dtype", "float32", "--threads", "1"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--prompt-lookup", "3"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*argv, "--prompt-lookup", "2", "--prompt-lookup-min", "4"]) == 2
    assert "must not exceed" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [2, 5, MAX_PASS_TOKENS])
def test_a_pass_as_rows_is_one_token_steps_bit_for_bit(dtype, length):
    """Up to MAX_PASS_TOKENS tokens, a pass as rows of one native step gives each token what
    a one-token decode step from the same state gives, and leaves the same states: bit for
    bit in bfloat16 (the few-row kernels sum a row alike at 1 to 8 rows), within float32's
    rounding in float32."""
    from bamba.cache import ContiguousCache
    from bamba.generation import sequence_pass
    from bamba.native import accelerate

    model = accelerate(_model().to(dtype))
    tokens = [3, 17, 40, 5, 9, 60, 22, 8][:length]
    with torch.inference_mode():
        cache = ContiguousCache(model.config, 2, 64, dtype)
        model(torch.tensor([PROMPT]), cache=cache.bind([1]), logits_to_keep=1)
        cache.checkpoint_states(1)
        rows = sequence_pass(model, cache, 1, tokens, len(PROMPT), length)
        after_rows = [t[1].clone() for t in (*cache.conv.values(), *cache.ssm.values())]
        cache.restore_states(1)
        steps = torch.stack([sequence_pass(model, cache, 1, [t], len(PROMPT) + i, 1)[0]
                             for i, t in enumerate(tokens)])
        after_steps = [t[1] for t in (*cache.conv.values(), *cache.ssm.values())]
    same = torch.equal if dtype == torch.bfloat16 else \
        (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5))
    assert same(rows, steps)
    assert all(same(a, b) for a, b in zip(after_rows, after_steps, strict=True))


def test_bfloat16_greedy_with_drafts_is_plain_greedy(monkeypatch):
    model = _model().to(torch.bfloat16)
    plain = generate(model, [PROMPT], GenerationConfig(max_new_tokens=40))[0].token_ids
    monkeypatch.setattr(bamba.generation, "propose", _oracle(plain, len(PROMPT), 0.3, seed=5))
    (spec,) = generate(model, [PROMPT], GenerationConfig(max_new_tokens=40,
                                                         prompt_lookup_tokens=7))
    assert spec.token_ids == plain and spec.accepted_draft_tokens > 0


# ---- the engine ---------------------------------------------------------------------------------
def _engine(model, lookup: int | None = None, **kwargs):
    from bamba.engine import LLM

    config = None if lookup is None else {"method": "ngram", "num_speculative_tokens": lookup}
    return LLM(model, memory_gb=0.02, max_model_len=128, speculative_config=config, **kwargs)


def _engine_tokens(llm, prompt, **params):
    from bamba.engine import SamplingParams

    out = llm.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True, **params))
    return out[0].outputs[0]


@pytest.mark.parametrize("attn_layers", [(1, 3), (0, 1, 2, 3)], ids=["hybrid", "all-attention"])
@pytest.mark.parametrize("wrong", [0.0, 0.3, 1.0])
def test_engine_with_any_drafts_gives_its_plain_greedy_tokens(attn_layers, wrong, monkeypatch):
    import bamba.engine.lookup

    model = _model(attn_layers).to(torch.bfloat16)
    reference = _engine(model)
    plain = _engine_tokens(reference, PROMPT, temperature=0).token_ids
    monkeypatch.setattr(bamba.engine.lookup, "propose", _oracle(plain, len(PROMPT), wrong, 7))
    llm = _engine(model, lookup=4)
    assert _engine_tokens(llm, PROMPT, temperature=0).token_ids == plain
    stats = llm.stats()
    assert stats.num_draft_tokens > 0
    assert (stats.num_accepted_draft_tokens == stats.num_draft_tokens) == (wrong == 0.0)
    # the prefix cache holds the blocks plain decoding would: a later prompt sharing this
    # one's start and continuation runs as on the engine that never drafted
    later = PROMPT + plain[:20] + [3, 4]
    monkeypatch.setattr(bamba.engine.lookup, "propose", lambda tokens, lookup, limit: [])
    assert _engine_tokens(llm, later, temperature=0).token_ids == \
        _engine_tokens(reference, later, temperature=0).token_ids
    assert llm.stats().prefix_cache_hit_rate > 0


def test_engine_lookup_keeps_stop_strings_logprobs_and_rules(monkeypatch):
    import bamba.engine.lookup

    model = _model().to(torch.bfloat16)
    params = dict(temperature=0, logprobs=2, repetition_penalty=1.3, min_tokens=5,
                  logit_bias={7: 3.0})
    want = _engine_tokens(_engine(model), PROMPT, **params)
    monkeypatch.setattr(bamba.engine.lookup, "propose",
                        _oracle(want.token_ids, len(PROMPT), 0.3, 2))
    got = _engine_tokens(_engine(model, lookup=3), PROMPT, **params)
    assert got.token_ids == want.token_ids
    assert [lp.logprob for lp in got.logprobs] == [lp.logprob for lp in want.logprobs]


def test_engine_lookup_with_sampling_and_beside_other_requests():
    """Seeded sampling with drafts is reproducible; two requests at once decode plainly."""
    from bamba.engine import SamplingParams

    model = _model((0, 1, 2, 3)).to(torch.bfloat16)
    llm = _engine(model, lookup=3)
    params = SamplingParams(max_tokens=30, temperature=0.9, top_k=6, seed=3)
    first = llm.generate([PROMPT], params)[0].outputs[0].token_ids
    assert llm.generate([PROMPT], params)[0].outputs[0].token_ids == first
    drafted = llm.stats().num_draft_tokens
    both = llm.generate([PROMPT, PROMPT[:7]], SamplingParams(max_tokens=12, temperature=0))
    plain = _engine(model).generate([PROMPT, PROMPT[:7]], SamplingParams(max_tokens=12,
                                                                         temperature=0))
    assert [o.outputs[0].token_ids for o in both] == [o.outputs[0].token_ids for o in plain]
    assert llm.stats().num_draft_tokens >= drafted


PROMPTS = [PROMPT, [40, 41, 42, 40, 41, 42, 40], [60, 3, 3, 3, 61, 3, 3, 3, 61, 3]]


def _drafting_per_pass(llm) -> list[int]:
    """Spy on the engine's passes with drafts: how many sequences drafted in each."""
    counts, verify = [], llm.runner.verify_rows

    def spy(chunks, keep):
        counts.append(sum(k > 1 for k in keep))
        return verify(chunks, keep)
    llm.runner.verify_rows = spy
    return counts


@pytest.mark.parametrize("attn_layers", [(1, 3), (0, 1, 2, 3)], ids=["hybrid", "all-attention"])
@pytest.mark.parametrize("wrong", [0.0, 0.3, 1.0])
def test_engine_drafts_for_several_sequences_and_gives_their_plain_greedy_tokens(
        attn_layers, wrong, monkeypatch):
    """Three requests at once, each drafting in the same pass: every one gets the plain
    engine's greedy tokens (one stops early, at its own max_tokens)."""
    import bamba.engine.lookup
    from bamba.engine import SamplingParams

    model = _model(attn_layers).to(torch.bfloat16)
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0) for n in (30, 9, 30)]
    plain = [o.outputs[0].token_ids for o in _engine(model).generate(PROMPTS, params)]
    monkeypatch.setattr(bamba.engine.lookup, "propose",
                        _oracles(list(zip(PROMPTS, plain)), wrong, 11))
    llm = _engine(model, lookup=3)
    drafting = _drafting_per_pass(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == plain
    assert max(drafting) == 3 and llm.stats().num_draft_tokens > 0
    assert (llm.stats().num_accepted_draft_tokens > 0) == (wrong < 1.0)


def test_the_pass_shares_its_rows_and_drafts_only_where_a_spare_slot_is(monkeypatch):
    """Pending tokens take their rows first; what is left goes to the sequences in order, each
    at most an even share (rounded up) of what the earlier ones left. Without a free slot for
    its pass a sequence decodes plainly beside the drafting one."""
    import bamba.engine.lookup
    from bamba.engine import SamplingParams

    limits: list[int] = []

    def wrong_drafts(sequence, lookup, limit):
        limits.append(limit)
        return [(int(sequence[-1]) + 1) % VOCAB] * limit
    monkeypatch.setattr(bamba.engine.lookup, "propose", wrong_drafts)
    model = _model().to(torch.bfloat16)
    llm = _engine(model, lookup=7)
    llm.generate(PROMPTS, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0))
    assert limits[:3] == [2, 2, 1]  # 8 rows, 3 pending: 5 / 3 up, then 3 / 2 up, then 1
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)
    two = dict(max_num_seqs=2, enable_prefix_caching=False)  # 2 slots running, 2 for passes
    plain = [o.outputs[0].token_ids for o in _engine(model, **two).generate(PROMPTS[:2], params)]
    monkeypatch.setattr(bamba.engine.lookup, "propose",
                        _oracles(list(zip(PROMPTS, plain)), 0.2, 3))
    llm = _engine(model, lookup=3, **two)
    assert llm.plan.num_slots == 4
    held = llm.slots.allocate(1)  # as if another holder kept one of the two
    drafting = _drafting_per_pass(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params)] == plain
    assert drafting and max(drafting) == 1
    llm.slots.release(held)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params)] == plain
    assert max(drafting) == 2


@pytest.mark.parametrize("config, says", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "only 'ngram'"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 9}, "at most 7"),
    ({"num_speculative_tokens": 2, "draft_model": "x"}, "unknown field"),
    ([1], "must be a mapping"),
])
def test_bad_speculative_configs_are_refused(config, says):
    from bamba.engine.lookup import lookup_from_config

    with pytest.raises(ValueError, match=says):
        lookup_from_config(config)


def test_serve_and_chat_refuse_a_bad_speculative_config_in_one_line(tiny_checkpoint, capsys):
    for verb in ("serve", "chat"):
        assert main([verb, str(tiny_checkpoint), "--speculative-config", '{"method": "x"}']
                    if verb == "chat" else
                    [verb, str(tiny_checkpoint), "--speculative-config", "[1]"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--speculative-config" in err


def test_a_server_with_lookup_answers_as_without_and_counts_drafts(tiny_checkpoint, monkeypatch):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import bamba.engine.lookup
    from bamba.engine import LLM
    from bamba.serve.app import build_app
    from bamba.serve.async_engine import AsyncEngine
    from serve_helpers import running

    monkeypatch.setattr(bamba.engine.lookup, "propose",
                        lambda tokens, lookup, limit: tokens[-min(limit, 3):].tolist())
    body = {"model": "tiny", "prompt": "the hybrid the hybrid", "max_tokens": 24,
            "temperature": 0}
    texts, metrics = [], ""
    for config in (None, {"method": "ngram", "num_speculative_tokens": 3}):
        engine = AsyncEngine(LLM(str(tiny_checkpoint), memory_gb=0.02, max_model_len=256,
                                 speculative_config=config)).start()
        try:
            with running(build_app(engine, "tiny")) as base:
                reply = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
                assert reply.status_code == 200
                texts.append(reply.json()["choices"][0]["text"])
                metrics = httpx.get(f"{base}/metrics", timeout=60).text
        finally:
            engine.shutdown()
    assert texts[0] == texts[1]
    drafted = [line for line in metrics.splitlines()
               if line.startswith("bamba_spec_decode_draft_tokens_total ")]
    assert drafted and float(drafted[0].split()[1]) > 0


def test_engine_plans_a_spare_slot_for_the_checkpoint(monkeypatch):
    """One sequence and no prefix cache leave no free slot unless the plan adds one: without
    it the engine would never draft (the first benchmark of the engine path showed that)."""
    import bamba.engine.lookup

    model = _model().to(torch.bfloat16)
    lone = dict(max_num_seqs=1, enable_prefix_caching=False)
    plain = _engine_tokens(_engine(model, **lone), PROMPT, temperature=0).token_ids
    monkeypatch.setattr(bamba.engine.lookup, "propose", _oracle(plain, len(PROMPT), 0.2, 4))
    llm = _engine(model, lookup=4, **lone)
    assert llm.plan.num_slots == 2
    assert _engine_tokens(llm, PROMPT, temperature=0).token_ids == plain
    assert llm.stats().num_accepted_draft_tokens > 0


def test_the_engine_histories_grow_in_place_and_follow_the_sequences():
    from bamba.engine.lookup import Histories
    from bamba.engine.scheduler import Sequence

    histories = Histories()
    one = Sequence(seq_id=1, token_ids=[5, 6, 7], num_prompt_tokens=3)
    two = Sequence(seq_id=2, token_ids=[9], num_prompt_tokens=1)
    assert [t.tolist() for t in histories.of([one, two])] == [[5, 6, 7], [9]]
    one.token_ids += list(range(300))
    (grown,) = histories.of([one])
    assert grown.tolist() == [5, 6, 7, *range(300)]
    assert list(histories._of) == [1]  # the sequence no longer running is forgotten
