"""Prompt-lookup decoding: draft tokens copied from the sequence itself, checked in one pass.

When the last few tokens of a sequence occurred before (in the prompt or the output), the
tokens that followed them then are a cheap guess at what follows now: code edited in place,
quoted passages, repeated structure. Feeding the pending token and ``k`` such drafts through
the model in one forward pass yields the logits of all ``k + 1`` positions at about the cost of
one decode step (decode streams the weights once either way), and every draft the model agrees
with is a token gained. This is transformers' ``prompt_lookup_num_tokens`` and vLLM's "ngram"
speculative method; the tokens are exactly those of plain decoding (``choose_against_draft``).

A hybrid model cannot simply drop the rejected drafts from its cache as a transformer drops KV
entries: the Mamba layers fold every fed token into a fixed-size state. So before a pass with
drafts the sequence's states are checkpointed; when a draft is rejected they are restored, and
the accepted tokens are fed again at the head of the next pass (``SpeculativeRow.pending``)
rather than in a pass of their own. A pass runs its tokens as rows of one native decode step on
the sequence's state (``bamba.generation.sequence_pass``): the weights stream once, so a pass
of a few tokens costs little more than a decode step. Keys and values written for rejected
positions need no undo: attention reads only positions below the current one, and those are
written again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bamba.sampling import ParameterError, require_int

# Tokens a pass holds at most (pending ones, the last token, the drafts). Up to 8 rows the
# native step streams the weights once and gives each row the same bits as a one-row decode
# step, so greedy tokens are plain decoding's exactly; more rows take other kernels.
MAX_PASS_TOKENS = 8


@dataclass(frozen=True)
class PromptLookup:
    """Draft up to ``tokens`` tokens per step from the latest earlier occurrence of the
    sequence's last n tokens, trying n from ``max_ngram`` down to ``min_ngram``."""

    tokens: int
    min_ngram: int = 1
    max_ngram: int = 3

    def __post_init__(self) -> None:
        require_int(self.tokens, "prompt_lookup_tokens", 1)
        if self.tokens > MAX_PASS_TOKENS - 1:
            raise ParameterError(f"prompt_lookup_tokens must be at most {MAX_PASS_TOKENS - 1} "
                                 f"(a pass checks at most {MAX_PASS_TOKENS} tokens), got "
                                 f"{self.tokens}", "prompt_lookup_tokens")
        require_int(self.min_ngram, "prompt_lookup_min", 1)
        require_int(self.max_ngram, "prompt_lookup_max", 1)
        if self.min_ngram > self.max_ngram:
            raise ParameterError(f"prompt_lookup_min ({self.min_ngram}) must not exceed "
                                 f"prompt_lookup_max ({self.max_ngram})", "prompt_lookup_min")


def propose(tokens: torch.Tensor, lookup: PromptLookup, limit: int) -> list[int]:
    """Draft tokens for a sequence ``tokens`` [L] (long): what followed the latest earlier
    occurrence of its last n tokens, for the largest n in the lookup's range that occurs, at
    most ``min(lookup.tokens, limit)`` of them; [] when nothing matches."""
    length = len(tokens)
    count = min(lookup.tokens, limit)
    if count <= 0:
        return []
    for n in range(min(lookup.max_ngram, length - 1), lookup.min_ngram - 1, -1):
        # windows start at 0 .. length - n - 1: each is followed by at least one token
        windows = tokens[:-1].unfold(0, n, 1)
        found = (windows == tokens[length - n:]).all(dim=1).nonzero()
        if len(found):
            start = int(found[-1]) + n
            return tokens[start:start + count].tolist()
    return []


def draft_room(tokens_left: int, pending: int) -> int:
    """How many drafts a pass may hold: one fewer than the tokens the sequence may still
    produce (the pass decides one beyond its drafts), and within ``MAX_PASS_TOKENS`` beside
    the pending tokens."""
    return min(tokens_left - 1, MAX_PASS_TOKENS - pending)


def walk_pass(draft: list[int], decide: Callable[[int, int | None], tuple[int, bool]],
              finished: Callable[[], bool]) -> int:
    """Decide a pass's tokens in order: ``decide(i, draft token or None)`` returns (token,
    whether it is the draft) and records the token; position i < len(draft) is judged against
    draft[i], the last one (None) is the model's own. Stops at the first token that is not the
    draft or once ``finished()``. Returns how many drafts were taken."""
    agreed = 0
    for i in range(len(draft) + 1):
        _, same = decide(i, draft[i] if i < len(draft) else None)
        agreed += same
        if not same or finished():
            break
    return agreed


class TokenHistory:
    """A sequence's token ids as a tensor grown in place (what ``propose`` reads; a long
    context's list is not converted again every step)."""

    def __init__(self) -> None:
        self.tokens = torch.empty(0, dtype=torch.long)
        self.length = 0

    def extend(self, new: list[int]) -> None:
        end = self.length + len(new)
        if end > len(self.tokens):
            grown = torch.empty(max(2 * len(self.tokens), end + 256), dtype=torch.long)
            grown[:self.length] = self.tokens[:self.length]
            self.tokens = grown
        self.tokens[self.length:end] = torch.tensor(new, dtype=torch.long)
        self.length = end

    def view(self) -> torch.Tensor:
        return self.tokens[:self.length]


@dataclass
class SpeculativeRow:
    """The speculative state of the one sequence being decoded: its token history (prompt and
    output, for lookups), the tokens accepted since its Mamba states were last checkpointed and
    not yet fed again, and whether the checkpoint holds its current states."""

    history: TokenHistory = field(default_factory=TokenHistory)
    pending: list[int] = field(default_factory=list)
    checkpointed: bool = False
