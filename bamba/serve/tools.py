"""Tool calling for /v1/chat/completions (OpenAI's ``tools`` and ``tool_choice``, as vLLM
serves them).

The tools go to the chat template (``tools=``), which tells the model how to call them.
``tool_choice``:
  - "none": the reply is text; nothing is parsed.
  - "required": the reply is held (structured outputs) to a JSON array of one or more calls
    (one with parallel_tool_calls false), each ``{"name": <a tool's name>, "parameters":
    <that tool's parameters schema>}``.
  - ``{"type": "function", "function": {"name": N}}``: the reply is held to N's parameters
    schema: one call of N.
  - "auto" (the default when tools are given): the model chooses; the reply is parsed by the
    server's tool-call parser, which must be enabled (``bamba serve --tool-call-parser NAME``,
    vLLM's rule and names; ``PARSERS``):
      ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, the
        format of Hermes, Qwen and IBM Granite 4.0 chat templates; the text outside the
        blocks is the reply's content.
      ``granite``: IBM Granite 3.x's ``<|tool_call|>`` (or ``<tool_call>``) then a JSON array
        of ``{"name", "arguments"}`` objects; the text before it is the content. The reply
        keeps special tokens so that the marker token reaches the parser.
      ``llama3_json``: Llama 3.x's JSON calls: a reply that is (after ``<|python_tag|>``, if
        any) one or more ``{"name": ..., "parameters": {...}}`` objects, ``;``-separated.
A reply with calls ends with finish_reason "tool_calls"; each call's ``arguments`` is its JSON
text, as OpenAI sends it. Streamed, a reply to "auto" shows its text as it comes up to where
calls may begin (``AutoToolStream``), then its calls and any later text once complete;
replies to "required" or a named function (JSON read by the server) come whole at the end.
A reply the parser cannot read as calls is content, as written.
Pure functions and state: what the server parses and builds.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bamba.sampling import ParameterError

CALL_TAG = "<tool_call>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
GRANITE_TAGS = ("<|tool_call|>", CALL_TAG)
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolMode:
    """How a reply is read: ``kind`` "auto" (``parser``, one of ``PARSERS``, finds the calls),
    "required" (a JSON array of calls) or "named" (the arguments of ``name``, the one tool to
    call)."""

    kind: str
    name: str | None = None
    parser: str | None = None

    @property
    def held(self) -> bool:
        """Whether the reply is held to the tools' schemas (JSON the server reads)."""
        return self.kind != "auto"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text

    def payload(self, index: int | None = None) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry (with ``index`` in a stream's delta)."""
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parameters_of(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters schema (any object when it declares none)."""
    return tool["function"].get("parameters") or {"type": "object"}


def required_calls_schema(tools: list[dict[str, Any]], parallel: bool = True
                          ) -> dict[str, Any]:
    """The JSON schema of a reply to tool_choice "required": one or more calls of the tools
    (exactly one without ``parallel``, OpenAI's parallel_tool_calls false)."""
    calls = [{"type": "object", "additionalProperties": False,
              "properties": {"name": {"const": t["function"]["name"]},
                             "parameters": parameters_of(t)},
              "required": ["name", "parameters"]} for t in tools]
    return {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}),
            "items": {"anyOf": calls}}


def named_tool(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool
    raise ParameterError(f"tool_choice names {name!r}, which is not among the tools",
                         "tool_choice")


def required_calls(text: str) -> list[ToolCall]:
    """The calls of a reply held to ``required_calls_schema`` (none when it was cut short)."""
    try:
        calls = json.loads(text)
    except ValueError:
        return []
    return [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
            for c in calls]


def named_call(text: str, name: str) -> list[ToolCall]:
    """The one call of a reply held to tool ``name``'s parameters (none when cut short)."""
    try:
        arguments = json.loads(text)
    except ValueError:
        return []
    return [ToolCall(name, json.dumps(arguments, ensure_ascii=False))]


def hermes_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a reply in the hermes format: each ``<tool_call>`` block holding a
    JSON object with a string "name" and an "arguments" object becomes a call; the text
    outside the blocks is the content (None when only whitespace is left). A block that is
    not such a call stays in the content as written."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for match in _HERMES.finditer(text):
        call = _hermes_call(match.group(1))
        if call is None:
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def _hermes_call(block: str) -> ToolCall | None:
    try:
        call = json.loads(block)
    except ValueError:
        return None
    return _call_of(call)


def _call_of(call: object) -> ToolCall | None:
    """A decoded ``{"name": str, "arguments" (or "parameters"): {...}}`` as a call."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


def _json_values(text: str, separator: str = "") -> list[object] | None:
    """The JSON values ``text`` holds one after another (``separator`` between them, blanks
    around), or None when anything else is in it."""
    decoder, values, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        if values and separator:
            if not text.startswith(separator, at):
                return None
            at += len(separator)
        at = len(text) - len(text[at:].lstrip())
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)
        at = len(text) - len(text[at:].lstrip())
    return values


def _all_calls(values: list[object] | None) -> list[ToolCall]:
    """Every value a call (else none: the reply is then text)."""
    calls = [_call_of(v) for v in values or []]
    return calls if calls and None not in calls else []


def granite_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a reply in Granite 3.x's format: ``<|tool_call|>`` (or
    ``<tool_call>``) then a JSON array of calls (or one call), the text before it the
    content."""
    found = [(text.find(tag), tag) for tag in GRANITE_TAGS if tag in text]
    if not found:
        return text, []
    at, tag = min(found)
    values = _json_values(text[at + len(tag):])
    if values is not None and len(values) == 1 and isinstance(values[0], list):
        values = values[0]
    calls = _all_calls(values)
    return ((text[:at].strip() or None), calls) if calls else (text, [])


def llama3_json_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a reply in Llama 3.x's JSON format: the whole reply (after
    ``<|python_tag|>``) one or more call objects separated by ``;``; no content with them."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):]
    calls = _all_calls(_json_values(body, ";")) if body.lstrip().startswith("{") else []
    return (None, calls) if calls else (text, [])


@dataclass(frozen=True)
class ToolParser:
    """How one format is read: ``calls(text)`` -> (content, calls); where calls may begin in
    a stream: at a ``markers`` string, or (``leading``) at the reply's first non-blank
    character when it is one of those."""

    calls: Callable[[str], tuple[str | None, list[ToolCall]]]
    markers: tuple[str, ...] = ()
    leading: tuple[str, ...] = ()
    keeps_special_tokens: bool = False  # its marker is a special token the text must keep


PARSERS = {
    "hermes": ToolParser(hermes_calls, markers=(CALL_TAG,)),
    "granite": ToolParser(granite_calls, markers=GRANITE_TAGS, keeps_special_tokens=True),
    "llama3_json": ToolParser(llama3_json_calls, leading=("{", PYTHON_TAG),
                              keeps_special_tokens=True),
}


def parse_calls(text: str, parser: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole reply read by the named parser."""
    return PARSERS[parser].calls(text)


class AutoToolStream:
    """One streamed reply to tool_choice "auto" read by ``parser``: ``feed(new text)`` returns
    the text safe to show now (everything before where calls begin, less a tail that could
    begin a marker); ``finish()`` the (content not yet shown, calls) of the whole reply."""

    def __init__(self, parser: str = "hermes") -> None:
        self.parser = PARSERS[parser]
        self.text = ""
        self.shown = 0
        self.calling = False

    def feed(self, new: str) -> str:
        self.text += new
        if self.calling:
            return ""
        start = self._calls_start()
        if start is not None:
            self.calling = True
            end = start
        else:
            end = len(self.text) - self._held_tail()
        out = self.text[self.shown:end]
        self.shown = max(self.shown, end)
        return out

    def _calls_start(self) -> int | None:
        """Where calls begin in the text so far, if they do."""
        found = [at for at in (self.text.find(m, self.shown) for m in self.parser.markers)
                 if at >= 0]
        if self.parser.leading and self.shown == 0:
            body = self.text.lstrip()
            if any(body.startswith(lead) for lead in self.parser.leading):
                found.append(0)
        return min(found) if found else None

    def _held_tail(self) -> int:
        """How much of the text's end to hold back: a tail that may begin a marker; the whole
        text while it is blank or may begin a leading form."""
        if self.parser.leading and self.shown == 0:
            body = self.text.lstrip()
            if not body or any(lead.startswith(body) for lead in self.parser.leading):
                return len(self.text)
        return max((_partial(self.text, m) for m in self.parser.markers), default=0)

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = self.parser.calls(self.text[self.shown:])
        rest = self.text[self.shown:] if not calls else (content or "")
        self.shown = len(self.text)
        return rest, calls


def _partial(text: str, marker: str) -> int:
    """The length of the longest tail of ``text`` that begins ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
