"""Structured outputs (llguidance): a random tiny model's sampled text is held to a JSON schema,
a regex, a choice or a Lark grammar in the engine and through the OpenAI server (the official
client's ``response_format``, vLLM's ``structured_outputs``); greedy under a constraint is the
best allowed token of the plain forward's logits at every step; bad constraints are one-line
ParameterErrors / 400s, and rows without a constraint are untouched."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("llguidance")

from bamba.checkpoint import from_pretrained  # noqa: E402
from bamba.engine import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from bamba.engine.structured import mask_logits  # noqa: E402
from bamba.sampling import ParameterError  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "color", "tag"],
          "properties": {"ok": {"type": "boolean"},
                         "color": {"enum": ["red", "green", "blue"]},
                         "tag": {"type": "string", "pattern": "^[a-z]{1,4}$"}}}
PROMPT = "The hybrid model"


def _texts(tiny_llm: LLM, structured: StructuredOutputsParams, n: int = 6, **values) -> list[str]:
    params = SamplingParams(n=n, temperature=1.0, seed=3, max_tokens=120,
                            structured_outputs=structured, **values)
    (out,) = tiny_llm.generate(PROMPT, params)
    assert all(o.finish_reason == "stop" for o in out.outputs), \
        [(o.finish_reason, o.text) for o in out.outputs]
    return [o.text for o in out.outputs]


def _check_schema(value: dict) -> None:
    assert set(value) == {"ok", "color", "tag"}
    assert isinstance(value["ok"], bool) and value["color"] in ("red", "green", "blue")
    assert re.fullmatch("[a-z]{1,4}", value["tag"])


def test_sampled_text_follows_a_json_schema(tiny_llm):
    texts = _texts(tiny_llm, StructuredOutputsParams(json=SCHEMA))
    for text in texts:
        _check_schema(json.loads(text))
    assert len(set(texts)) > 1  # sampled, not one forced string
    assert _texts(tiny_llm, StructuredOutputsParams(json=json.dumps(SCHEMA)), n=1)  # schema as text


def test_regex_choice_grammar_and_json_object(tiny_llm):
    for text in _texts(tiny_llm, StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}")):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)
    choices = ["yes", "no", 'say "hi"\\ ü']
    assert set(_texts(tiny_llm, StructuredOutputsParams(choice=choices), n=12)) <= set(choices)
    for text in _texts(tiny_llm, StructuredOutputsParams(grammar='start: "(" ITEM ("," ITEM)* ")"\n'
                                                            'ITEM: /[ab]{1,3}/')):
        assert re.fullmatch(r"\([ab]{1,3}(,[ab]{1,3})*\)", text)

def test_json_object_output_is_an_object_or_a_prefix_of_one(tiny_llm):
    """Any object may go on for ever (a random model's keys do): an output cut by max_tokens is
    still a prefix the grammar accepts; one that stops is a whole object."""
    structured = StructuredOutputsParams(json_object=True)
    (out,) = tiny_llm.generate(PROMPT, SamplingParams(n=8, temperature=1.0, seed=1, max_tokens=40,
                                                 structured_outputs=structured,
                                                 repetition_penalty=1.3))
    reasons = {o.finish_reason for o in out.outputs}
    assert "stop" in reasons and reasons <= {"stop", "length"}
    for o in out.outputs:
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:
            fresh = SamplingParams(structured_outputs=structured)
            matcher = tiny_llm.compile_structured_outputs(fresh)
            assert matcher.consume_tokens(o.token_ids) and not matcher.is_stopped()


def test_greedy_takes_the_best_allowed_token_of_the_plain_forward(tiny_llm, tiny_checkpoint):
    from llguidance import LLMatcher

    structured = StructuredOutputsParams(json=SCHEMA)
    (out,) = tiny_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=120,
                                                 structured_outputs=structured))
    tokens = out.outputs[0].token_ids
    _check_schema(json.loads(out.outputs[0].text))
    model = from_pretrained(tiny_checkpoint)
    prompt = tiny_llm.tokenizer.encode(PROMPT)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1]
    matcher = tiny_llm.compile_structured_outputs(SamplingParams(structured_outputs=structured))
    assert isinstance(matcher, LLMatcher)
    for step, token in enumerate(tokens):
        allowed = mask_logits(logits[step:step + 1], [matcher])[0]
        assert torch.isfinite(allowed).sum() < logits.shape[1]  # the mask removes some
        assert token == int(allowed.argmax()), step
        assert matcher.consume_token(token)
    assert matcher.is_stopped() or tokens[-1] in tiny_llm._eos_ids()


def test_rows_without_a_constraint_are_untouched(tiny_llm):
    logits = torch.randn(3, tiny_llm.config.vocab_size)
    structured = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    matcher = tiny_llm.compile_structured_outputs(structured)
    masked = mask_logits(logits, [None, matcher, None])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = torch.isfinite(masked[1]).nonzero()[:, 0].tolist()
    digits = {tiny_llm.tokenizer.decode([t]) for t in allowed}
    assert digits and all(d.isdigit() for d in digits)
    assert mask_logits(logits, [None, None, None]) is logits


@pytest.mark.parametrize("kwargs, says", [
    ({}, "exactly one of"), ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ({"choice": []}, "non-empty list"), ({"choice": ["a", ""]}, "non-empty list"),
    ({"regex": 5}, "wrong type"), ({"json": [1]}, "wrong type"),
])
def test_a_malformed_constraint_is_refused_naming_the_field(kwargs, says):
    with pytest.raises(ParameterError, match=says) as info:
        StructuredOutputsParams(**kwargs)
    assert info.value.param == "structured_outputs"


@pytest.mark.parametrize("structured, says", [
    (StructuredOutputsParams(regex="[0-9]{3"), "unclosed counted repetition"),
    (StructuredOutputsParams(json={"type": "wat"}), "Invalid type"),
    (StructuredOutputsParams(json="{not json"), "structured_outputs: "),
    (StructuredOutputsParams(grammar="start: undefined_rule"), "structured_outputs: "),
])
def test_a_constraint_that_does_not_compile_is_one_line(tiny_llm, structured, says):
    with pytest.raises(ParameterError, match=says) as info:
        tiny_llm.generate(PROMPT, SamplingParams(structured_outputs=structured))
    assert "\n" not in str(info.value) and info.value.param == "structured_outputs"
    assert not tiny_llm.has_unfinished_requests()


# ---- the OpenAI server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[str]:
    pytest.importorskip("fastapi")
    from bamba.serve.app import build_app
    from bamba.serve.async_engine import AsyncEngine
    from serve_helpers import running

    engine = AsyncEngine(LLM(str(tiny_checkpoint), memory_gb=0.02, max_model_len=256)).start()
    try:
        with running(build_app(engine, "tiny")) as base:
            yield base
    finally:
        engine.shutdown()


def test_the_openai_client_gets_json_that_follows_its_schema(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none")
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Describe a color."}], n=4,
        temperature=1.0, seed=5, max_tokens=120,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}})
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        _check_schema(json.loads(choice.message.content))
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Any object."}], stream=True,
        max_tokens=120, response_format={"type": "json_object"})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert isinstance(json.loads(text), dict)
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20,
                                           extra_body={"structured_outputs":
                                                       {"choice": ["alpha", "beta"]}})
    assert completion.choices[0].text in ("alpha", "beta")


@pytest.mark.parametrize("body, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                 "schema": {"type": "wat"}}}},
     "Invalid type"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "[", "choice": ["a"]}}, "exactly one of"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "not both"),
])
def test_a_bad_constraint_is_a_400_and_the_server_keeps_serving(server, body, says):
    httpx = pytest.importorskip("httpx")
    r = httpx.post(f"{server}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]
    ok = httpx.post(f"{server}/v1/completions", timeout=60,
                    json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4})
    assert ok.status_code == 200


# ---- random constraints ----------------------------------------------------------------------
_WORDS = ["string", "object", "array", "integer", "number", "boolean", "null", "#/x", "^a$"]
_KEYS = ["type", "properties", "items", "enum", "const", "pattern", "$ref", "anyOf", "oneOf",
         "allOf", "minimum", "maximum", "minLength", "maxLength", "required",
         "additionalProperties", "format", "prefixItems", "$defs", "x"]
_PIECES = list("ab()[]{}|*+?.^$\\-:,\"'/ 09%x_=\n") + ["start", "rule", "%ignore", "%import",
                                                         "/[a-z]+/", "::=", "%llguidance"]


def _random_constraints():
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | \
        st.text(max_size=5) | st.sampled_from(_WORDS)
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(_KEYS), inner, max_size=4), max_leaves=12)
    texts = st.lists(st.sampled_from(_PIECES), max_size=20).map("".join)
    return st.one_of(values.map(lambda v: {"json": v}), texts.map(lambda t: {"json": t}),
                     texts.map(lambda t: {"regex": t}), texts.map(lambda t: {"grammar": t}),
                     st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3).map(
                         lambda c: {"choice": c}))


def _fuzz(tiny_llm: LLM, examples: int) -> None:
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_random_constraints())
    def one(fields: dict) -> None:
        try:
            structured = StructuredOutputsParams(**fields)
            (out,) = tiny_llm.generate(PROMPT, SamplingParams(n=2, temperature=1.0, seed=1,
                                                         max_tokens=12,
                                                         structured_outputs=structured))
            assert all(o.finish_reason in ("stop", "length") for o in out.outputs), fields
        except ParameterError as exc:
            assert "\n" not in str(exc), (fields, str(exc))
        assert not tiny_llm.has_unfinished_requests()

    one()


def test_a_random_constraint_runs_or_is_one_parameter_error(tiny_llm):
    """Schemas, regexes, grammars and choices at random: each compiles and generates (ending
    with stop or length), or is refused in one line; never another exception."""
    pytest.importorskip("hypothesis")
    _fuzz(tiny_llm, 400)


@pytest.mark.slow
def test_many_random_constraints(tiny_llm):
    pytest.importorskip("hypothesis")
    _fuzz(tiny_llm, 3000)


def test_a_compile_in_progress_never_holds_up_a_cached_constraint(tiny_llm, monkeypatch):
    """One thread compiling a new grammar (held mid-compile here) does not block another
    thread's request for a cached one: the engine's thread never waits on a stranger's
    compile."""
    import threading

    import llguidance

    cached = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[0-9]+"))
    tiny_llm.compile_structured_outputs(cached)
    entered, release = threading.Event(), threading.Event()
    real = llguidance.LLMatcher

    class Held:  # llguidance's matcher, its constructor held until released
        grammar_from_regex = staticmethod(real.grammar_from_regex)

        def __new__(cls, tokenizer, text, **kwargs):
            entered.set()
            release.wait(30)
            return real(tokenizer, text, **kwargs)

    monkeypatch.setattr(llguidance, "LLMatcher", Held)
    fresh = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[a-f]{2,9}"))
    compiling = threading.Thread(target=tiny_llm.compile_structured_outputs, args=(fresh,))
    compiling.start()
    try:
        assert entered.wait(30)
        assert tiny_llm.compile_structured_outputs(cached) is not None  # while it is held
        assert compiling.is_alive()
    finally:
        release.set()
        compiling.join(30)


def test_bamba_generate_holds_its_output_to_a_regex_or_schema(tiny_checkpoint, capsys, tmp_path):
    from bamba.cli import main

    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--threads", "1",
            "--max-new-tokens", "120", "--temperature", "1.0", "--seed", "4"]
    assert main(base + ["--regex", "[0-9]{3}-[a-z]{2}"]) == 0
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}\n", capsys.readouterr().out)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    for given in (str(schema_file), json.dumps(SCHEMA)):
        assert main(base + ["--json-schema", given]) == 0
        _check_schema(json.loads(capsys.readouterr().out))
    assert main(base + ["--regex", "a", "--json-schema", "{}"]) == 2
    assert "not both" in capsys.readouterr().err
