"""Plain generation with the contiguous hybrid cache: one cache row per prompt.

Each prompt is prefilled alone into its own row (prompts differ in length; only the last
position's logits are computed), then all unfinished rows decode together, one token per step,
each at its own position. A row that stops (EOS or its length limit) leaves the decode batch.
The serving engine (``bamba.engine``) does continuous batching; this is the simple, exact path
behind ``bamba generate`` and the reference the engine is tested against.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bamba.cache import ContiguousCache
from bamba.config import context_hint
from bamba.engine.structured import (GrammarCompiler, StructuredOutputsParams, advance,
                                    mask_logits)
from bamba.generation_defaults import GenerationDefaults, stop_token_ids
from bamba.model import BambaLM
from bamba.native import NativeStepUnavailable, accelerate, decode_rows, steady_weights
from bamba.sampling import (ParameterError, SamplingBatch, SamplingValues, choose,
                            choose_against_draft, penalized_logits, require_int,
                            restrict_logits, token_counts)
from bamba.speculative import PromptLookup, SpeculativeRow, draft_room, propose, walk_pass


@dataclass
class GenerationConfig(SamplingValues):
    """How to continue prompts. temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 switch
    those filters off; penalties at their neutral values (1, 0, 0) do nothing, and follow the
    engine's ``SamplingParams`` (repetition over prompt and output, presence and frequency over
    the output). With a seed, prompt i samples from its own generator seeded ``seed + i``.
    eos_token_ids None means the model's: its config's EOS ids and its generation defaults'.
    ``for_model`` fills what the caller leaves out from the checkpoint's generation_config.json
    (``bamba.generation_defaults``); a GenerationConfig built directly takes none of it.
    logit_bias, allowed_token_ids and min_tokens: see ``SamplingValues``; structured_outputs
    (a JSON schema, regex, choice or grammar: ``bamba.engine.structured``) needs the
    tokenizer passed to ``generate``. prompt_lookup_tokens > 0 drafts that many tokens a step
    from the sequence's own n-grams (``bamba.speculative``; min/max: the n-gram sizes tried)
    while a single sequence decodes; the tokens are those plain decoding gives."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None
    eos_token_ids: list[int] | None = None
    ignore_eos: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    prompt_lookup_tokens: int = 0
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3

    def __post_init__(self) -> None:
        require_int(self.max_new_tokens, "max_new_tokens", 1)
        self.check_sampling_values()
        self.check_min_tokens(self.max_new_tokens, "max_new_tokens")
        if self.structured_outputs is not None and \
                not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ParameterError("structured_outputs must be a StructuredOutputsParams",
                                 "structured_outputs")
        if self.seed is not None:
            require_int(self.seed, "seed", -2**63)
        if self.eos_token_ids is not None:
            for token in self.eos_token_ids:
                require_int(token, "eos_token_ids entry", 0)
            self.eos_token_ids = list(self.eos_token_ids)
        require_int(self.prompt_lookup_tokens, "prompt_lookup_tokens", 0)
        self.prompt_lookup  # validates the n-gram range

    @property
    def prompt_lookup(self) -> PromptLookup | None:
        """The prompt-lookup drafting asked for, or None."""
        if self.prompt_lookup_tokens == 0:
            return None
        return PromptLookup(self.prompt_lookup_tokens, self.prompt_lookup_min,
                            self.prompt_lookup_max)

    @classmethod
    def for_model(cls, model: BambaLM, **given: Any) -> GenerationConfig:
        """The values ``given``, else the model's generation defaults, else this class's."""
        return cls.from_defaults(model.generation_defaults, **given)

    @classmethod
    def from_defaults(cls, defaults: GenerationDefaults, **given: Any) -> GenerationConfig:
        """The values ``given``, else ``defaults``', else this class's."""
        return cls(**{**defaults.to_dict(), **given})

    def sampling_batch(self, rows: int) -> SamplingBatch:
        seeds = None if self.seed is None else [self.seed + i for i in range(rows)]
        return SamplingBatch.build(rows, temperature=self.temperature, top_k=self.top_k,
                                   top_p=self.top_p, min_p=self.min_p,
                                   repetition_penalty=self.repetition_penalty,
                                   presence_penalty=self.presence_penalty,
                                   frequency_penalty=self.frequency_penalty, seeds=seeds)


@dataclass
class GenerationResult:
    """One prompt's continuation and how long it took.

    The first new token comes from the prefill's logits, so decode_steps is len(token_ids) - 1;
    decode_seconds is the wall time of the batched steps this row took part in.
    """

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (an EOS id) or "length" (max_new_tokens)
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    draft_tokens: int = 0  # prompt-lookup drafts checked, and how many the model agreed with
    accepted_draft_tokens: int = 0

    @property
    def decode_steps(self) -> int:
        return max(len(self.token_ids) - 1, 0)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _check_prompts(model: BambaLM, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    cfg = model.config
    if not prompts:
        raise ValueError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
        if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
        if len(prompt) + max_new_tokens > cfg.context_length:
            raise ValueError(f"prompt {i} ({len(prompt)} tokens) + max_new_tokens "
                             f"({max_new_tokens}) exceeds the model's context of "
                             f"{cfg.context_length} tokens{context_hint(cfg)}")


DecodeStep = Callable[[torch.Tensor, torch.Tensor, ContiguousCache], torch.Tensor]
"""(tokens [B, 1], positions [B, 1], cache bound to all its rows) -> next-token logits [B, V];
e.g. ``bamba.compile.CompiledDecode``."""


class _Batch:
    """The decode state of one ``generate`` call: cache rows, positions, sampling, results."""

    def __init__(self, model: BambaLM, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                 decode_step: DecodeStep | None = None, tokenizer: Any = None):
        _check_prompts(model, prompts, config.max_new_tokens)
        config.check_token_ids_fit(model.config.vocab_size)
        self.model, self.config, self.prompts = accelerate(model), config, prompts
        self.decode_step = decode_step
        eos = stop_token_ids(model.config, model.generation_defaults) \
            if config.eos_token_ids is None else config.eos_token_ids
        self.stop_ids = frozenset() if config.ignore_eos else frozenset(eos)
        self.matchers = _matchers(config, len(prompts), tokenizer, model.config.vocab_size,
                                  sorted(self.stop_ids))
        self.cache = ContiguousCache(model.config, len(prompts),
                                     max(len(p) for p in prompts) + config.max_new_tokens,
                                     model.dtype, device=model.device)
        self.sampling = config.sampling_batch(len(prompts))
        self.results = [GenerationResult(prompt_tokens=len(p)) for p in prompts]
        # Penalty state per row: output token counts and "seen in prompt or output".
        vocab = model.config.vocab_size
        self._counts = self._seen = None
        if self.sampling.any_penalty:
            self._counts = torch.zeros(len(prompts), vocab, device=model.device)
            self._seen = token_counts(prompts, vocab, model.device) > 0
        # Decode inputs of the active rows, kept between steps (rebuilt when a row leaves).
        self.active: list[int] = []
        self._rows_sampling = self.sampling
        self._last = self._positions = torch.empty(0, 1, dtype=torch.long)
        self.lookup = config.prompt_lookup
        self._speculative: SpeculativeRow | None = None  # made when one row is left decoding

    def _accept(self, row: int, token: int) -> None:
        result = self.results[row]
        result.token_ids.append(token)
        if self._counts is not None:
            self._counts[row, token] += 1
            self._seen[row, token] = True
        if token in self.stop_ids and len(result.token_ids) >= self.config.min_tokens:
            result.finish_reason = "stop"
        elif advance(self.matchers[row], token):  # the grammar is complete
            result.finish_reason = "stop"
        elif len(result.token_ids) >= self.config.max_new_tokens:
            result.finish_reason = "length"

    def _penalized(self, logits: torch.Tensor, rows: list[int], sampling: SamplingBatch
                   ) -> torch.Tensor:
        """The rows' logits with the token rules, structured-output masks and penalties of
        where each row stands now."""
        early = [len(self.results[r].token_ids) < self.config.min_tokens for r in rows]
        logits = restrict_logits(logits, [self.config] * len(rows),
                                 [sorted(self.stop_ids) if e else [] for e in early])
        logits = mask_logits(logits, [self.matchers[r] for r in rows])
        if self._counts is None:
            return penalized_logits(logits, sampling)
        return penalized_logits(logits, sampling, self._counts[rows], self._seen[rows])

    def _sample(self, logits: torch.Tensor, rows: list[int], sampling: SamplingBatch
                ) -> torch.Tensor:
        return choose(self._penalized(logits, rows, sampling), sampling)

    def prefill(self, row: int) -> int:
        """Run prompt ``row`` into its cache row; return its first new token."""
        start = time.perf_counter()
        ids = torch.tensor([list(self.prompts[row])], dtype=torch.long, device=self.model.device)
        logits = self.model(ids, cache=self.cache.bind([row]), logits_to_keep=1)[:, -1]
        token = int(self._sample(logits, [row], self.sampling.select([row]))[0])
        self.results[row].prefill_seconds = time.perf_counter() - start
        self._accept(row, token)
        return token

    def _set_active(self, rows: list[int]) -> None:
        """Bind the cache and rebuild the decode inputs for these rows."""
        self.active = rows
        self._rows_sampling = self.sampling.select(rows) if rows else self.sampling
        self.cache.bind(rows)
        device = self.model.device
        self._last = torch.tensor([[self.results[r].token_ids[-1]] for r in rows], device=device)
        self._positions = torch.tensor(
            [[len(self.prompts[r]) + len(self.results[r].token_ids) - 1] for r in rows],
            device=device)

    def step(self) -> list[tuple[int, int]]:
        """One decode step for every active row: [(row, token)] in row order."""
        start = time.perf_counter()
        rows = self.active
        if self.decode_step is not None and len(rows) == len(self.prompts):
            logits = self.decode_step(self._last, self._positions, self.cache)
        else:
            logits = self.model(self._last, positions=self._positions, cache=self.cache)[:, -1]
        next_tokens = self._sample(logits, rows, self._rows_sampling)
        tokens = next_tokens.tolist()
        elapsed = time.perf_counter() - start
        for r, token in zip(rows, tokens, strict=True):
            self.results[r].decode_seconds += elapsed
            self._accept(r, token)
        still = [r for r in rows if self.results[r].finish_reason is None]
        if still == rows:
            self._last = next_tokens[:, None]
            self._positions = self._positions + 1
        else:
            self._set_active(still)
        return list(zip(rows, tokens, strict=True))

    def speculative_step(self) -> list[tuple[int, int]]:
        """One pass for the single decoding row with prompt-lookup drafts: [(row, token)] for
        the tokens it decides (those of the drafts the model agrees with, then one of its
        own). Without a draft or tokens pending, a plain ``step``."""
        row = self.active[0]
        result = self.results[row]
        if self._speculative is None:
            self._speculative = SpeculativeRow()
            self._speculative.history.extend([*self.prompts[row], *result.token_ids])
        spec = self._speculative
        start = time.perf_counter()
        room = draft_room(self.config.max_new_tokens - len(result.token_ids),
                          len(spec.pending) + 1)
        draft = propose(spec.history.view(), self.lookup, room)
        if not draft and not spec.pending:
            spec.checkpointed = False  # the step advances the states past the checkpoint
            decided = self.step()
            spec.history.extend([token for _, token in decided])
            return decided
        if draft and not spec.checkpointed:
            self.cache.checkpoint_states(row)
            spec.checkpointed = True
        fed = spec.pending + [result.token_ids[-1]] + draft
        first = len(self.prompts[row]) + len(result.token_ids) - 1 - len(spec.pending)
        logits = sequence_pass(self.model, self.cache, row, fed, first, len(draft) + 1)
        decided: list[int] = []

        def decide(i: int, drafted: int | None) -> tuple[int, bool]:
            scores = self._penalized(logits[i:i + 1], [row], self._rows_sampling)
            token, same = (int(choose(scores, self._rows_sampling)[0]), False) \
                if drafted is None else \
                choose_against_draft(scores, self._rows_sampling, drafted)
            self._accept(row, token)
            decided.append(token)
            return token, same

        agreed = walk_pass(draft, decide, lambda: result.finish_reason is not None)
        result.draft_tokens += len(draft)
        result.accepted_draft_tokens += agreed
        if agreed == len(draft):  # every fed token stands: the states are current
            spec.pending, spec.checkpointed = [], False
        else:  # back to the checkpoint; the fed tokens that stand go in again next pass
            self.cache.restore_states(row)
            spec.pending = fed[:len(spec.pending) + 1 + agreed]
        spec.history.extend(decided)
        result.decode_seconds += time.perf_counter() - start
        self._set_active([row] if result.finish_reason is None else [])
        return [(row, token) for token in decided]

    def run(self) -> Iterator[tuple[int, int]]:
        """Prefill every prompt, then decode until all rows stop: yields (row, token)."""
        for row in range(len(self.prompts)):
            yield row, self.prefill(row)
        self._set_active([r for r, res in enumerate(self.results) if res.finish_reason is None])
        while self.active:
            if self.lookup is not None and len(self.active) == 1:
                yield from self.speculative_step()
            else:
                yield from self.step()


def sequence_pass(model: BambaLM, cache: ContiguousCache, row: int, tokens: list[int],
                  first: int, keep: int, as_rows: bool = True) -> torch.Tensor:
    """Logits [keep, V] of the last ``keep`` of ``tokens``, one sequence's (cache row ``row``)
    from position ``first`` on, its states advanced past them all. As rows of one native step
    on the row's state where it runs (the weights stream once and the state advances token by
    token: about a decode step's cost; ``as_rows`` False skips it), else one forward pass over
    the tokens (a prefill's cost)."""
    device = model.device
    ids = torch.tensor(tokens, device=device)
    positions = torch.arange(first, first + len(tokens), device=device)
    if as_rows and len(tokens) <= decode_rows(model):
        try:
            hidden = model.hidden_states(ids[:, None], positions=positions[:, None],
                                         cache=cache.bind([row] * len(tokens)))
            return model.logits(hidden[-keep:, -1])
        except NativeStepUnavailable:  # raised before any state changed
            pass
    return model(ids[None], positions=positions[None], cache=cache.bind([row]),
                 logits_to_keep=keep)[0]


def _matchers(config: GenerationConfig, rows: int, tokenizer: Any, vocab_size: int,
              stop_ids: list[int]) -> list[Any]:
    """A structured-output matcher for each row (None each without a constraint)."""
    if config.structured_outputs is None:
        return [None] * rows
    if tokenizer is None:
        raise ParameterError("structured_outputs needs the tokenizer: generate(..., "
                             "tokenizer=...)", "structured_outputs")
    grammars = GrammarCompiler(tokenizer, vocab_size, stop_ids)
    return [grammars.matcher(config.structured_outputs) for _ in range(rows)]


@torch.inference_mode()
def generate(model: BambaLM, prompts: Sequence[Sequence[int]],
             config: GenerationConfig | None = None,
             decode_step: DecodeStep | None = None, tokenizer: Any = None
             ) -> list[GenerationResult]:
    """Continue each prompt (a list of token ids); one result per prompt, in order. The
    native kernels are installed on ``model`` first (``bamba.native.accelerate``). No
    ``config``: ``GenerationConfig.for_model(model)`` (its checkpoint's defaults).

    decode_step: an optional replacement for the eager decode forward (e.g. a compiled one),
    used while every row of the batch is still decoding. tokenizer: what a config's
    structured_outputs compile against.
    """
    batch = _Batch(model, prompts, config or GenerationConfig.for_model(model),
                   decode_step, tokenizer)
    with steady_weights():
        for _ in batch.run():
            pass
    return batch.results


class GenerationStream:
    """Tokens of one prompt as they are decoded; ``result`` is complete once iteration ends.

    for token in (stream := GenerationStream(model, ids, config)): ...
    """

    def __init__(self, model: BambaLM, prompt: Sequence[int],
                 config: GenerationConfig | None = None, decode_step: DecodeStep | None = None,
                 tokenizer: Any = None):
        self._batch = _Batch(model, [prompt], config or GenerationConfig.for_model(model),
                             decode_step, tokenizer)
        self.result = self._batch.results[0]
        self._ended = False
        self._yielded = 0

    def finish(self, reason: str = "stop") -> None:
        """End early with this finish reason (e.g. the caller found a stop string in the
        text): iteration ends before the next decode step."""
        self._ended = True
        del self.result.token_ids[self._yielded:]  # a pass may decide tokens not yet taken
        if self.result.finish_reason is None:
            self.result.finish_reason = reason

    def __iter__(self) -> Iterator[int]:
        # inference_mode must cover each resumption of the generator, not only its creation
        steps = self._batch.run()
        while not self._ended:
            with torch.inference_mode():
                item = next(steps, None)
            if item is None:
                return
            self._yielded += 1
            yield item[1]
