"""The model runner: owns the paged KV storage and the state pools, and runs the model on a step.

Per attention layer, keys and values live in [Hkv, num_blocks, block_size, D]; per Mamba layer,
conv states in [num_slots, K-1, conv_dim] (model dtype) and SSM states in [num_slots, H, P, N]
(``state_dtype``, float32 by default). ``PagedBatchCache`` implements the model's
``InferenceCache`` for one forward call over these pools: each row brings its block table and
its state slot.

A step whose tokens fit the native decode step's rows runs as one call, a row per token (a
prompt chunk's tokens adjacent rows on its state slot: ``_forward_as_rows``). Otherwise every
one-token chunk (decode) runs as one batched call [B, 1], and the prefill chunks in one call
per distinct length [n, L] (rows of one call share L). Chunks that ask for every position's
logits (prompt logprobs) get calls of their own, so the others still pay for one position's
LM head; their logits [L, V] live for one step (L is at most the step's budget).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from bamba.compile import CompiledModule
from bamba.engine.page_pool import PoolPlan
from bamba.engine.scheduler import ScheduledChunk
from bamba.model import BambaLM
from bamba.native import NativeStepUnavailable, accelerate, decode_rows
from bamba.cache_protocol import KVLayout


Scratch = Callable[[int, tuple[int, ...]], torch.Tensor]
"""(buffer index, shape) -> a reusable contiguous buffer of that shape (``ModelRunner.scratch``)."""


class PagedBatchCache:
    """``InferenceCache`` over the runner's pools for the rows of one forward call.

    Everything it needs arrives as tensors computed before the call (no Python value is read
    back from a tensor), so the same code runs eagerly and inside a compiled graph:
    ``slots`` [B] are the rows' state slots (None: the state pools are already this batch's
    rows, in order; with ``rows_share_slots``, adjacent rows may share one), ``write_rows``
    [B, L] the page rows (block * block_size + offset) of the tokens written by this call,
    ``read_rows`` [B, T] those of positions 0..T-1 of every row; ``state_sources`` [B] (or
    None) the slot each run of rows on one slot starts from (the native step copies it in).
    """

    def __init__(self, pools: StatePools, slots: torch.Tensor | None, write_rows: torch.Tensor,
                 read_rows: torch.Tensor, scratch: Scratch | None = None,
                 rows_share_slots: bool = False, state_sources: torch.Tensor | None = None):
        self.pools, self.slots = pools, slots
        self.write_rows, self.read_rows, self.scratch = write_rows, read_rows, scratch
        # Adjacent rows on one slot are one sequence's successive tokens, and a run may start
        # from another slot's state: only the native one-call step takes those
        # (bamba.native.seam raises NativeStepUnavailable otherwise).
        self.rows_share_slots = rows_share_slots
        self.state_sources = state_sources

    def mamba_pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.pools.conv[layer_idx], self.pools.ssm[layer_idx], self.slots

    def kv_pages(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, KVLayout]:
        """An attention layer's pages [Hkv, blocks, block_size, D] and their layout for the
        native decode step (token row = block * block_size + offset)."""
        keys = self.pools.keys[layer_idx]
        return keys, self.pools.values[layer_idx], KVLayout(keys.stride(0), keys.stride(2))

    def token_rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Page rows of this call's one token per row [B] and of every row's positions [B, T]."""
        return self.write_rows[:, -1], self.read_rows

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v; gather every row's keys and values up to the batch's longest row.

        The result is a [B, T, Hkv, D] view of a contiguous head-major [Hkv, B, T, D] buffer
        (one ``index_select`` of token rows per pool, no dtype conversion), which attention
        reads without a copy. Eagerly the buffer is the runner's scratch: valid until the next
        call.
        """
        keys, values = self.pools.keys[layer_idx], self.pools.values[layer_idx]
        hkv, d = keys.shape[0], keys.shape[-1]
        b, t = self.read_rows.shape
        written, read = self.write_rows.reshape(-1), self.read_rows.reshape(-1)
        gathered = []
        for pages, new in ((keys, k), (values, v)):
            flat = pages.view(hkv, -1, d)
            flat[:, written] = new.permute(2, 0, 1, 3).reshape(hkv, -1, d).to(flat.dtype)
            out = None if self.scratch is None else \
                self.scratch(len(gathered), (hkv, read.numel(), d))
            gathered.append(torch.index_select(flat, 1, read, out=out))
        return tuple(g.view(hkv, b, t, d).permute(1, 2, 0, 3) for g in gathered)


class StatePools(NamedTuple):
    """The runner's storage, per layer: conv and SSM states (Mamba), keys and values pages
    (attention)."""
    conv: dict[int, torch.Tensor]
    ssm: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]


class PagedStep(nn.Module):
    """Tokens through the model over the paged pools; the last position's logits [B, V] (with
    ``every_position``, all of them [B, L, V]). The module ``torch.compile`` compiles for
    decode (a module, so inductor can freeze weights)."""

    def __init__(self, model: BambaLM):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None,
                write_rows: torch.Tensor, read_rows: torch.Tensor, pools: StatePools,
                scratch: Scratch | None = None, rope_lengths: torch.Tensor | None = None,
                every_position: bool = False) -> torch.Tensor:
        cache = PagedBatchCache(pools, slots, write_rows, read_rows, scratch)
        if every_position:
            return self.model(tokens, positions=positions, cache=cache, rope_lengths=rope_lengths)
        return self.model(tokens, positions=positions, cache=cache, logits_to_keep=1,
                          rope_lengths=rope_lengths)[:, -1]


def compiled_decode(model: BambaLM, mode: str) -> CompiledModule:
    """The model's compiled ``PagedStep`` for ``mode``, made once per model and kept on it, so
    every engine over the same model shares one compilation (dynamic shapes: any pool size)."""
    per_mode = model.__dict__.setdefault("_compiled_paged_steps", {})
    if mode not in per_mode:
        per_mode[mode] = CompiledModule(PagedStep(model), mode, dynamic=True)
    return per_mode[mode]


class RowSpan(NamedTuple):
    """One row of a model call: its tokens, the position of the first, its block table."""
    tokens: list[int]
    start: int
    blocks: list[int]


class CallInputs(NamedTuple):
    """A model call's token ids and positions [B, L], the page rows (block * block_size +
    offset) its tokens are written to [B, L], and those of positions 0..T-1 of every row
    [B, T]."""
    ids: torch.Tensor
    positions: torch.Tensor
    write_rows: torch.Tensor
    read_rows: torch.Tensor


def call_inputs(rows: list[RowSpan], end: int, block_size: int,
                device: torch.device) -> CallInputs:
    """The inputs of a call over ``rows`` of equal length reading positions 0..end-1: the
    per-token values computed in Python and made one tensor, the read rows from the block
    tables (padded with block 0 past a row's blocks: positions past its length are masked).
    A handful of tensor operations, whatever the batch: a decode step's inputs cost little
    beside its weights' stream, with the caches cold from it."""
    bs, width = block_size, -(-end // block_size)
    spans = [range(row.start, row.start + len(row.tokens)) for row in rows]
    per_token = torch.tensor(
        [[row.tokens for row in rows], [list(span) for span in spans],
         [[row.blocks[p // bs] * bs + p % bs for p in span] for row, span in zip(rows, spans)]],
        dtype=torch.long, device=device)
    tables = torch.tensor([(row.blocks + [0] * width)[:width] for row in rows],
                          dtype=torch.long, device=device)
    read = (tables[:, :, None] * bs + _block_offsets(bs, device)).view(len(rows), -1)[:, :end]
    ids, positions, write = per_token.unbind(0)
    return CallInputs(ids, positions, write, read)


@functools.cache
def _block_offsets(block_size: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.arange(block_size, device=device)


# Gather buffers at least this large (a prompt of tens of thousands of tokens) freed: also hand
# the C heap's free memory back to the OS, which a long prefill's freed activations occupy.
TRIM_AFTER_BYTES = 64 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_free_heap() -> None:
    """Return the C heap's free pages to the OS (glibc's ``malloc_trim``; a no-op where the C
    library has none): freed memory otherwise stays resident for the process's life."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


class StepLogits(NamedTuple):
    """What a step returns: the last position's logits [V] of every chunk that samples, and
    every position's [L, V] of the chunks that asked (``ScheduledChunk.all_logits``)."""
    last: dict[int, torch.Tensor]
    every: dict[int, torch.Tensor]


class ModelRunner:
    """Owns the pools and runs the model on the chunks of a step.

    ``compile_mode`` (one of ``bamba.compile.MODES``) compiles the decode calls (all rows one
    token) with inductor, once for every batch size and context length (dynamic shapes); the
    first decode call pays the compile (about a minute on the reference CPU, cached on disk
    by inductor afterwards). Prefill chunks always run eagerly, and so do decode calls of at
    most ``bamba.native.decode_rows(model)`` rows, whose layers run through bamba.native's
    layer steps (faster there than any compiled graph of torch ops). The runner installs the
    native kernels on the model (``bamba.native.accelerate``).
    """

    def __init__(self, model: BambaLM, plan: PoolPlan, block_size: int,
                 state_dtype: torch.dtype, compile_mode: str | None = None):
        cfg = model.config
        self.model = accelerate(model)
        self.block_size = block_size
        dtype, device = model.dtype, model.device
        # Head-major pages: one gather of token rows yields [Hkv, B, T, D] for attention.
        kv_shape = (cfg.num_key_value_heads, plan.num_blocks, block_size, cfg.head_dim)
        conv_shape = (plan.num_slots, cfg.mamba_d_conv - 1, cfg.conv_dim)
        ssm_shape = (plan.num_slots, cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state)
        # Zeros, not empty: padded rows read unused pages, which must hold finite numbers.
        self.pools = StatePools(
            conv={i: torch.zeros(conv_shape, dtype=dtype, device=device)
                  for i in cfg.mamba_layer_indices},
            ssm={i: torch.zeros(ssm_shape, dtype=state_dtype, device=device)
                 for i in cfg.mamba_layer_indices},
            keys={i: torch.zeros(kv_shape, dtype=dtype, device=device)
                  for i in cfg.attn_layer_indices},
            values={i: torch.zeros(kv_shape, dtype=dtype, device=device)
                    for i in cfg.attn_layer_indices})
        self.conv, self.ssm, self.keys, self.values = self.pools
        self.step = PagedStep(model)
        self.decode_graph = None if compile_mode is None else \
            compiled_decode(model, compile_mode)
        self.native_rows = decode_rows(model)
        self.length_dependent_rope = cfg.rope_spec.length_dependent
        self._scratch: dict[int, torch.Tensor] = {}
        self._scratch_used = False

    def scratch(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Contiguous buffer number ``index`` (0: gathered keys, 1: values) of this shape in the
        model's dtype, carved from storage kept between steps, grown by a quarter when short.
        A step that needs none (decode reading keys and values in place) frees it."""
        self._scratch_used = True
        numel = math.prod(shape)
        buffer = self._scratch.get(index)
        if buffer is None or buffer.numel() < numel:
            buffer = self._scratch[index] = torch.empty(
                numel + numel // 4, dtype=self.model.dtype, device=self.model.device)
        return buffer[:numel].view(shape)

    def copy_state(self, src: int, dst: int) -> None:
        for i in self.conv:
            self.conv[i][dst] = self.conv[i][src]
            self.ssm[i][dst] = self.ssm[i][src]

    def zero_state(self, slot: int) -> None:
        for i in self.conv:
            self.conv[i][slot] = 0
            self.ssm[i][slot] = 0

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> StepLogits:
        """Run one step; the last-position logits [V] (float32) of every chunk that samples,
        and every position's of the chunks with ``all_logits``."""
        self._scratch_used = False
        for chunk in chunks:
            if chunk.restore_from is not None:
                self.copy_state(chunk.restore_from, chunk.slot)
            elif chunk.reset_state:
                self.zero_state(chunk.slot)
        logits = self._forward_as_rows(chunks) if self._fits_one_call(chunks) else None
        if logits is None:
            # Rows of one model call share a length, and whether they keep every position.
            groups: dict[tuple[int, bool], list[ScheduledChunk]] = {}
            for chunk in sorted(chunks, key=lambda c: c.slot):
                groups.setdefault((len(chunk.token_ids), chunk.all_logits), []).append(chunk)
            logits = {}
            for rows in groups.values():
                logits.update(self._forward(rows))
        if not self._scratch_used and self._scratch:  # decoding starts: the prefill's buffers go
            freed = sum(t.numel() * t.element_size() for t in self._scratch.values())
            self._scratch.clear()
            if freed >= TRIM_AFTER_BYTES:
                release_free_heap()
        for chunk in chunks:
            if chunk.snapshot_to is not None:
                self.copy_state(chunk.slot, chunk.snapshot_to)
        every = {c.seq_id: logits[c.seq_id] for c in chunks if c.all_logits}
        last = {c.seq_id: logits[c.seq_id][-1] if c.all_logits else logits[c.seq_id]
                for c in chunks if c.sample}
        return StepLogits(last, every)

    def _fits_one_call(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether a step with prompt chunks runs as one native call, a row per token: at most
        ``native_rows`` tokens, none asking for every position's logits."""
        return any(len(c.token_ids) > 1 for c in chunks) and \
            sum(len(c.token_ids) for c in chunks) <= self.native_rows and \
            not any(c.all_logits for c in chunks)

    def _forward_as_rows(self, chunks: list[ScheduledChunk]) -> dict[int, torch.Tensor] | None:
        """Every token of the step as a row of one native call (a chunk's tokens adjacent rows
        on its slot, the state advancing token by token; the weights stream once for all):
        the last logits [V] of each chunk, or None when the native step cannot run (nothing
        done). A prompt chunk beside decoding rows then costs about its tokens' arithmetic
        instead of a prefill pass of its own."""
        hidden = self._rows_hidden(chunks)
        if hidden is None:
            return None
        last, row = [], 0
        for c in chunks:
            row += len(c.token_ids)
            last.append(row - 1)
        logits = self.model.logits(hidden[last, -1]).float()
        return {c.seq_id: logits[j] for j, c in enumerate(chunks)}

    @torch.inference_mode()
    def verify_rows(self, chunks: list[ScheduledChunk], keep: list[int]
                    ) -> list[torch.Tensor] | None:
        """Per chunk, the logits [keep, V] (float32) of its last ``keep`` tokens, every token
        of the chunks run as a row of one native call on its slot (speculative decoding's
        check of drafts); None when that call cannot run (nothing done). A chunk's
        ``restore_from`` state is read in the same call (copied into its slot as its first
        row reads it) and left as it was: the pass can be undone by keeping that slot."""
        hidden = self._rows_hidden(chunks, from_restore=True)
        if hidden is None:
            return None
        ends = torch.tensor([len(c.token_ids) for c in chunks]).cumsum(0).tolist()
        rows = [row for end, n in zip(ends, keep, strict=True) for row in range(end - n, end)]
        logits = self.model.logits(hidden[rows, -1]).float()
        return list(logits.split(keep))

    def _rows_hidden(self, chunks: list[ScheduledChunk], from_restore: bool = False
                     ) -> torch.Tensor | None:
        """Final-norm hidden states [tokens, 1, hidden] of every token of the chunks as a row
        of one native call, or None when it cannot run (nothing done). ``from_restore``: the
        chunks' ``restore_from`` slots are their rows' state sources (``PagedBatchCache``)."""
        device = self.model.device
        per_row = [(c, c.start + j, t) for c in chunks for j, t in enumerate(c.token_ids)]
        end = max(position for _, position, _ in per_row) + 1
        ids, pos, write, read = call_inputs([RowSpan([t], p, c.block_ids) for c, p, t in per_row],
                                            end, self.block_size, device)

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        slots = tensor([c.slot for c, _, _ in per_row])
        lengths = torch.maximum(pos + 1, tensor([[c.num_prompt_tokens] for c, _, _ in per_row])) \
            if self.length_dependent_rope else None
        sources = tensor([c.slot if c.restore_from is None else c.restore_from
                          for c, _, _ in per_row]) \
            if from_restore and any(c.restore_from is not None for c in chunks) else None
        cache = PagedBatchCache(self.pools, slots, write, read, rows_share_slots=True,
                                state_sources=sources)
        try:
            return self.model.hidden_states(ids, positions=pos, cache=cache,
                                            rope_lengths=lengths)
        except NativeStepUnavailable:
            return None

    def _forward(self, rows: list[ScheduledChunk]) -> dict[int, torch.Tensor]:
        """One model call for rows of equal length: each row's last logits [V], or all its
        logits [L, V] when the rows ask for every position (``all_logits``)."""
        device = self.model.device
        length = len(rows[0].token_ids)
        end = max(c.start for c in rows) + length
        ids, pos, write, read = call_inputs([RowSpan(c.token_ids, c.start, c.block_ids)
                                             for c in rows], end, self.block_size, device)

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        slots = [c.slot for c in rows]
        # A prompt's tokens see the whole prompt's length (as one transformers forward over it
        # would), however it is chunked; later tokens their own.
        lengths = torch.maximum(pos + 1, tensor([c.num_prompt_tokens for c in rows])[:, None]) \
            if self.length_dependent_rope else None
        if rows[0].all_logits:
            out = self.step(ids, pos, tensor(slots), write, read, self.pools, self.scratch,
                            lengths, every_position=True)
        elif length == 1 and self.decode_graph is not None and len(rows) > self.native_rows:
            out = self.decode_graph(ids, pos, tensor(slots), write, read, self.pools, None,
                                    lengths)
        elif (length > 1 or len(rows) > self.native_rows) and \
                slots == list(range(slots[0], slots[0] + len(slots))):
            # Consecutive ascending slots: the states are one slice (no gather, no scatter;
            # the native decode step reads the slots where they are).
            span = slice(slots[0], slots[0] + len(slots))
            pools = self.pools._replace(conv={i: t[span] for i, t in self.conv.items()},
                                        ssm={i: t[span] for i, t in self.ssm.items()})
            out = self.step(ids, pos, None, write, read, pools, self.scratch, lengths)
        else:
            out = self.step(ids, pos, tensor(slots), write, read, self.pools, self.scratch,
                            lengths)
        logits = out.float()  # one conversion for the batch; rows are views of it
        return {c.seq_id: logits[j] for j, c in enumerate(rows)}
