"""Continuous batching over ids and integers: which sequences run this step and on which tokens.

Every step spends at most ``max_num_batched_tokens``: running sequences first, in arrival order
(one token for a decoding sequence, the next chunk of the prompt for one still prefilling), then
waiting sequences while a state slot and enough KV blocks are free. When a running sequence
needs a KV block and none is left, the latest arrival is preempted: its pages are released and
it is recomputed later (prompt plus the tokens it had already produced). No tensors here.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

from bamba.engine.page_pool import PagePool
from bamba.engine.prefix_cache import PrefixCache, PrefixHit, block_hashes


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """The scheduler's view of one sequence (one sample of a request)."""

    seq_id: int
    token_ids: list[int]  # prompt, then every sampled token
    num_prompt_tokens: int
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV and state are in the cache
    block_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    restore_from: int | None = None  # snapshot slot to copy into ``slot`` before the next chunk
    hashes: list[bytes] = field(default_factory=list)  # hash chain of full blocks seen so far
    num_registered: int = 0  # blocks already named in the prefix cache
    num_preemptions: int = 0
    prompt_logits: bool = False  # prefill in full and keep the logits of every prompt position


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens ``start .. start+len(token_ids)-1`` of one sequence to run this step."""

    seq_id: int
    token_ids: list[int]
    start: int
    block_ids: list[int]
    slot: int
    reset_state: bool  # a fresh start: zero the Mamba state first
    restore_from: int | None  # copy this snapshot slot's state into ``slot`` first
    snapshot_to: int | None  # copy the state after the chunk into this slot
    sample: bool  # the chunk reaches the last known token: sample the next one
    num_prompt_tokens: int = 0  # the request's prompt (a length-dependent RoPE scaling's length)
    all_logits: bool = False  # return the logits of every position (prompt logprobs)


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step. snapshot_interval: when caching a hybrid, prefill chunks are cut at
    multiples of it (tokens, a multiple of block_size) so Mamba states are saved there.
    mixed_step_tokens: in a step where sequences decode, prompt chunks are cut so that the
    step holds at most this many tokens (while the decoders leave room and are at least as
    many as the prompts in progress), keeping a newcomer's prefill from stalling the others'
    next tokens; None: only max_num_batched_tokens."""

    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    has_mamba: bool
    snapshot_interval: int
    mixed_step_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if self.mixed_step_tokens is not None and self.mixed_step_tokens < 2:
            raise ValueError(f"mixed_step_tokens must be at least 2, got "
                             f"{self.mixed_step_tokens}")
        if self.snapshot_interval < 1 or self.snapshot_interval % self.block_size:
            raise ValueError(f"snapshot_interval {self.snapshot_interval} must be a positive "
                             f"multiple of block_size {self.block_size}")


class Scheduler:
    def __init__(self, blocks: PagePool, slots: PagePool, prefix: PrefixCache | None,
                 config: SchedulerConfig):
        self.blocks, self.slots, self.prefix = blocks, slots, prefix
        self.config = config
        self.block_size = config.block_size
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.has_mamba = config.has_mamba
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self.num_preemptions = 0

    # ---- queue management ----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def finish(self, seq_id: int) -> None:
        """Drop a sequence (finished, aborted or failed) and return all its pages."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_ids)
        pinned = [s for s in (seq.slot, seq.restore_from) if s is not None]
        self.slots.release(pinned)
        seq.block_ids, seq.slot, seq.restore_from = [], None, None
        seq.num_computed = seq.num_registered = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        prompt_budget = self._prompt_budget()
        chunks: list[ScheduledChunk] = []
        preempted: list[int] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            decoding = len(seq.token_ids) - seq.num_computed == 1
            n = self._chunk_len(seq, budget if decoding else min(budget, prompt_budget))
            if n == 0:  # a prompt with no room left this step
                i += 1
                continue
            while not self._ensure_blocks(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            chunks.append(self._make_chunk(seq, n))
            budget -= n
            if not decoding:
                prompt_budget -= n
            i += 1
        while (self.waiting and min(budget, prompt_budget) > 0 and not preempted
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            n = self._admit(seq, min(budget, prompt_budget))
            if n == 0:
                break
            chunks.append(self._make_chunk(seq, n))
            budget -= n
            prompt_budget -= n
        return SchedulerOutput(chunks, preempted)

    def _prompt_budget(self) -> int | float:
        """Prompt tokens this step may take: what ``mixed_step_tokens`` leaves beside the
        decoding sequences while they leave room and are at least as many as the prompts in
        progress or admissible now (newcomers among decoders); else no limit of its own: a
        burst of newcomers beside few decoders (a server's first requests) would otherwise
        trickle in a few tokens a step, every step paying for the weights, while hardly anyone
        decodes."""
        limit = self.config.mixed_step_tokens
        if limit is None:
            return math.inf
        decoding = sum(len(s.token_ids) - s.num_computed == 1 for s in self.running)
        admissible = min(len(self.waiting), self.max_num_seqs - len(self.running))
        prompts = len(self.running) - decoding + admissible
        if decoding >= limit or decoding < prompts:
            return math.inf
        return limit - decoding

    def _chunk_len(self, seq: Sequence, budget: int) -> int:
        """How many tokens to run: all that remain, within the budget. When caching a hybrid,
        prefill chunks end on block boundaries, at every snapshot interval and at the last full
        block, so the Mamba state can be saved there for later prefixes."""
        total = len(seq.token_ids)
        start = seq.num_computed
        end = min(total, start + budget)
        if self.prefix is not None and self.has_mamba and total - start > 1:
            bs, interval = self.block_size, self.config.snapshot_interval
            if end < total and end // bs * bs > start:
                end = end // bs * bs
            end = min(end, (start // interval + 1) * interval)
            last = total // bs * bs
            if start < last < end:
                end = last
        return end - start

    def decoders(self) -> list[Sequence]:
        """The running sequences when nothing waits and every one has its prompt in the cache
        and a token to feed: those speculative decoding may draft for (``engine.lookup``);
        [] otherwise."""
        if self.waiting or not self.running:
            return []
        for seq in self.running:
            done = seq.num_computed >= seq.num_prompt_tokens and seq.restore_from is None
            if not done or len(seq.token_ids) <= seq.num_computed:
                return []
        return list(self.running)

    def reserve(self, seq: Sequence, n: int) -> bool:
        """KV blocks for ``n`` more tokens of a running sequence (False: the pool is short)."""
        return self._ensure_blocks(seq, n)

    def computed(self, seq: Sequence, n: int) -> None:
        """``n`` more tokens of ``seq`` are in the cache (a step run outside ``schedule``)."""
        seq.num_computed += n
        self._register_full_blocks(seq)

    def _ensure_blocks(self, seq: Sequence, n: int) -> bool:
        need = math.ceil((seq.num_computed + n) / self.block_size) - len(seq.block_ids)
        if need <= 0:
            return True
        pages = self.blocks.allocate(need)
        if pages is None:
            return False
        seq.block_ids.extend(pages)
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its slot, cached prefix and first blocks; the tokens of its
        first chunk, or 0 (and nothing held) when a pool is short."""
        hit = PrefixHit(0, [], None)
        # Match first: the hit's pages are then safe from eviction. A sequence that wants the
        # logits of every prompt position computes them all, so it reuses nothing.
        if self.prefix is not None and not seq.prompt_logits:
            reusable = (len(seq.token_ids) - 1) // self.block_size
            seq.hashes = block_hashes(seq.token_ids, self.block_size, reusable, seq.hashes)
            hit = self.prefix.match(seq.hashes[:reusable])
        seq.block_ids, seq.restore_from = list(hit.block_ids), hit.snapshot_slot
        seq.num_computed, seq.num_registered = hit.num_tokens, len(hit.block_ids)
        slots = self.slots.allocate(1)
        if slots is not None:
            seq.slot = slots[0]
        n = self._chunk_len(seq, budget)
        if slots is None or not self._ensure_blocks(seq, n):
            self._release(seq)
            return 0
        if self.prefix is not None:
            self.prefix.record(hit, len(seq.token_ids))
        self.waiting.popleft()
        seq.status = Status.RUNNING
        self.running.append(seq)
        return n

    def _make_chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start, end = seq.num_computed, seq.num_computed + n
        return ScheduledChunk(
            seq_id=seq.seq_id, token_ids=seq.token_ids[start:end], start=start,
            block_ids=list(seq.block_ids), slot=seq.slot,
            reset_state=start == 0 and seq.restore_from is None,
            restore_from=seq.restore_from, snapshot_to=self._snapshot_slot(seq, start, end),
            sample=end == len(seq.token_ids), num_prompt_tokens=seq.num_prompt_tokens,
            all_logits=seq.prompt_logits and start < seq.num_prompt_tokens - 1)

    def _snapshot_slot(self, seq: Sequence, start: int, end: int) -> int | None:
        """A slot for the state at ``end`` when it is a new block boundary of a prefill chunk."""
        if (self.prefix is None or not self.has_mamba or end - start < 2
                or end % self.block_size):
            return None
        seq.hashes = block_hashes(seq.token_ids, self.block_size, end // self.block_size,
                                  seq.hashes)
        if self.prefix.has_snapshot(seq.hashes[end // self.block_size - 1]):
            return None
        page = self.slots.allocate(1)
        return None if page is None else page[0]

    # ---- after the runner ---------------------------------------------------------------
    def update(self, output: SchedulerOutput) -> None:
        """Advance the scheduled sequences past their chunks (before sampled tokens are added)."""
        for chunk in output.chunks:
            seq = self.seqs.get(chunk.seq_id)
            if chunk.snapshot_to is not None:
                if seq is not None:
                    key = seq.hashes[(chunk.start + len(chunk.token_ids)) // self.block_size - 1]
                    self.slots.register(chunk.snapshot_to, key)
                self.slots.release([chunk.snapshot_to])
            if seq is None:
                continue
            if seq.restore_from is not None:
                self.slots.release([seq.restore_from])
                seq.restore_from = None
            seq.num_computed += len(chunk.token_ids)
            self._register_full_blocks(seq)

    def _register_full_blocks(self, seq: Sequence) -> None:
        if self.prefix is None:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.num_registered:
            return
        seq.hashes = block_hashes(seq.token_ids, self.block_size, full, seq.hashes)
        self.prefix.register_blocks(seq.block_ids, seq.hashes[:full], seq.num_registered)
        seq.num_registered = full

    def discard(self, output: SchedulerOutput) -> None:
        """Return the snapshot slots of a step whose forward pass failed."""
        for chunk in output.chunks:
            if chunk.snapshot_to is not None:
                self.slots.release([chunk.snapshot_to])
