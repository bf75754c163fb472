"""Structured outputs: a request's text held to a JSON schema, a regex, a choice of strings or
a Lark grammar (vLLM's ``StructuredOutputsParams``; OpenAI's ``response_format``).

Each constrained sequence owns an ``llguidance`` matcher of its grammar. Before a step samples,
the matcher's mask of the tokens that may come next sets every other logit of that row to -inf
(penalties, temperature and the filters then work on what is left, and greedy takes the best
allowed token); the drawn token then advances the matcher. EOS is allowed only where the
grammar may end, and a grammar that can take nothing more ends the sequence ("stop").
Logprobs stay those of the model's own distribution, as vLLM reports them. Grammars compile
once per distinct constraint (a cache of matchers copied for each sequence); llguidance bounds
the work of a compile and of each mask (its parser limits), so one request's grammar cannot
stall the others for long. ``llguidance`` is imported only when a request asks for this.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from bamba.sampling import ParameterError

FIELD = "structured_outputs"
CACHED_GRAMMARS = 64


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of: ``json`` (a JSON schema, as a dict or its text), ``regex``, ``choice``
    (the output is one of these strings), ``grammar`` (Lark syntax, llguidance's dialect),
    ``json_object`` (any JSON object). JSON may hold any whitespace between its tokens (as
    in vLLM) unless ``disable_any_whitespace``: then none (``,`` and ``:`` alone)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object
                                                       else [])
        if len(given) != 1:
            raise ParameterError(f"{FIELD}: give exactly one of json, regex, choice, grammar, "
                                 f"json_object (got {', '.join(given) or 'none'})", FIELD)
        for name, kind in (("json", (dict, str)), ("regex", str), ("grammar", str)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ParameterError(f"{FIELD}.{name} has the wrong type "
                                     f"({type(value).__name__})", FIELD)
        if self.choice is not None:
            if not (isinstance(self.choice, (list, tuple)) and self.choice and
                    all(isinstance(c, str) and c for c in self.choice)):
                raise ParameterError(f"{FIELD}.choice must be a non-empty list of non-empty "
                                     "strings", FIELD)
            object.__setattr__(self, "choice", tuple(self.choice))

    def grammar_text(self) -> str:
        """The constraint as an llguidance grammar (unchecked: compiling checks it)."""
        from llguidance import LLMatcher

        options = {"whitespace_flexible": not self.disable_any_whitespace}
        if self.json is not None:
            schema = json.loads(self.json) if isinstance(self.json, str) else self.json
            return LLMatcher.grammar_from_json_schema(schema, defaults=options)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:  # JSON string literals are Lark's
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in self.choice))
        return LLMatcher.grammar_from_lark(self.grammar)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


class GrammarCompiler:
    """Matchers for one tokenizer and vocabulary: ``matcher(params)`` compiles a constraint
    (cached) and returns a fresh copy at its start; thread-safe, so a server may compile off
    the engine's thread first."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]):
        self._source, self.vocab_size, self._stop_ids = tokenizer, vocab_size, stop_ids
        self._tokenizer: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _ll_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from llguidance import LLTokenizer

            backend = self._source.backend
            self._tokenizer = LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                          eos_token=self._stop_ids)
        return self._tokenizer

    def matcher(self, params: StructuredOutputsParams) -> Any:
        """A matcher at the start of ``params``' grammar; ParameterError (one line) when the
        schema, regex or grammar does not compile."""
        try:
            from llguidance import LLMatcher
        except ImportError:
            raise ParameterError(f"{FIELD} needs the llguidance package (pip install "
                                 "'bamba[serve]')", FIELD) from None
        try:
            text = params.grammar_text()
        except (ValueError, TypeError) as exc:  # a schema that is not JSON
            raise ParameterError(f"{FIELD}: {_one_line(str(exc))}", FIELD) from None
        with self._lock:
            prototype = self._cache.get(text)
            if prototype is not None:
                self._cache.move_to_end(text)
                return prototype.deep_copy()
            tokenizer = self._ll_tokenizer()
        # Compiled outside the lock (llguidance lets go of the GIL meanwhile): a long compile
        # for one request never holds up another thread's cached constraint.
        prototype = LLMatcher(tokenizer, text, log_level=0)
        if prototype.is_error():
            raise ParameterError(f"{FIELD}: {_one_line(prototype.get_error())}", FIELD)
        with self._lock:
            self._cache[text] = prototype
            if len(self._cache) > CACHED_GRAMMARS:
                self._cache.popitem(last=False)
            return prototype.deep_copy()


def advance(matcher: Any, token: int) -> bool:
    """Feed a row's drawn token to its matcher (None: no constraint); True when the grammar is
    then complete. RuntimeError if the matcher refuses it: the mask allowed it, so only a
    bug can."""
    if matcher is None:
        return False
    if not matcher.consume_token(token):
        raise RuntimeError(f"{FIELD}: {_one_line(matcher.get_error())}")
    return matcher.is_stopped()


def mask_logits(logits: torch.Tensor, matchers: list[Any]) -> torch.Tensor:
    """``logits`` [B, V] with every token a row's matcher (None: no constraint) does not allow
    next set to -inf; the input itself when no row has a matcher. ParameterError when a
    matcher cannot go on (its grammar went past llguidance's limits)."""
    rows = [(m, j) for j, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    batch, vocab = logits.shape
    words = (vocab + 31) // 32
    bitmask = torch.full((batch, words), -1, dtype=torch.int32)
    _executor().unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), words * 4, batch)
    for matcher, _ in rows:
        if matcher.is_error():
            raise ParameterError(f"{FIELD}: {_one_line(matcher.get_error())}", FIELD)
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(batch, -1)[:, :vocab].bool()
    return logits.masked_fill(~allowed, float("-inf"))


@functools.cache
def _executor() -> Any:
    """One llguidance executor for the process: its threads compute a step's masks together
    (between the model's passes, so they take the cores the model's threads leave idle)."""
    from llguidance import LLExecutor

    return LLExecutor(num_threads=max(1, torch.get_num_threads()))
