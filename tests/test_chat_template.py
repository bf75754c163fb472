"""Chat templates render as transformers' ``apply_chat_template`` renders them: tools through
``tojson`` (non-ASCII kept, keys in order, indent), loop controls, ``{% generation %}`` blocks,
``strftime_now`` and ``raise_exception``; in the tokenizer, the server's chat rendering and
fine-tuning alike."""

from __future__ import annotations

import datetime

import pytest

from bamba.serve.chat import render_chat
from bamba.tokenizer import load_tokenizer
from conftest import build_tokenizer

# A template in the style of Granite 4.0's and Qwen's: the tools as JSON in the system turn,
# earlier calls as <tool_call> blocks, tool answers in <tool_response>, a loop that breaks.
TEMPLATE = (
    "{%- if tools %}<|system|>Tools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "{{ tools[0] | tojson(indent=2) }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'stop' %}{% break %}{% endif %}"
    "<|{{ message.role }}|>"
    "{%- if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>"
    "{{ call.function | tojson }}</tool_call>{% endfor %}"
    "{%- elif message.role == 'tool' %}<tool_response>{{ message.content }}</tool_response>"
    "{%- elif message.role == 'assistant' %}{% generation %}{{ message.content }}"
    "{% endgeneration %}{%- else %}{{ message.content }}{% endif %}\n"
    "{%- endfor %}{% if add_generation_prompt %}<|assistant|>{{ strftime_now('%Y') }}{% endif %}")
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo <now> & 'here'",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
MESSAGES = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny <20°C>"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "stop", "content": "never rendered"},
    {"role": "user", "content": "Thanks"}]


@pytest.fixture
def tokenizer_dir(tmp_path):
    hf = build_tokenizer(chat_template=TEMPLATE)
    hf.save_pretrained(tmp_path / "t")
    return tmp_path / "t", hf


def test_renders_what_transformers_renders(tokenizer_dir):
    directory, hf = tokenizer_dir
    expected = hf.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False,
                                      add_generation_prompt=True)
    assert '"description": "Météo <now> & \'here\'"' in expected  # no escapes, keys in order
    assert str(datetime.date.today().year) in expected and "never rendered" not in expected
    ours = load_tokenizer(directory)
    assert ours.apply_chat_template(MESSAGES, tools=TOOLS) == expected
    assert render_chat(ours, MESSAGES, TOOLS) == expected
    assert render_chat(ours, MESSAGES[:1]) == hf.apply_chat_template(
        MESSAGES[:1], tokenize=False, add_generation_prompt=True)


def test_raise_exception_is_a_one_line_error(tmp_path):
    hf = build_tokenizer(chat_template="{{ raise_exception('only user turns, please') }}")
    hf.save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="only user turns, please"):
        render_chat(load_tokenizer(tmp_path / "t"), MESSAGES[:1])
