"""Prompt-lookup decoding in the engine, while one sequence runs alone (one user of a server).

The drafts, their check and the undoing of a rejection are those of ``bamba.speculative``: the
pending tokens (the last sampled one, and accepted ones not yet in the cache) and up to k
drafts run as rows of one native call on the sequence's state slot; the slot's state is first
copied to a spare slot and copied back after a rejection, and the sequence's cache then ends
where it began: its accepted tokens are pending, and the next step (this one again, or the
scheduler's chunk) feeds them. KV written for rejected positions is never read (attention reads
below the current position) and the prefix cache names only blocks that are computed.
With more than one sequence running, or none to draft, the engine steps as usual.
"""

from __future__ import annotations

from typing import Any

import torch

from bamba.engine.scheduler import ScheduledChunk, Sequence
from bamba.engine.sequence import draw_against_draft, sample_rows
from bamba.speculative import PromptLookup, TokenHistory, draft_room, propose, walk_pass

METHOD = "ngram"


def lookup_from_config(config: dict[str, Any] | None) -> PromptLookup | None:
    """vLLM's ``speculative_config`` for its n-gram method: {"method": "ngram",
    "num_speculative_tokens": k, "prompt_lookup_max": 3, "prompt_lookup_min": 1}."""
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"speculative_config must be a mapping, got {type(config).__name__}")
    known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"speculative_config: unknown field(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known))}")
    if config.get("method", METHOD) != METHOD:
        raise ValueError(f"speculative_config: method {config['method']!r} is not served; "
                         f"only {METHOD!r} (prompt lookup)")
    if "num_speculative_tokens" not in config:
        raise ValueError("speculative_config needs num_speculative_tokens")
    return PromptLookup(config["num_speculative_tokens"], config.get("prompt_lookup_min", 1),
                        config.get("prompt_lookup_max", 3))


class History:
    """The token ids of the sequence drafted for (``TokenHistory``), following it from step to
    step and starting again for another sequence."""

    def __init__(self) -> None:
        self.seq_id: int | None = None
        self.tokens = TokenHistory()

    def of(self, seq: Sequence) -> torch.Tensor:
        if seq.seq_id != self.seq_id or len(seq.token_ids) < self.tokens.length:
            self.seq_id, self.tokens = seq.seq_id, TokenHistory()
        self.tokens.extend(seq.token_ids[self.tokens.length:])
        return self.tokens.view()


def lookup_step(llm: Any) -> list[Any] | None:
    """One step of the lone running sequence with drafts: the requests it changed, or None
    when there is nothing to draft (or no room to), and the engine should step as usual."""
    seq = llm.scheduler.lone_decoder()
    if seq is None:
        return None
    owner = llm._seq_owner[seq.seq_id]
    row = owner.seqs_by_id(seq.seq_id)
    pending = seq.token_ids[seq.num_computed:]
    room = draft_room(min(row.max_tokens - len(row.output_ids),
                          llm.max_model_len - len(seq.token_ids)), len(pending))
    draft = propose(llm.lookup_history.of(seq), llm.lookup, room) if room > 0 else []
    if not draft:
        return None
    spare = llm.slots.allocate(1)
    if spare is None:
        return None
    try:
        fed = pending + draft
        if not llm.scheduler.reserve(seq, len(fed)):
            return None
        llm.runner.copy_state(seq.slot, spare[0])
        chunk = ScheduledChunk(seq.seq_id, fed, seq.num_computed, list(seq.block_ids), seq.slot,
                               reset_state=False, restore_from=None, snapshot_to=None,
                               sample=True, num_prompt_tokens=seq.num_prompt_tokens)
        try:
            logits = llm.runner.verify_rows(chunk, len(draft) + 1)
            if logits is None:  # the native call cannot run: nothing changed
                return None
            agreed = _decide(llm, row, logits, draft)
        except Exception:  # as a failed step: this sequence fails, the engine goes on
            llm.runner.copy_state(spare[0], seq.slot)
            return llm._fail([seq.seq_id])
        llm.draft_tokens += len(draft)
        llm.accepted_draft_tokens += agreed
        if row.finished:
            llm._drop(seq.seq_id)
        elif agreed == len(draft):  # every fed token stands
            llm.scheduler.computed(seq, len(fed))
        else:  # back to where the cache began; the tokens that stand are pending
            llm.runner.copy_state(spare[0], seq.slot)
        return [owner]
    finally:
        llm.slots.release(spare)


def _decide(llm: Any, row: Any, logits: torch.Tensor, draft: list[int]) -> int:
    """Append the tokens the pass decides (the drafts the model agrees with, then one of its
    own) to ``row``; how many drafts it took."""
    vocab = llm.config.vocab_size

    def decide(i: int, drafted: int | None) -> tuple[int, bool]:
        if drafted is None:
            drawn = sample_rows([row], logits[i:i + 1], vocab)[0]
            if isinstance(drawn, Exception):
                raise drawn
            (token, logprob), same = drawn, False
        else:
            (token, logprob), same = draw_against_draft(row, logits[i:i + 1], drafted, vocab)
        row.append(token, logprob, llm.max_model_len)
        return token, same

    return walk_pass(draft, decide, lambda: row.finished)
