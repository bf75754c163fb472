"""Prompt-lookup decoding in the engine, while every running sequence decodes.

The drafts, their check and the undoing of a rejection are those of ``bamba.speculative``.
When nothing waits and every running sequence has its prompt in the cache, each one's pending
tokens (the last sampled one, and accepted ones not yet in the cache) and its drafts run as
rows of one native call, at most ``MAX_PASS_TOKENS`` rows in all (the rows the few-row kernels
give the bits of a one-row step; the sequences share what the pending tokens leave).

A drafting sequence's rows run on a spare state slot, their first row reading the sequence's
state from its own slot (the native call copies it in as it reads it; no pass of its own over
the state). When every draft stands, the spare becomes the sequence's slot; after a rejection
the spare is dropped and the cache ends where it began: the accepted tokens are pending, and
the next step (this one again, or the scheduler's chunk) feeds them. KV written for rejected
positions is never read (attention reads below the current position) and the prefix cache
names only blocks that are computed. Otherwise the engine steps as usual.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from bamba.engine.scheduler import ScheduledChunk, Sequence
from bamba.engine.sequence import draw_against_draft, sample_rows
from bamba.speculative import (MAX_PASS_TOKENS, PromptLookup, TokenHistory, draft_room, propose,
                               walk_pass)

log = logging.getLogger(__name__)
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


def drafters(max_num_seqs: int) -> int:
    """How many sequences one pass can draft for (each takes two rows at least): the spare
    slots the pool plan reserves for their passes."""
    return min(max_num_seqs, MAX_PASS_TOKENS // 2)


class Histories:
    """The token ids of the sequences drafted for (a ``TokenHistory`` each), following them
    from step to step; those no longer running are forgotten."""

    def __init__(self) -> None:
        self._of: dict[int, TokenHistory] = {}

    def of(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        kept = {}
        for seq in seqs:
            tokens = self._of.get(seq.seq_id)
            if tokens is None or len(seq.token_ids) < tokens.length:
                tokens = TokenHistory()
            tokens.extend(seq.token_ids[tokens.length:])
            kept[seq.seq_id] = tokens
        self._of = kept
        return [kept[seq.seq_id].view() for seq in seqs]


def lookup_step(llm: Any) -> list[Any] | None:
    """One step of the running sequences with drafts: the requests it changed, or None when
    there is nothing to draft (or no room to), and the engine should step as usual."""
    seqs = llm.scheduler.decoders()
    if not seqs:
        return None
    rows = [llm._seq_owner[seq.seq_id].seqs_by_id(seq.seq_id) for seq in seqs]
    pending = [seq.token_ids[seq.num_computed:] for seq in seqs]
    drafts = plan_drafts(llm, seqs, rows, pending)
    drafting = [i for i, draft in enumerate(drafts) if draft]
    if not drafting:
        return None
    spares = _spare_slots(llm.slots, len(drafting))
    if not spares:
        return None
    for i in drafting[len(spares):]:  # no slot for its pass: it decodes plainly
        drafts[i] = []
    spare_of = dict(zip(drafting, spares))
    try:
        return _check(llm, seqs, rows, pending, drafts, spare_of)
    finally:
        llm.slots.release(list(spare_of.values()))


def _spare_slots(pool: Any, wanted: int) -> list[int]:
    """Up to ``wanted`` slots for passes (the plan reserves ``drafters`` of them; a cached
    snapshot that took one's place is evicted), as many as the pool can give."""
    for count in range(wanted, 0, -1):
        slots = pool.allocate(count)
        if slots is not None:
            return slots
    return []


def plan_drafts(llm: Any, seqs: list[Sequence], rows: list[Any], pending: list[list[int]]
                ) -> list[list[int]]:
    """Each sequence's drafts: the rows the pending tokens leave of the pass shared out in
    running order, an even share each rounded up (what one takes less of, the next may
    take), within the sequence's own room."""
    left = min(MAX_PASS_TOKENS, llm.runner.native_rows) - sum(map(len, pending))
    drafts: list[list[int]] = []
    histories = llm.lookup_history.of(seqs)
    for i, (seq, row, fed, tokens) in enumerate(zip(seqs, rows, pending, histories, strict=True)):
        tokens_left = min(row.max_tokens - len(row.output_ids),
                          llm.max_model_len - len(seq.token_ids))
        room = min(-(-left // (len(seqs) - i)), draft_room(tokens_left, len(fed)))
        drafts.append(propose(tokens, llm.lookup, room) if room > 0 else [])
        left -= len(drafts[-1])
    return drafts


def _check(llm: Any, seqs: list[Sequence], rows: list[Any], pending: list[list[int]],
           drafts: list[list[int]], spare_of: dict[int, int]) -> list[Any] | None:
    """Run the pass (``spare_of``: the slot each drafting sequence's rows run on, starting
    from the state in its own slot) and keep what it decides; ``spare_of`` then names the
    slots to release (a sequence whose drafts all stand trades its old slot for the spare)."""
    fed = [tokens + draft for tokens, draft in zip(pending, drafts, strict=True)]
    if not all(llm.scheduler.reserve(seq, len(tokens)) for seq, tokens in zip(seqs, fed)):
        return None
    chunks = [ScheduledChunk(seq.seq_id, tokens, seq.num_computed, list(seq.block_ids),
                             spare_of.get(i, seq.slot), reset_state=False,
                             restore_from=seq.slot if i in spare_of else None,
                             snapshot_to=None, sample=True,
                             num_prompt_tokens=seq.num_prompt_tokens)
              for i, (seq, tokens) in enumerate(zip(seqs, fed, strict=True))]
    try:
        logits = llm.runner.verify_rows(chunks, [len(draft) + 1 for draft in drafts])
    except Exception:  # as a failed step: its sequences fail, the engine goes on
        log.exception("speculative pass failed; failing %d sequences", len(seqs))
        return llm._fail([seq.seq_id for seq in seqs])
    if logits is None:  # the native call cannot run: nothing changed
        return None
    changed: dict[str, Any] = {}
    for i, (seq, row, draft) in enumerate(zip(seqs, rows, drafts, strict=True)):
        owner = llm._seq_owner[seq.seq_id]
        changed[owner.request_id] = owner
        try:
            agreed = _decide(llm, row, logits[i], draft)
        except Exception:  # as a failed draw: this sequence fails
            llm._fail([seq.seq_id])
            continue
        llm.draft_tokens += len(draft)
        llm.accepted_draft_tokens += agreed
        if row.finished:
            llm._drop(seq.seq_id)
        elif agreed == len(draft):  # every fed token stands: so does the state they made
            if i in spare_of:
                seq.slot, spare_of[i] = spare_of[i], seq.slot
            llm.scheduler.computed(seq, len(fed[i]))
        # else the cache is where it began (its slot untouched); the tokens that stand pend
    return list(changed.values())


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
