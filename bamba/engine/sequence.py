"""The engine's side of one sequence: sampled tokens, text, stop rules, streaming offsets; and
the batched call into ``bamba.sampling`` for the rows that sample in a step."""

from __future__ import annotations

import logging
from typing import Any

import torch

from bamba.engine.detok import IncrementalDetokenizer, find_stop
from bamba.engine.params import CompletionOutput, SamplingParams, TokenLogprob
from bamba.engine.scheduler import Sequence
from bamba.engine.structured import advance, mask_logits
from bamba.sampling import (SamplingBatch, choose, choose_against_draft, compute_logprobs,
                            penalized_logits, restrict_logits, token_counts)

log = logging.getLogger(__name__)
Drawn = tuple[int, TokenLogprob | None]


class SequenceOutput:
    """Output state of one sample; ``seq`` is the scheduler's record it extends."""

    def __init__(self, seq: Sequence, index: int, params: SamplingParams, max_tokens: int,
                 eos_ids: list[int], seed: int, tokenizer: object | None,
                 matcher: Any = None):
        self.seq, self.index, self.params, self.max_tokens = seq, index, params, max_tokens
        self.matcher = matcher  # the structured-output grammar's state (``engine.structured``)
        self.stop_ids = set(params.stop_token_ids) | set(eos_ids)
        self.generator = torch.Generator().manual_seed(seed)
        self.detok = None if tokenizer is None else IncrementalDetokenizer(
            tokenizer, seq.token_ids[:seq.num_prompt_tokens], params.skip_special_tokens)
        self.output_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        # Streaming holds back text that could be the start of a stop string.
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self._reported_tokens = 0
        self._reported_chars = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def may_stop(self) -> bool:
        """Whether stop ids and strings apply yet (not before ``min_tokens`` tokens)."""
        return len(self.output_ids) >= self.params.min_tokens

    def banned(self) -> list[int]:
        """The tokens this row may not take next: its stop ids before ``min_tokens``."""
        return [] if self.may_stop else sorted(self.stop_ids)

    def append(self, token: int, logprob: TokenLogprob | None, max_model_len: int) -> None:
        """Record a sampled token and apply the stop rules."""
        self.output_ids.append(token)
        self.seq.token_ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if token in self.stop_ids and self.may_stop:
            if self.params.include_stop_str_in_output:
                self._add_text(token)
            self.finish("stop", token)
            return
        self._add_text(token)
        if not self.finished:
            try:
                if advance(self.matcher, token):  # the grammar is complete
                    self.finish("stop")
            except RuntimeError:  # fails this sequence only
                log.exception("structured outputs")
                self.finish("error")
        if not self.finished and (len(self.output_ids) >= self.max_tokens
                                  or len(self.seq.token_ids) >= max_model_len):
            if self.detok is not None:
                self.detok.flush()
                self.text = self.detok.text
            self.finish("length")

    def _add_text(self, token: int) -> None:
        if self.detok is None:
            return
        start = len(self.detok.text)
        if not self.detok.add(token):
            return
        full = self.detok.text
        hit = find_stop(full, self.params.stop, start) \
            if self.params.stop and self.may_stop else None
        if hit is None:
            self.text = full
            return
        index, stop = hit
        self.text = full[:index + len(stop) if self.params.include_stop_str_in_output else index]
        self.finish("stop", stop)

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.stop_reason = reason, stop_reason

    def report(self) -> CompletionOutput:
        """What is new since the previous report, with the cumulative output too unless the
        request asked for deltas only (then text, token_ids and logprobs are the new part)."""
        visible = self.text if self.finished else \
            self.text[:max(len(self.text) - self._holdback, self._reported_chars)]
        start = self._reported_tokens
        new_text = visible[self._reported_chars:]
        new_ids = self.output_ids[start:]
        self._reported_chars, self._reported_tokens = len(visible), len(self.output_ids)
        if self.params.output_kind == "delta":
            logprobs = None if self.logprobs is None else self.logprobs[start:]
            return CompletionOutput(self.index, new_text, new_ids, self.finish_reason,
                                    self.stop_reason, logprobs, new_text, list(new_ids))
        return CompletionOutput(self.index, visible, list(self.output_ids), self.finish_reason,
                                self.stop_reason,
                                None if self.logprobs is None else list(self.logprobs),
                                new_text, new_ids)


def _plain_greedy(p: SamplingParams) -> bool:
    return p.temperature == 0 and p.repetition_penalty == 1 and p.presence_penalty == 0 and \
        p.frequency_penalty == 0 and p.logprobs is None


def sample_rows(rows: list[SequenceOutput], logits: torch.Tensor,
                vocab_size: int) -> list[Drawn | Exception]:
    """Next token (and logprobs, when asked) for each row of logits [B, V], or the exception
    that row raised: when the batch fails, each row is sampled alone, so one row's bad values
    fail that row only (every stage works row by row, so no row's values reach another)."""
    try:
        return list(_sample_batch(rows, logits, vocab_size))
    except Exception:
        log.exception("sampling %d rows together failed; sampling them one by one", len(rows))
    drawn: list[Drawn | Exception] = []
    for j, row in enumerate(rows):
        try:
            drawn.extend(_sample_batch([row], logits[j:j + 1], vocab_size))
        except Exception as exc:
            drawn.append(exc)
    return drawn


def _sample_batch(rows: list[SequenceOutput], logits: torch.Tensor,
                  vocab_size: int) -> list[Drawn]:
    params = [r.params for r in rows]
    allowed = _restricted(logits, rows)  # logprobs: from the model's own ``logits``
    if all(_plain_greedy(p) for p in params):  # what `sample` does for them, minus its set-up
        return [(t, None) for t in allowed.argmax(dim=-1).tolist()]
    batch = _sampling_batch(rows)
    tokens = choose(_penalized(allowed, rows, batch, vocab_size), batch)
    return _with_logprobs(rows, logits, tokens)


def draw_against_draft(row: SequenceOutput, logits: torch.Tensor, draft: int,
                       vocab_size: int) -> tuple[Drawn, bool]:
    """One row's token at a position whose drafted token is ``draft`` (logits [1, V]), and
    whether it is the draft: distributed as ``sample_rows`` draws it (``choose_against_draft``),
    its logprobs as asked."""
    allowed = _restricted(logits, [row])
    batch = _sampling_batch([row])
    token, agreed = choose_against_draft(_penalized(allowed, [row], batch, vocab_size), batch,
                                         draft)
    return _with_logprobs([row], logits, torch.tensor([token]))[0], agreed


def _sampling_batch(rows: list[SequenceOutput]) -> SamplingBatch:
    params = [r.params for r in rows]
    return SamplingBatch.build(
        len(rows), temperature=[p.temperature for p in params], top_k=[p.top_k for p in params],
        top_p=[p.top_p for p in params], min_p=[p.min_p for p in params],
        repetition_penalty=[p.repetition_penalty for p in params],
        presence_penalty=[p.presence_penalty for p in params],
        frequency_penalty=[p.frequency_penalty for p in params],
        generators=[r.generator for r in rows])


def _penalized(allowed: torch.Tensor, rows: list[SequenceOutput], batch: SamplingBatch,
               vocab_size: int) -> torch.Tensor:
    counts = seen = None
    if batch.any_penalty:
        counts = token_counts([r.output_ids for r in rows], vocab_size)
        seen = token_counts([r.seq.token_ids for r in rows], vocab_size) > 0
    return penalized_logits(allowed, batch, counts, seen)


def _with_logprobs(rows: list[SequenceOutput], logits: torch.Tensor, tokens: torch.Tensor
                   ) -> list[Drawn]:
    """(token, logprob) of each row: the chosen token's logprob and top ones where asked."""
    wanted = [r.params.logprobs for r in rows]
    if all(w is None for w in wanted):
        return [(t, None) for t in tokens.tolist()]
    lp = compute_logprobs(logits, tokens, max(w or 0 for w in wanted))
    out: list[Drawn] = []
    for j, (token, w) in enumerate(zip(tokens.tolist(), wanted, strict=True)):
        if w is None:
            out.append((token, None))
            continue
        top = dict(zip(lp.top_ids[j, :w].tolist(), lp.top_logprobs[j, :w].tolist(), strict=True))
        out.append((token, TokenLogprob(token, float(lp.chosen[j]), top)))
    return out


def _restricted(logits: torch.Tensor, rows: list[SequenceOutput]) -> torch.Tensor:
    """``logits`` under each row's token rules (``restrict_logits``: its stop ids banned
    before min_tokens) and its grammar's mask."""
    out = restrict_logits(logits, [r.params for r in rows], [r.banned() for r in rows])
    return mask_logits(out, [r.matcher for r in rows])


def token_logprobs(logits: torch.Tensor, targets: list[int], top_n: int) -> list[TokenLogprob]:
    """Each target token's logprob under its row of ``logits`` [n, V], with the row's top_n."""
    lp = compute_logprobs(logits, torch.tensor(targets, dtype=torch.long), top_n)
    return [TokenLogprob(t, float(c), dict(zip(ids, lps, strict=True)))
            for t, c, ids, lps in zip(targets, lp.chosen.tolist(), lp.top_ids.tolist(),
                                      lp.top_logprobs.tolist(), strict=True)]
