"""OpenAI request bodies (validated by pydantic) and the response payloads we build from
engine outputs. Unknown fields are ignored, as OpenAI's own server tolerates them."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt

from bamba.engine import CompletionOutput, RequestOutput, SamplingParams

# The chat template used when the tokenizer has none (documented in the README/--help).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class _Sampling(BaseModel):
    model: str
    max_tokens: StrictInt | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: StrictInt = 0
    min_p: float = 0.0
    n: StrictInt = 1
    stream: StrictBool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: StrictBool = False

    def sampling_params(self, logprobs: int | None) -> SamplingParams:
        """Raises ValueError for out-of-range values (a 400 for the client)."""
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, max_tokens=self.max_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, ignore_eos=self.ignore_eos,
            repetition_penalty=self.repetition_penalty, logprobs=logprobs)


class CompletionRequest(_Sampling):
    prompt: str | list[StrictInt] | list[str]
    logprobs: StrictInt | None = None

    def single_prompt(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            return self.prompt[0]
        return self.prompt


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None

    def chat_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(out: RequestOutput) -> dict[str, int]:
    completion = sum(len(o.token_ids) for o in out.outputs)
    return {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": completion,
            "total_tokens": len(out.prompt_token_ids) + completion}


def _finish(o: CompletionOutput) -> str | None:
    return o.finish_reason if o.finish_reason in (None, "stop", "length") else "stop"


def completion_logprobs(o: CompletionOutput, decode: Any, start: int = 0) -> dict | None:
    if o.logprobs is None:
        return None
    entries = o.logprobs[start:]
    return {"tokens": [decode([e.token_id]) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{decode([t]): lp for t, lp in e.top.items()} for e in entries],
            "text_offset": []}


def chat_logprobs(o: CompletionOutput, decode: Any, start: int = 0) -> dict | None:
    if o.logprobs is None:
        return None
    return {"content": [
        {"token": decode([e.token_id]), "logprob": e.logprob, "bytes": None,
         "top_logprobs": [{"token": decode([t]), "logprob": lp, "bytes": None}
                          for t, lp in e.top.items()]}
        for e in o.logprobs[start:]]}


def completion_response(out: RequestOutput, model: str, rid: str, decode: Any) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": o.index, "text": o.text, "finish_reason": _finish(o),
                         "logprobs": completion_logprobs(o, decode)} for o in out.outputs],
            "usage": usage(out)}


def chat_response(out: RequestOutput, model: str, rid: str, decode: Any) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": o.index, "finish_reason": _finish(o),
                         "message": {"role": "assistant", "content": o.text},
                         "logprobs": chat_logprobs(o, decode)} for o in out.outputs],
            "usage": usage(out)}


def stream_chunks(out: RequestOutput, model: str, rid: str, chat: bool, first: bool,
                  decode: Any) -> list[dict]:
    """The SSE payloads for what is new in one engine output (one per changed sample)."""
    chunks = []
    for o in out.outputs:
        if not (o.new_text or o.finished or first or o.new_token_ids):
            continue
        start = len(o.token_ids) - len(o.new_token_ids)
        if chat:
            delta: dict[str, Any] = {"content": o.new_text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": o.index, "delta": delta, "finish_reason": _finish(o),
                      "logprobs": chat_logprobs(o, decode, start)}
        else:
            choice = {"index": o.index, "text": o.new_text, "finish_reason": _finish(o),
                      "logprobs": completion_logprobs(o, decode, start)}
        chunks.append({"id": rid, "object": "chat.completion.chunk" if chat else
                       "text_completion", "created": int(time.time()), "model": model,
                       "choices": [choice]})
    return chunks
