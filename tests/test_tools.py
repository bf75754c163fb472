"""Tool calling on /v1/chat/completions through the official ``openai`` client: tool_choice
"required" and a named function hold a random tiny model's reply to the tools' schemas (so
every call parses and fits), "auto" reads hermes ``<tool_call>`` blocks with the parser
enabled and is a 400 without it; streamed replies carry their calls whole; the tools and
earlier calls reach the chat template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llguidance")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from bamba.engine import LLM  # noqa: E402
from bamba.sampling import ParameterError  # noqa: E402
from bamba.serve.app import build_app  # noqa: E402
from bamba.serve.async_engine import AsyncEngine  # noqa: E402
from bamba.serve.chat import render_chat  # noqa: E402
from bamba.serve.protocol import ChatRequest  # noqa: E402
from bamba.serve.tools import (AutoToolStream, ToolMode, granite_calls,  # noqa: E402
                               hermes_calls, llama3_json_calls, required_calls_schema)
from serve_helpers import running  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"enum": ["Paris", "Rome"]}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["a", "b"],
        "properties": {"a": {"enum": [1, 2, 3]}, "b": {"type": "boolean"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_call(call, names=("get_weather", "add")) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert arguments in ({"city": "Paris"}, {"city": "Rome"})
    else:
        assert arguments["a"] in (1, 2, 3) and isinstance(arguments["b"], bool)
    return arguments


@pytest.fixture(scope="module")
def servers(tiny_checkpoint: Path) -> Iterator[tuple[str, str, str, str]]:
    """Base URLs with the hermes parser, without a parser, with the granite and the
    llama3_json parsers; one engine."""
    engine = AsyncEngine(LLM(str(tiny_checkpoint), memory_gb=0.02, max_model_len=256)).start()
    try:
        with running(build_app(engine, "tiny", tool_call_parser="hermes")) as parsed, \
                running(build_app(engine, "tiny")) as plain, \
                running(build_app(engine, "tiny", tool_call_parser="granite")) as granite, \
                running(build_app(engine, "tiny", tool_call_parser="llama3_json")) as llama:
            yield parsed, plain, granite, llama
    finally:
        engine.shutdown()


def _client(base: str):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none")


def test_required_and_named_calls_fit_their_tools(servers):
    client = _client(servers[1])  # no parser needed for these
    reply = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER, ADD], tool_choice="required", n=4,
        temperature=1.0, seed=2, max_tokens=60, parallel_tool_calls=False)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        _check_call(call)
    reply = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER, ADD], max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "add"}})
    (call,) = reply.choices[0].message.tool_calls
    _check_call(call, names=("add",))
    assert reply.choices[0].finish_reason == "tool_calls"


def test_streamed_calls_arrive_whole(servers):
    stream = _client(servers[1]).chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required", stream=True,
        max_tokens=60, stream_options={"include_usage": True}, parallel_tool_calls=False)
    chunks = list(stream)
    calls = [c for chunk in chunks if chunk.choices
             for c in chunk.choices[0].delta.tool_calls or []]
    assert calls and all(c.index == i for i, c in enumerate(calls))
    for call in calls:
        _check_call(call, names=("get_weather",))
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0


def test_auto_reads_hermes_blocks_and_needs_the_parser(servers):
    forced = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    reply = _client(servers[0]).chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], max_tokens=150,
        extra_body={"structured_outputs": {"choice": [forced]}})  # the model "chooses" a call
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert _check_call(choice.message.tool_calls[0]) == {"city": "Rome"}
    text = _client(servers[0]).chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], max_tokens=5, tool_choice="none")
    assert text.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError, match="tool-call-parser"):
        _client(servers[1]).chat.completions.create(model="tiny", messages=ASK,
                                                    tools=[WEATHER], max_tokens=5)


def test_auto_streams_text_as_it_comes_and_calls_whole(servers):
    client = _client(servers[0])
    forced = ('Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
              '</tool_call>')
    chunks = list(client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], max_tokens=150, stream=True,
        extra_body={"structured_outputs": {"choice": [forced]}}))
    texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert "".join(texts) == "Checking. "  # shown before the call; nothing of the call itself
    assert [_check_call(t) for t in calls] == [{"city": "Paris"}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # A reply without calls streams as the same text the whole reply has.
    plain = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER],
                                           max_tokens=40, temperature=0)
    streamed = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER],
                                              max_tokens=40, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert "".join(pieces) == plain.choices[0].message.content and len(pieces) > 3


def test_auto_stream_holds_back_what_may_begin_a_call():
    stream = AutoToolStream()
    assert stream.feed("Hello <to") == "Hello "
    assert stream.feed('ol_call>{"name": "a", "arguments": {}}</tool_call> bye') == ""
    rest, calls = stream.finish()
    assert rest == "bye" and [c.name for c in calls] == ["a"]
    other = AutoToolStream()
    assert other.feed("a <") == "a " and other.feed(" b") == "< b"
    assert other.finish() == ("", [])
    broken = AutoToolStream()
    assert broken.feed("x <tool_call>{oops</tool_call>") == "x "
    assert broken.finish() == ("<tool_call>{oops</tool_call>", [])


@pytest.mark.parametrize("body, says", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "give no response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "code", "function": {"name": "x"}}]}, "tools"),
])
def test_a_bad_tool_request_is_a_400(servers, body, says):
    httpx = pytest.importorskip("httpx")
    r = httpx.post(f"{servers[0]}/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert says in json.dumps(r.json()["error"])


def test_the_template_sees_the_tools_and_earlier_calls():
    class Templated:
        chat_template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                         "{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}"
                         "{{ m.tool_calls[0].function.name }}{% else %}{{ m.content }}"
                         "{% endif %}|{% endfor %}")
        special: dict = {}

    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    body = ChatRequest(model="tiny", tools=[WEATHER], messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    text = render_chat(Templated(), [m.model_dump() for m in body.messages], body.tool_list())
    assert text == "[get_weather]user:What is the weather in Paris?|assistant:get_weather|" \
                   "tool:sunny|"


def test_hermes_parsing():
    text = ('Let me look. <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call> done')
    content, calls = hermes_calls(text)
    assert content == "Let me look. \n done"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    broken = "<tool_call>{not json}</tool_call> and text"
    assert hermes_calls(broken) == (broken, [])
    assert hermes_calls('<tool_call>{"name": 5}</tool_call>')[1] == []
    assert hermes_calls('<tool_call>{"name": "a", "arguments": {}}</tool_call>')[0] is None


def test_required_schema_and_modes():
    schema = required_calls_schema([WEATHER, ADD], parallel=False)
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    assert "maxItems" not in required_calls_schema([WEATHER])
    request = ChatRequest(model="tiny", messages=ASK, tools=[WEATHER])
    with pytest.raises(ParameterError, match="tool-call-parser"):
        request.tool_mode(None)
    assert request.tool_mode("hermes") == ToolMode("auto", parser="hermes")
    named = ChatRequest(model="tiny", messages=ASK, tools=[{**ADD, "function": {
        **ADD["function"], "name": "required"}}],
        tool_choice={"type": "function", "function": {"name": "required"}})
    assert named.tool_mode(None) == ToolMode("named", "required")  # a tool may be so named
    assert ChatRequest(model="tiny", messages=ASK).tool_mode(None) is None


def test_granite_parsing():
    calls = '[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'
    content, parsed = granite_calls("Sure. <|tool_call|>" + calls)
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in parsed] == \
        [("a", {"x": 1}), ("b", {})]
    assert granite_calls("<tool_call>" + calls)[0] is None  # the marker as text works too
    one = granite_calls('<|tool_call|>{"name": "a", "arguments": {"y": [1]}}')[1]
    assert [(c.name, json.loads(c.arguments)) for c in one] == [("a", {"y": [1]})]
    for text in ("no calls here", "<|tool_call|>[{oops}]", "<|tool_call|>" + calls + " and more",
                 '<|tool_call|>[{"name": "a", "arguments": 3}]', "<|tool_call|>[]"):
        assert granite_calls(text) == (text, [])


def test_llama3_json_parsing():
    content, calls = llama3_json_calls(' {"name": "a", "parameters": {"x": "y"}}')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("a", {"x": "y"})]
    two = llama3_json_calls('<|python_tag|>{"name": "a", "parameters": {}}; '
                            '{"name": "b", "arguments": {"z": 0}}')[1]
    assert [c.name for c in two] == ["a", "b"]
    for text in ('Call {"name": "a", "parameters": {}}', '{"name": "a"} trailing',
                 '{"name": "a", "parameters": {}} {"name": "b", "parameters": {}}',
                 "{broken", '{"parameters": {}}'):
        assert llama3_json_calls(text) == (text, [])


def test_streams_of_each_parser_hold_back_what_may_begin_calls():
    granite = AutoToolStream("granite")
    assert granite.feed("Let me <|tool") == "Let me "
    assert granite.feed('_call|>[{"name": "a", "arguments": {}}]') == ""
    assert granite.finish()[1][0].name == "a"
    llama = AutoToolStream("llama3_json")
    assert llama.feed("  ") == "" and llama.feed('{"name"') == ""  # may be a call: held
    assert llama.feed(': "a", "parameters": {}}') == ""
    rest, calls = llama.finish()
    assert rest == "" and [c.name for c in calls] == ["a"]
    prose = AutoToolStream("llama3_json")
    assert prose.feed(" <|py") == "" and prose.feed("x is") == " <|pyx is"
    assert prose.feed(' {"name": 1}') == ' {"name": 1}'  # not at the start: text
    assert prose.finish() == ("", [])


@pytest.mark.parametrize("parser, forced, streamed_text", [
    ("granite", 'On it. <|tool_call|>[{"name": "get_weather", "arguments": {"city": "Rome"}}]',
     "On it. "),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Rome"}}', ""),
])
def test_auto_with_the_granite_and_llama3_parsers(servers, parser, forced, streamed_text):
    base = servers[2] if parser == "granite" else servers[3]
    client = _client(base)
    ask = dict(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=150,
               extra_body={"structured_outputs": {"choice": [forced]}})
    choice = client.chat.completions.create(**ask).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert _check_call(choice.message.tool_calls[0]) == {"city": "Rome"}
    assert choice.message.content == (streamed_text.strip() or None)
    chunks = list(client.chat.completions.create(**ask, stream=True))
    texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert "".join(texts) == streamed_text
    assert [_check_call(t) for t in calls] == [{"city": "Rome"}]


def test_parsers_whose_marker_is_a_special_token_keep_special_tokens():
    from bamba.generation_defaults import GenerationDefaults

    request = ChatRequest(model="tiny", messages=ASK, tools=[WEATHER])
    for parser, keeps in (("hermes", True), ("granite", False), ("llama3_json", False)):
        params = request.chat_sampling_params(GenerationDefaults(), request.tool_mode(parser))
        assert params.skip_special_tokens is keeps
