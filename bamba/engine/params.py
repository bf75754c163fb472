"""What a caller asks of one request (``SamplingParams``) and what it gets back (outputs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bamba.sampling import require_int, require_number


@dataclass
class SamplingParams:
    """Per-request sampling and stopping rules (vLLM/OpenAI semantics).

    temperature 0 is greedy; top_k 0 (or -1) and top_p 1 switch those filters off; penalties at
    their neutral values (1, 0, 0) do nothing. ``seed`` makes the request reproducible whatever
    else is batched with it (sample i of n uses seed + i). ``max_tokens`` None means up to the
    context length. ``logprobs`` n returns the chosen token's logprob and the n most likely.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range or mistyped field."""
        require_int(self.n, "n", 1)
        require_int(self.top_k, "top_k", 0)
        if self.max_tokens is not None:
            require_int(self.max_tokens, "max_tokens", 1)
        if self.logprobs is not None:
            require_int(self.logprobs, "logprobs", 0)
        if self.seed is not None:
            require_int(self.seed, "seed", 0)
        require_number(self.temperature, "temperature", 0.0, math.inf)
        require_number(self.top_p, "top_p", 0.0, 1.0, low_open=True)
        require_number(self.min_p, "min_p", 0.0, 1.0)
        require_number(self.repetition_penalty, "repetition_penalty", 0.0, math.inf, low_open=True)
        require_number(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        require_number(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a non-empty string or a list of them")
        for token in self.stop_token_ids:
            require_int(token, "stop_token_ids entry", 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives at that step."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass
class CompletionOutput:
    """One sample of a request. ``text``/``token_ids`` are cumulative; ``new_text``/
    ``new_token_ids`` are what arrived since the previous report (for streaming)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
