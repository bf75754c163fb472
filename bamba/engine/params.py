"""What a caller asks of one request (``SamplingParams``) and what it gets back (outputs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bamba.engine.structured import StructuredOutputsParams
from bamba.sampling import ParameterError, SamplingValues, require_int
OUTPUT_KINDS = ("cumulative", "delta")


@dataclass
class SamplingParams(SamplingValues):
    """Per-request sampling and stopping rules (vLLM/OpenAI semantics).

    temperature 0 is greedy; top_k 0 (or -1) and top_p 1 switch those filters off; penalties at
    their neutral values (1, 0, 0) do nothing. ``seed`` makes the request reproducible whatever
    else is batched with it (sample i of n uses seed + i). ``max_tokens`` None means up to the
    context length. ``logprobs`` n returns the chosen token's logprob and the n most likely.
    ``prompt_logprobs`` n does the same for every prompt token after the first (the first has
    none: ``None`` in its place); it needs the logits of every prompt position, so the prompt
    is prefilled in full (no prefix-cache reuse), chunk by chunk; with it, ``max_tokens`` may
    be 0 (score the prompt, generate nothing). ``structured_outputs`` holds the text to a
    JSON schema, regex, choice or grammar (``bamba.engine.structured``); logit_bias,
    allowed_token_ids and min_tokens: see ``SamplingValues``.
    ``output_kind`` "cumulative": each output holds everything so far; "delta": only what is
    new since the previous output (what a streaming server sends on; see ``merge_delta``).
    """

    n: int = 1
    seed: int | None = None
    max_tokens: int | None = 16
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: str = "cumulative"
    structured_outputs: StructuredOutputsParams | None = None

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
        if self.max_tokens is not None:
            scoring_only = self.prompt_logprobs is not None
            require_int(self.max_tokens, "max_tokens", 0 if scoring_only else 1)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                require_int(getattr(self, name), name, 0)
        if self.seed is not None:
            require_int(self.seed, "seed", 0)
        self.check_sampling_values()
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ParameterError("stop must be a non-empty string or a list of them", "stop")
        if not all(is_utf8(s) for s in self.stop):
            raise ParameterError("stop strings must be valid Unicode (no lone surrogates)",
                                 "stop")
        for token in self.stop_token_ids:
            require_int(token, "stop_token_ids entry", 0)
        if self.output_kind not in OUTPUT_KINDS:
            raise ParameterError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got "
                                 f"{self.output_kind!r}", "output_kind")
        self.check_min_tokens(self.max_tokens, "max_tokens")
        if self.structured_outputs is not None and \
                not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ParameterError("structured_outputs must be a StructuredOutputsParams",
                                 "structured_outputs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes to UTF-8 (JSON's "\\ud800" decodes to a lone surrogate, which
    does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    """``prompt_logprobs``: with ``SamplingParams.prompt_logprobs``, one entry per prompt token
    (None for the first), complete in every output from the end of the prefill on."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None


def merge_delta(into: RequestOutput, delta: RequestOutput) -> None:
    """Fold a later "delta" output of the same request into ``into`` (in place): texts, token
    ids and logprobs are appended, finish reasons and ``finished`` taken from ``delta``."""
    samples = {o.index: o for o in into.outputs}
    for o in delta.outputs:
        mine = samples.get(o.index)
        if mine is None:
            into.outputs.append(o)
            continue
        mine.text += o.text
        mine.token_ids.extend(o.token_ids)
        mine.new_text += o.new_text
        mine.new_token_ids.extend(o.new_token_ids)
        if mine.logprobs is not None and o.logprobs is not None:
            mine.logprobs.extend(o.logprobs)
        mine.finish_reason, mine.stop_reason = o.finish_reason, o.stop_reason
    into.finished = delta.finished
    if delta.prompt_logprobs is not None:
        into.prompt_logprobs = delta.prompt_logprobs
