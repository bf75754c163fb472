"""A request's rules over tokens, as OpenAI and vLLM define them: ``logit_bias`` ({token id:
bias in [-100, 100]}) is added to a row's logits before penalties, temperature and masks;
``allowed_token_ids`` keeps a row to those tokens; ``min_tokens`` holds EOS, stop tokens and
stop strings off until the output is that long. Greedy then takes the best remaining token of
the plain forward; other rows are untouched; bad values are one-line ParameterErrors / 400s."""

from __future__ import annotations

import pytest
import torch

from bamba.checkpoint import from_pretrained
from bamba.engine import LLM, SamplingParams
from bamba.sampling import ParameterError, apply_logit_bias, check_logit_bias

PROMPT = [5, 9, 12, 30, 7, 41]


def test_bias_is_added_to_its_rows_only():
    logits = torch.randn(3, 10)
    out = apply_logit_bias(logits, [{2: 1.5, 7: -100.0}, None, {2: -0.5}])
    expected = logits.clone()
    expected[0, 2] += 1.5
    expected[0, 7] -= 100.0
    expected[2, 2] -= 0.5
    assert torch.equal(out, expected)
    assert apply_logit_bias(logits, [None, {}, None]) is logits


@pytest.mark.parametrize("bias, says", [
    ({"x": 1}, "token id"), ({"-1": 1}, "token id"), ({"5": 100.5}, r"logit_bias\[5\]"),
    ({"5": float("nan")}, r"logit_bias\[5\]"), ({"5": True}, r"logit_bias\[5\]"),
    ([5], "must map token ids"),
])
def test_a_bad_bias_names_what_is_wrong(bias, says):
    with pytest.raises(ParameterError, match=says):
        check_logit_bias(bias)
    assert check_logit_bias({"5": 1, 6: -100}) == {5: 1.0, 6: -100.0}


def test_greedy_takes_the_best_biased_token_of_the_plain_forward(tiny_llm, tiny_checkpoint):
    model = from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        first = model(torch.tensor([PROMPT]))[0, -1]
    best, second = first.topk(2).indices.tolist()

    def greedy(bias, max_tokens=1):
        (out,) = tiny_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                     logit_bias=bias, ignore_eos=True))
        return out.outputs[0].token_ids

    assert greedy(None) == [best]
    assert greedy({best: -100}) == [second]  # banned: the next best
    weakest = int(first.argmin())
    assert greedy({str(weakest): 100}, max_tokens=5) == [weakest] * 5  # forced at every step
    sampled = tiny_llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=3, max_tokens=5,
                                                  logit_bias={weakest: 100}, ignore_eos=True))
    assert sampled[0].outputs[0].token_ids == [weakest] * 5


def test_a_token_outside_the_vocabulary_is_refused(tiny_llm):
    with pytest.raises(ParameterError, match="outside the vocabulary"):
        tiny_llm.generate(PROMPT, SamplingParams(logit_bias={tiny_llm.config.vocab_size: 1}))
    assert not tiny_llm.has_unfinished_requests()


def test_the_openai_client_sends_it(tiny_checkpoint):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from bamba.serve.app import build_app
    from bamba.serve.async_engine import AsyncEngine
    from serve_helpers import running

    engine = AsyncEngine(LLM(str(tiny_checkpoint), memory_gb=0.02, max_model_len=64)).start()
    try:
        with running(build_app(engine, "tiny")) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
            token = engine.llm.tokenizer.encode("x")[0]
            reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4,
                                              temperature=0, logit_bias={str(token): 100})
            assert reply.choices[0].text == engine.llm.tokenizer.decode([token] * 4)
            reply = client.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=4, temperature=1.0, seed=1,
                extra_body={"allowed_token_ids": [token], "min_tokens": 4})
            assert reply.choices[0].text == engine.llm.tokenizer.decode([token] * 4)
    finally:
        engine.shutdown()


def _first_logits(checkpoint):
    model = from_pretrained(checkpoint)
    with torch.no_grad():
        return model(torch.tensor([PROMPT]))[0, -1]


def test_allowed_token_ids_keep_every_token_in_the_set(tiny_llm, tiny_checkpoint):
    first = _first_logits(tiny_checkpoint)
    allowed = [7, 40, 41, 99, 150]
    best = max(allowed, key=lambda t: float(first[t]))
    (out,) = tiny_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1,
                                                      allowed_token_ids=allowed))
    assert out.outputs[0].token_ids == [best]
    (out,) = tiny_llm.generate(PROMPT, SamplingParams(n=4, temperature=1.0, seed=5,
                                                      max_tokens=6, ignore_eos=True,
                                                      allowed_token_ids=allowed))
    assert all(set(o.token_ids) <= set(allowed) for o in out.outputs)


def test_min_tokens_holds_off_stop_tokens_and_strings(tiny_llm, tiny_checkpoint):
    best, second = _first_logits(tiny_checkpoint).topk(2).indices.tolist()

    def run(**values):
        (out,) = tiny_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6,
                                                          **values))
        return out.outputs[0]

    stopped = run(stop_token_ids=[best])
    assert stopped.token_ids == [best] and stopped.finish_reason == "stop"
    held = run(stop_token_ids=[best], min_tokens=3)
    assert held.token_ids[0] == second and len(held.token_ids) >= 3
    assert best not in held.token_ids[:3]
    text = run().text
    assert text  # the greedy reply's first character as a stop string:
    cut = run(stop=[text[0]])
    assert cut.finish_reason == "stop" and cut.text == ""
    assert len(run(stop=[text[0]], min_tokens=4).token_ids) >= 4


@pytest.mark.parametrize("values, says", [
    ({"min_tokens": 5, "max_tokens": 3}, "must not exceed max_tokens"),
    ({"min_tokens": -1}, "min_tokens"), ({"allowed_token_ids": []}, "non-empty list"),
    ({"allowed_token_ids": [1, -2]}, "allowed_token_ids entry"),
])
def test_bad_token_rules_name_the_field(values, says):
    with pytest.raises(ParameterError, match=says):
        SamplingParams(**values)


def test_allowed_ids_outside_the_vocabulary_are_refused(tiny_llm):
    with pytest.raises(ParameterError, match="allowed_token_ids: token id"):
        tiny_llm.generate(PROMPT, SamplingParams(allowed_token_ids=[tiny_llm.config.vocab_size]))
    (out,) = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=2, min_tokens=1,
                                                      stop_token_ids=[2**31 - 1]))
    assert out.outputs[0].finish_reason == "length"  # a stop id past the vocabulary is harmless


@pytest.mark.parametrize("rule", [
    {"logit_bias": {7: 5.0, 40: -100.0}}, {"allowed_token_ids": [7, 40, 41, 99, 150]},
    {"min_tokens": 4, "stop_token_ids": None}, {"structured": r"[0-9]{2,5}-[a-c]+"},
])
def test_plain_generate_follows_the_engine(rule, tiny_llm, tiny_checkpoint):
    """``bamba.generate`` (the contiguous reference path) takes the same token rules and gives
    the engine's greedy tokens."""
    from bamba.engine import StructuredOutputsParams
    from bamba.generation import GenerationConfig, generate

    model = from_pretrained(tiny_checkpoint)
    values = {k: v for k, v in rule.items() if k not in ("structured", "stop_token_ids")}
    if "structured" in rule:
        values["structured_outputs"] = StructuredOutputsParams(regex=rule["structured"])
    stops = []
    if "stop_token_ids" in rule:  # the greedy first token as a stop token: min_tokens holds it
        stops = [int(_first_logits(tiny_checkpoint).argmax())]
    (out,) = tiny_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12,
                                                      stop_token_ids=stops, **values))
    eos = sorted({*tiny_llm._eos_ids(), *stops})
    (ours,) = generate(model, [PROMPT], GenerationConfig(max_new_tokens=12, eos_token_ids=eos,
                                                         **values),
                       tokenizer=tiny_llm.tokenizer)
    assert ours.token_ids == out.outputs[0].token_ids
    assert ours.finish_reason == out.outputs[0].finish_reason


def test_plain_generate_needs_the_tokenizer_for_a_grammar(tiny_checkpoint):
    from bamba.engine import StructuredOutputsParams
    from bamba.generation import GenerationConfig, generate

    config = GenerationConfig(structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    with pytest.raises(ParameterError, match="needs the tokenizer"):
        generate(from_pretrained(tiny_checkpoint), [PROMPT], config)
