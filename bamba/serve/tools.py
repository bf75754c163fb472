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
    server's tool-call parser, which must be enabled (``bamba serve --tool-call-parser
    hermes``, vLLM's rule). ``hermes``: calls written as ``<tool_call>{"name": ...,
    "arguments": {...}}</tool_call>``, the format of Hermes, Qwen and IBM Granite 4.0 chat
    templates; the text outside the tags is the reply's content.
A reply with calls ends with finish_reason "tool_calls"; each call's ``arguments`` is its JSON
text, as OpenAI sends it. Streamed, a reply to "auto" shows its text as it comes up to the
first ``<tool_call>`` (``AutoToolStream``), then its calls and any later text once complete;
replies to "required" or a named function (JSON read by the server) come whole at the end.
Pure functions and state: what the server parses and builds.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from bamba.sampling import ParameterError

PARSERS = ("hermes",)
CALL_TAG = "<tool_call>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolMode:
    """How a reply is read: ``kind`` "auto" (the parser finds the calls), "required" (a JSON
    array of calls) or "named" (the arguments of ``name``, the one tool to call)."""

    kind: str
    name: str | None = None

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
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(call["name"], json.dumps(arguments, ensure_ascii=False))


class AutoToolStream:
    """One streamed reply to tool_choice "auto": ``feed(new text)`` returns the text safe to
    show now (everything before the first ``<tool_call>``, less a tail that could begin one);
    ``finish()`` the (content not yet shown, calls) of the whole reply."""

    def __init__(self) -> None:
        self.text = ""
        self.shown = 0
        self.calling = False

    def feed(self, new: str) -> str:
        self.text += new
        if self.calling:
            return ""
        tag = self.text.find(CALL_TAG, self.shown)
        if tag >= 0:
            self.calling = True
            end = tag
        else:
            end = len(self.text) - _partial_tag(self.text)
        out = self.text[self.shown:end]
        self.shown = max(self.shown, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = hermes_calls(self.text[self.shown:])
        rest = self.text[self.shown:] if not calls else (content or "")
        self.shown = len(self.text)
        return rest, calls


def _partial_tag(text: str) -> int:
    """The length of the longest tail of ``text`` that begins ``<tool_call>``."""
    for size in range(min(len(CALL_TAG) - 1, len(text)), 0, -1):
        if CALL_TAG.startswith(text[-size:]):
            return size
    return 0
