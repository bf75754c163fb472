"""Log-probabilities of token spans under a model, batched: the requests are sorted by length,
right-padded into batches of equal width and run through one forward each. Causal layers
(attention, the Mamba scan and its convolution) never look right, so the padding after a row
changes none of its scores; only the positions scored go through the LM head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn


class SpanScore(NamedTuple):
    """Sum of the span's token log-probabilities, and whether each token was the argmax."""

    logprob: float
    greedy: bool


def span_score(logits: torch.Tensor, targets: torch.Tensor) -> SpanScore:
    """The score of ``targets`` [n] under the ``logits`` [n, V] that predict them."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, targets[:, None]).squeeze(1)
    return SpanScore(float(chosen.sum()), bool((logits.argmax(dim=-1) == targets).all()))


def check_span(tokens: Sequence[int], first: int, max_length: int) -> None:
    """ValueError unless ``tokens[first:]`` can be scored in one window of ``max_length``."""
    if not 1 <= first < len(tokens):
        raise ValueError(f"a scored span must start after the first token and end by the "
                         f"last: first={first}, {len(tokens)} tokens")
    if len(tokens) - 1 > max_length:
        raise ValueError(f"a scored window has {len(tokens) - 1} input tokens; the model "
                         f"takes {max_length}")


@torch.inference_mode()
def score_spans(model: nn.Module, spans: Sequence[tuple[Sequence[int], int]],
                batch_size: int, max_length: int) -> list[SpanScore]:
    """For each ``(tokens, first)``: log p(tokens[first:] | the tokens before each), from one
    pass over ``tokens[:-1]`` (at most ``max_length`` tokens). ``model`` is a ``BambaLM``
    (``hidden_states`` and ``lm_head``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for tokens, first in spans:
        check_span(tokens, first, max_length)
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i][0]))
    scores: list[SpanScore | None] = [None] * len(spans)
    device = next(model.parameters()).device
    for begin in range(0, len(order), batch_size):
        batch = order[begin:begin + batch_size]
        width = len(spans[batch[0]][0]) - 1
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            inputs = spans[i][0][:-1]
            ids[row, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        hidden = model.hidden_states(ids.to(device))
        for row, i in enumerate(batch):
            tokens, first = spans[i]
            logits = model.logits(hidden[row, first - 1:len(tokens) - 1])
            targets = torch.tensor(tokens[first:], dtype=torch.long, device=device)
            scores[i] = span_score(logits, targets)
    return [s for s in scores if s is not None]
