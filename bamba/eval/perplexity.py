"""Perplexity of a causal LM on documents, overall and by position along them.

Long documents are scored with a sliding window, as transformers' perplexity guide does: windows
of at most ``context`` tokens start every ``stride`` tokens, and each window scores only the
tokens the previous one did not reach, so a token is scored once, from up to ``context`` - 1
tokens of history. With ``stride == context`` the windows do not overlap and the first token of
each window, having no history in it, is not scored (nor is a document's first token ever).

Losses are summed per position in the document, in float64, so the overall figure and every
position bucket are token-weighted means: each scored token counts once, whatever document or
window it came from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LOGITS_ROWS = 1024  # positions sent through the LM head at once (bounds [rows, vocab] logits)


@dataclass(frozen=True)
class Window:
    """Input tokens [begin, end) of document ``doc``; tokens [first, end) are scored."""

    doc: int
    begin: int
    end: int
    first: int


def windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) of each window over a document of ``length`` tokens."""
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    spans, scored_to = [], 0
    for begin in range(0, length, stride):
        end = min(begin + context, length)
        first = max(scored_to, begin + 1)
        if first < end:
            spans.append((begin, end, first))
        scored_to = end
        if end == length:
            break
    return spans


@torch.no_grad()
def window_losses(model: Any, token_rows: Sequence[Sequence[int]], firsts: Sequence[int]
                  ) -> list[torch.Tensor]:
    """Per-token negative log-likelihoods (float32) of tokens [first, len(row)) of each row,
    each predicted from the tokens before it in its row. Rows of different lengths run as one
    right-padded batch (a causal model's earlier positions never see the padding)."""
    width = max(len(row) for row in token_rows)
    ids = torch.zeros(len(token_rows), width, dtype=torch.long, device=model.device)
    for i, row in enumerate(token_rows):
        ids[i, :len(row)] = torch.as_tensor(np.asarray(row, dtype=np.int64))
    hidden = model.hidden_states(ids)
    losses = []
    for i, (row, first) in enumerate(zip(token_rows, firsts, strict=True)):
        states, targets = hidden[i, first - 1:len(row) - 1], ids[i, first:len(row)]
        losses.append(torch.cat([
            F.cross_entropy(model.logits(states[s:s + LOGITS_ROWS]).float(),
                            targets[s:s + LOGITS_ROWS], reduction="none")
            for s in range(0, len(targets), LOGITS_ROWS)]))
    return losses


@dataclass
class PositionLosses:
    """Sum of losses and count of scored tokens at each position of a document (0-based)."""

    sums: np.ndarray
    counts: np.ndarray

    @classmethod
    def zeros(cls, length: int) -> "PositionLosses":
        return cls(np.zeros(length, dtype=np.float64), np.zeros(length, dtype=np.int64))

    def add(self, first: int, losses: np.ndarray) -> None:
        self.sums[first:first + len(losses)] += losses
        self.counts[first:first + len(losses)] += 1


def bucket_edges(length: int, buckets: int) -> list[int]:
    """Boundaries of up to ``buckets`` equal ranges over the scored positions [1, length)."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    return sorted({round(x) for x in np.linspace(1, max(length, 2), buckets + 1)})


def _mean(total: float, tokens: int) -> dict[str, Any]:
    nll = total / tokens if tokens else None
    return {"tokens": int(tokens), "nll": nll,
            "perplexity": math.exp(nll) if nll is not None else None}


def summarize(losses: PositionLosses, buckets: int) -> dict[str, Any]:
    """The token-weighted mean loss and perplexity overall and per position bucket."""
    edges = bucket_edges(len(losses.sums), buckets)
    by_bucket = [{"start": start, "end": end,
                  **_mean(float(losses.sums[start:end].sum()), int(losses.counts[start:end].sum()))}
                 for start, end in zip(edges[:-1], edges[1:])]
    return {**_mean(float(losses.sums.sum()), int(losses.counts.sum())), "buckets": by_bucket}


def plan_windows(documents: Sequence[Sequence[int]], context: int, stride: int) -> list[Window]:
    """Every window of every document, longest first (batches then pad little)."""
    spans = [Window(d, *span) for d, doc in enumerate(documents)
             for span in windows(len(doc), context, stride)]
    return sorted(spans, key=lambda w: w.end - w.begin, reverse=True)


def check_options(context: int, stride: int | None, buckets: int, batch_size: int) -> int:
    """The stride to use (None: ``context``); ValueError naming the first bad value."""
    stride = context if stride is None else stride
    windows(0, context, stride)
    bucket_edges(2, buckets)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return stride


def perplexity(model: Any, documents: Sequence[Sequence[int]], context: int,
               stride: int | None = None, buckets: int = 8, batch_size: int = 4
               ) -> dict[str, Any]:
    """Token-weighted NLL and perplexity of ``documents`` (token ids) overall and by position
    bucket; ``stride`` None means non-overlapping windows (``stride == context``)."""
    stride = check_options(context, stride, buckets, batch_size)
    plan = plan_windows(documents, context, stride)
    if not plan:
        raise ValueError("nothing to score: every document has fewer than 2 tokens")
    totals = PositionLosses.zeros(max(len(doc) for doc in documents))
    report_every = max(1, len(plan) // 10)
    for start in range(0, len(plan), batch_size):
        batch = plan[start:start + batch_size]
        rows = [documents[w.doc][w.begin:w.end] for w in batch]
        losses = window_losses(model, rows, [w.first - w.begin for w in batch])
        for window, loss in zip(batch, losses):
            totals.add(window.first, loss.double().cpu().numpy())
        done = min(start + batch_size, len(plan))
        if done // report_every != start // report_every or done == len(plan):
            log.info("perplexity: %d/%d windows", done, len(plan))
    scored = {w.doc for w in plan}
    return {"documents": len(scored), "context": context, "stride": stride,
            **summarize(totals, buckets)}
