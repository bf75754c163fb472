"""OpenAI request bodies (pydantic, strict types) and the payloads built from engine outputs.

Types are strict: a string where a number belongs, a float where an integer belongs or a bool
where a number belongs is a 400, never coerced. ``null`` means "the default". Unknown fields
are ignored, as OpenAI's server does; known fields we cannot honour (echo, suffix, logit_bias,
tools, best_of) are refused with a 400 rather than silently dropped. Sampling ranges are
checked by ``SamplingParams`` itself, whose message names the field.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bamba.engine import CompletionOutput, RequestOutput, SamplingParams
from bamba.sampling import ParameterError

MAX_N = 128  # samples per request (OpenAI's limit)
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1 - MAX_N  # sample i uses seed + i, and torch seeds are 64-bit
MAX_TOKEN_ID = 2**31 - 1

Decode = Callable[[list[int]], str]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = None


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

    def sampling_params(self, logprobs: int | None,
                        max_tokens_default: int | None) -> SamplingParams:
        """Raises ParameterError (naming the field) for unsupported or out-of-range values."""
        if self.logit_bias:
            raise ParameterError("logit_bias is not supported", "logit_bias")
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
            "include_stop_str_in_output": self.include_stop_str_in_output}.items()
            if v is not None}
        max_tokens = self.max_tokens if self.max_tokens is not None else max_tokens_default
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **given)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (a text or token ids); ParameterError otherwise."""
        if self.echo:
            raise ParameterError("echo is not supported", "echo")
        if self.suffix:
            raise ParameterError("suffix is not supported", "suffix")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ParameterError("prompt: only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise ParameterError("prompt: the prompt is empty", "prompt")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None

    def chat_sampling_params(self) -> SamplingParams:
        if self.tools:
            raise ParameterError("tools are not supported", "tools")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self.sampling_params((self.top_logprobs or 0) if self.logprobs else None, None)


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
            "top_logprobs": [{decode([t]): lp for t, lp in e.top.items()} for e in entries],
            "text_offset": []}


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


def completion_response(out: RequestOutput, model: str, rid: str, decode: Decode) -> dict:
    choices = [{"index": o.index, "text": o.text, "finish_reason": finish_reason(o),
                "logprobs": completion_logprobs(o, decode)} for o in out.outputs]
    return {**_envelope(rid, "text_completion", model, choices), "usage": output_usage(out)}


def chat_response(out: RequestOutput, model: str, rid: str, decode: Decode) -> dict:
    choices = [{"index": o.index, "finish_reason": finish_reason(o),
                "message": {"role": "assistant", "content": o.text},
                "logprobs": chat_logprobs(o, decode)} for o in out.outputs]
    return {**_envelope(rid, "chat.completion", model, choices), "usage": output_usage(out)}


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
