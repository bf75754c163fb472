"""OpenAI request bodies (pydantic, strict types) and the payloads built from engine outputs.

Types are strict: a string where a number belongs, a float where an integer belongs or a bool
where a number belongs is a 400, never coerced. ``null`` means "the default". Unknown fields
are ignored, as OpenAI's server does; known fields we cannot honour (suffix, best_of,
echo when streaming) are refused with a 400 rather than silently dropped.
``response_format`` (text, json_object, json_schema) and vLLM's ``structured_outputs`` (json,
regex, choice, grammar, json_object) hold the output to a constraint (``engine.structured``);
chat's ``tools`` and ``tool_choice`` are read as ``serve.tools`` says.
Sampling ranges are checked by ``SamplingParams`` itself, whose message names the field.
A field left out (or ``null``) takes the checkpoint's generation_config.json value where it
sets one (``bamba.generation_defaults``, as vLLM does), else the engine's default.

/v1/completions takes the legacy API's prompts: a text, token ids, or a list of either (one
engine request each; choice ``index`` = prompt index * n + sample index). ``echo`` puts the
prompt before each completion, and with ``logprobs`` N its tokens too: their logprobs (None
for the first) and top N, then the generated tokens', as ``{tokens, token_logprobs,
top_logprobs, text_offset}``; ``max_tokens`` 0 is allowed with echo (score the prompt only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bamba.engine import (CompletionOutput, RequestOutput, SamplingParams,
                          StructuredOutputsParams, TokenLogprob)
from bamba.generation_defaults import GenerationDefaults
from bamba.sampling import ParameterError
from bamba.serve.tools import (PARSERS, AutoToolStream, ToolCall, ToolMode, named_call,
                               named_tool, parameters_of, parse_calls, required_calls,
                               required_calls_schema)

MAX_N = 128  # samples per request (OpenAI's limit)
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1 - MAX_N  # sample i uses seed + i, and torch seeds are 64-bit
MAX_TOKEN_ID = 2**31 - 1
MAX_CHOICES = 256  # prompts x samples in one /v1/completions request
MAX_ALLOWED = 2**20  # allowed_token_ids entries

Decode = Callable[[list[int]], str]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs request field (``StructuredOutputsParams``' names)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    json_value: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, max_length=1024)
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None

    def params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(json=self.json_value, regex=self.regex,
                                       choice=self.choice, grammar=self.grammar,
                                       json_object=bool(self.json_object),
                                       disable_any_whitespace=bool(self.disable_any_whitespace))


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKEN_ID)
    min_p: float | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, max_length=16)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    response_format: ResponseFormat | None = None
    min_tokens: int | None = Field(None, ge=0)
    allowed_token_ids: list[int] | None = Field(None, min_length=1, max_length=MAX_ALLOWED)
    structured_outputs: StructuredOutputs | None = None

    def structured(self) -> StructuredOutputsParams | None:
        """The constraint of response_format or structured_outputs (at most one of them)."""
        wanted = None if self.response_format is None or self.response_format.type == "text" \
            else self.response_format
        if wanted is not None and self.structured_outputs is not None:
            raise ParameterError("give response_format or structured_outputs, not both",
                                 "response_format")
        if self.structured_outputs is not None:
            return self.structured_outputs.params()
        if wanted is None:
            return None
        if wanted.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if wanted.json_schema is None:
            raise ParameterError("response_format of type json_schema needs its json_schema "
                                 "object", "response_format")
        return StructuredOutputsParams(json=wanted.json_schema.json_schema)

    def sampling_params(self, defaults: GenerationDefaults, logprobs: int | None,
                        max_tokens_default: int | None, prompt_logprobs: int | None = None
                        ) -> SamplingParams:
        """The fields given, else the checkpoint's generation ``defaults``, else the engine's
        (max_tokens: ``max_tokens_default``). Raises ParameterError (naming the field) for
        unsupported or out-of-range values."""
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ParameterError("best_of is not supported (it must equal n)", "best_of")
        if any(t < 0 or t > MAX_TOKEN_ID for t in self.stop_token_ids or []):
            raise ParameterError(f"stop_token_ids must be integers in [0, {MAX_TOKEN_ID}]",
                                 "stop_token_ids")
        given = {k: v for k, v in {
            "n": self.n, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "min_p": self.min_p, "seed": self.seed, "stop": self.stop,
            "stop_token_ids": self.stop_token_ids, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "ignore_eos": self.ignore_eos,
            "repetition_penalty": self.repetition_penalty,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "logit_bias": self.logit_bias, "min_tokens": self.min_tokens,
            "allowed_token_ids": self.allowed_token_ids}.items()
            if v is not None}
        if self.max_tokens is not None:
            max_tokens = self.max_tokens
        elif defaults.max_new_tokens is not None:
            max_tokens = defaults.max_new_tokens
        else:
            max_tokens = max_tokens_default
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, structured_outputs=self.structured(),
                              **{**defaults.sampling, **given})

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request (texts or token ids); ParameterError if one is empty,
        there are too many, or several are to be streamed."""
        prompt = self.prompt
        several = isinstance(prompt, list) and bool(prompt) and \
            isinstance(prompt[0], (str, list))
        prompts = list(prompt) if several else [prompt]
        if not all(prompts):
            raise ParameterError("prompt: the prompt is empty", "prompt")
        if len(prompts) * (self.n or 1) > MAX_CHOICES:
            raise ParameterError(f"prompt: {len(prompts)} prompts x n={self.n or 1} samples "
                                 f"exceed {MAX_CHOICES} choices per request", "prompt")
        if self.stream and len(prompts) > 1:
            raise ParameterError("prompt: several prompts cannot be streamed", "prompt")
        return prompts

    def completion_params(self, defaults: GenerationDefaults, max_tokens_default: int
                          ) -> SamplingParams:
        """The engine's parameters: with echo and logprobs (or max_tokens 0), the prompt's
        logprobs too. ParameterError naming the field for what cannot be served."""
        if self.suffix:
            raise ParameterError("suffix is not supported", "suffix")
        if self.echo and self.stream:
            raise ParameterError("echo cannot be streamed", "echo")
        if self.max_tokens == 0 and not self.echo:
            raise ParameterError("max_tokens must be >= 1 (0 only with echo: score the "
                                 "prompt)", "max_tokens")
        scoring = self.echo and (self.logprobs is not None or self.max_tokens == 0)
        return self.sampling_params(defaults, self.logprobs, max_tokens_default,
                                    (self.logprobs or 0) if scoring else None)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionName


def tool_dicts(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """The tools as the chat template takes them (None without any)."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_list(self) -> list[dict[str, Any]] | None:
        return tool_dicts(self.tools)

    def tool_mode(self, parser: str | None) -> ToolMode | None:
        """How the reply is read (None: as text). ParameterError for a choice that cannot be
        served."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none"):
                raise ParameterError("tool_choice needs tools", "tool_choice")
            return None
        if choice == "none":
            return None
        if isinstance(choice, NamedToolChoice):
            named_tool(self.tool_list() or [], choice.function.name)  # it must be one of them
            return ToolMode("named", choice.function.name)
        if choice == "required":
            return ToolMode("required")
        if parser is None:
            raise ParameterError('"auto" tool choice needs a tool-call parser: start the '
                                 f"server with --tool-call-parser ({'|'.join(PARSERS)}), or "
                                 'pass tool_choice "required", "none" or a named function',
                                 "tool_choice")
        return ToolMode("auto", parser=parser)

    def chat_sampling_params(self, defaults: GenerationDefaults,
                             tool_mode: ToolMode | None = None) -> SamplingParams:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        params = self.sampling_params(defaults, (self.top_logprobs or 0) if self.logprobs
                                      else None, None)
        if tool_mode is not None and tool_mode.parser is not None and \
                PARSERS[tool_mode.parser].keeps_special_tokens:
            params.skip_special_tokens = False  # the call's marker is a special token
        if tool_mode is None or not tool_mode.held:
            return params
        if params.structured_outputs is not None:
            raise ParameterError("tool_choice required or a named function holds the reply to "
                                 "the tools' schemas: give no response_format or "
                                 "structured_outputs with it", "tool_choice")
        tools = self.tool_list() or []
        schema = required_calls_schema(tools, self.parallel_tool_calls is not False) \
            if tool_mode.kind == "required" else \
            parameters_of(named_tool(tools, tool_mode.name or ""))
        # compact JSON: the calls are read by the server, not shown
        params.structured_outputs = StructuredOutputsParams(json=schema,
                                                            disable_any_whitespace=True)
        return params


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt's text, or chat messages (and tools) as /v1/chat/completions
    renders them."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    add_special_tokens: bool | None = None

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ParameterError("give prompt or messages (one of them)", "prompt")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    tokens: list[int] = Field(max_length=2**20)


# ---- responses ---------------------------------------------------------------------------
def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def output_usage(out: RequestOutput) -> dict[str, int]:
    """Usage of a whole (cumulative) output."""
    return usage(len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs))


def finish_reason(o: CompletionOutput) -> str | None:
    """OpenAI's reasons: "stop" (EOS, stop string or token) or "length"."""
    if o.finish_reason in (None, "stop", "length"):
        return o.finish_reason
    raise AssertionError(f"finish reason {o.finish_reason!r} has no OpenAI equivalent")


def completion_logprobs(o: CompletionOutput, decode: Decode, start: int = 0) -> dict | None:
    if o.logprobs is None:
        return None
    entries = o.logprobs[start:]
    return {"tokens": [decode([e.token_id]) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [_top(e, decode) for e in entries],
            "text_offset": []}


def echo_logprobs(out: RequestOutput, o: CompletionOutput, decode: Decode) -> dict:
    """The legacy logprobs of an echoed prompt and its completion ``o``: every prompt token
    (the first without a logprob), then the generated ones; offsets into prompt + text."""
    assert out.prompt_logprobs is not None, "an echo with logprobs computes the prompt's"
    prompt = out.prompt_logprobs
    tokens = [decode([t]) for t in out.prompt_token_ids]
    tokens += [decode([e.token_id]) for e in o.logprobs or []]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    generated = o.logprobs or []
    return {"tokens": tokens,
            "token_logprobs": [None if e is None else e.logprob for e in prompt]
            + [e.logprob for e in generated],
            "top_logprobs": [None if e is None else _top(e, decode) for e in prompt]
            + [_top(e, decode) for e in generated],
            "text_offset": offsets}


def _top(entry: TokenLogprob, decode: Decode) -> dict[str, float]:
    return {decode([t]): lp for t, lp in entry.top.items()}


def chat_logprobs(o: CompletionOutput, decode: Decode, start: int = 0) -> dict | None:
    if o.logprobs is None:
        return None
    return {"content": [
        {"token": decode([e.token_id]), "logprob": e.logprob, "bytes": None,
         "top_logprobs": [{"token": decode([t]), "logprob": lp, "bytes": None}
                          for t, lp in e.top.items()]}
        for e in o.logprobs[start:]]}


def _envelope(rid: str, kind: str, model: str, choices: list[dict]) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "choices": choices}


def completion_response(outs: list[RequestOutput], model: str, rid: str, decode: Decode,
                        echoed: list[str] | None = None, logprobs: bool = False) -> dict:
    """The response to one or several prompts (``outs`` in prompt order); ``echoed``: the
    prompts' texts, put before each completion (with their logprobs when ``logprobs``)."""
    choices, counts = [], usage(0, 0)
    for i, out in enumerate(outs):
        for o in out.outputs:
            choice = {"index": i * len(out.outputs) + o.index, "text": o.text,
                      "finish_reason": finish_reason(o),
                      "logprobs": completion_logprobs(o, decode)}
            if echoed is not None:
                choice["text"] = echoed[i] + o.text
                choice["logprobs"] = echo_logprobs(out, o, decode) if logprobs else None
            choices.append(choice)
        counts = {k: counts[k] + v for k, v in output_usage(out).items()}
    return {**_envelope(rid, "text_completion", model, choices), "usage": counts}


def reply_calls(o: CompletionOutput, tool_mode: ToolMode | None
                ) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of one reply read as ``tool_mode`` says (``ChatRequest``)."""
    if tool_mode is None:
        return o.text, []
    if tool_mode.kind == "auto":
        return parse_calls(o.text, tool_mode.parser or "hermes")
    calls = required_calls(o.text) if tool_mode.kind == "required" else \
        named_call(o.text, tool_mode.name or "")
    return (None, calls) if calls else (o.text, [])


def chat_choice(o: CompletionOutput, tool_mode: ToolMode | None, decode: Decode,
                stream: bool = False) -> dict[str, Any]:
    """One reply as a chat choice: a ``message`` (``delta`` when ``stream``: the whole reply
    in one chunk), with tool calls and finish_reason "tool_calls" when it made calls."""
    content, calls = reply_calls(o, tool_mode)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    reason = finish_reason(o)
    if calls:
        message["tool_calls"] = [c.payload(i if stream else None) for i, c in enumerate(calls)]
        reason = "tool_calls" if reason == "stop" else reason
    return {"index": o.index, "finish_reason": reason, "delta" if stream else "message": message,
            "logprobs": chat_logprobs(o, decode)}


def chat_response(out: RequestOutput, model: str, rid: str, decode: Decode,
                  tool_mode: ToolMode | None = None) -> dict:
    choices = [chat_choice(o, tool_mode, decode) for o in out.outputs]
    return {**_envelope(rid, "chat.completion", model, choices), "usage": output_usage(out)}


def tool_reply_chunks(out: RequestOutput, model: str, rid: str, tool_mode: ToolMode,
                      decode: Decode) -> list[dict]:
    """A streamed reply held to the tools' schemas: each sample's whole reply in one chunk (the
    calls can only be read once it is complete)."""
    return [_envelope(rid, "chat.completion.chunk", model,
                      [chat_choice(o, tool_mode, decode, stream=True)]) for o in out.outputs]


def auto_tool_chunks(out: RequestOutput, model: str, rid: str,
                     streams: dict[int, AutoToolStream], decode: Decode,
                     parser: str = "hermes") -> list[dict]:
    """The SSE payloads of one delta output of a reply to tool_choice "auto": text as it
    becomes safe to show, and at a sample's end its calls (finish_reason "tool_calls")."""
    chunks = []
    for o in out.outputs:
        first = o.index not in streams
        state = streams.setdefault(o.index, AutoToolStream(parser))
        delta: dict[str, Any] = {"content": state.feed(o.new_text)}
        if first:
            delta["role"] = "assistant"
        reason = finish_reason(o)
        if o.finished:
            rest, calls = state.finish()
            delta["content"] += rest
            if calls:
                delta["tool_calls"] = [c.payload(i) for i, c in enumerate(calls)]
                reason = "tool_calls" if reason == "stop" else reason
        if not (delta["content"] or first or o.finished):
            continue
        start = len(o.token_ids) - len(o.new_token_ids)
        chunks.append(_envelope(rid, "chat.completion.chunk", model, [
            {"index": o.index, "delta": delta, "finish_reason": reason,
             "logprobs": chat_logprobs(o, decode, start)}]))
    return chunks


def stream_chunks(out: RequestOutput, model: str, rid: str, chat: bool, started: set[int],
                  decode: Decode) -> list[dict]:
    """The SSE payloads for what is new in one engine output (one per changed sample; a delta
    output's logprobs are all new). ``started`` holds the indices of samples already announced
    (chat sends the role first)."""
    chunks = []
    for o in out.outputs:
        first = o.index not in started
        if not (o.new_text or o.new_token_ids or o.finished or first):
            continue
        started.add(o.index)
        start = len(o.token_ids) - len(o.new_token_ids)
        if chat:
            delta: dict[str, Any] = {"content": o.new_text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": o.index, "delta": delta, "finish_reason": finish_reason(o),
                      "logprobs": chat_logprobs(o, decode, start)}
        else:
            choice = {"index": o.index, "text": o.new_text, "finish_reason": finish_reason(o),
                      "logprobs": completion_logprobs(o, decode, start)}
        kind = "chat.completion.chunk" if chat else "text_completion"
        chunks.append(_envelope(rid, kind, model, [choice]))
    return chunks


def usage_chunk(counts: dict[str, int], model: str, rid: str, chat: bool) -> dict:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {**_envelope(rid, kind, model, []), "usage": counts}
