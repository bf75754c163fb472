"""The model runner: owns the paged KV storage and the state pools, and runs the model on a step.

Per attention layer, keys and values live in [Hkv, num_blocks, block_size, D]; per Mamba layer,
conv states in [num_slots, K-1, conv_dim] (model dtype) and SSM states in [num_slots, H, P, N]
(``state_dtype``, float32 by default). ``PagedBatchCache`` implements the model's
``InferenceCache`` for one forward call over these pools: each row brings its block table and
its state slot.

A step runs every one-token chunk (decode) as one batched call [B, 1], and the prefill chunks
in one call per distinct length [n, L] (rows of one call share L).
"""

from __future__ import annotations

import math

import torch

from bamba.engine.cache import PoolPlan
from bamba.engine.scheduler import ScheduledChunk
from bamba.model import BambaLM


class PagedBatchCache:
    """``InferenceCache`` over the runner's pools for the rows of one forward call."""

    def __init__(self, runner: "ModelRunner", slots: list[int], block_tables: list[list[int]]):
        self.runner = runner
        device = runner.model.device
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)
        # Consecutive ascending slots are read and written as one slice (no gather, no scatter).
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        self.span = slice(slots[0], slots[0] + len(slots)) if contiguous else None
        width = max(len(t) for t in block_tables)
        # Short tables are padded with block 0: positions past a row's length are masked out.
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables],
                                   dtype=torch.long, device=device)  # [B, blocks]
        self._rows: tuple[int, torch.Tensor] | None = None

    def mamba_state(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        conv_pool, ssm_pool = self.runner.conv[layer_idx], self.runner.ssm[layer_idx]
        if self.span is not None:
            return conv_pool[self.span], ssm_pool[self.span]
        return conv_pool[self.slots], ssm_pool[self.slots]

    def set_mamba_state(self, layer_idx: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        for pool, new in ((self.runner.conv[layer_idx], conv), (self.runner.ssm[layer_idx], ssm)):
            if self.span is None:
                pool.index_copy_(0, self.slots, new.to(pool.dtype))
            elif new.data_ptr() != pool[self.span].data_ptr():  # updated in place: nothing to do
                pool[self.span].copy_(new)

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v; gather every row's keys and values up to the batch's longest row.

        The result is a [B, T, Hkv, D] view of a contiguous head-major [Hkv, B, T, D] buffer
        (one ``index_select`` of token rows per pool, indices computed once per call, no dtype
        conversion), which attention reads without a copy. The buffer is the runner's scratch:
        valid until the next call.
        """
        bs = self.runner.block_size
        keys, values = self.runner.keys[layer_idx], self.runner.values[layer_idx]
        blocks = self.tables.gather(1, positions // bs)  # [B, L]
        offsets = positions % bs
        keys[:, blocks, offsets] = k.permute(2, 0, 1, 3).to(keys.dtype)  # [Hkv, B, L, D]
        values[:, blocks, offsets] = v.permute(2, 0, 1, 3).to(values.dtype)
        end = int(positions.max()) + 1
        rows = self._token_rows(end)
        hkv, _, _, d = keys.shape
        b = self.tables.shape[0]
        out_k, out_v = self.runner.scratch((hkv, rows.numel(), d), keys.dtype)
        torch.index_select(keys.view(hkv, -1, d), 1, rows, out=out_k)
        torch.index_select(values.view(hkv, -1, d), 1, rows, out=out_v)
        return out_k.view(hkv, b, end, d).permute(1, 2, 0, 3), \
            out_v.view(hkv, b, end, d).permute(1, 2, 0, 3)

    def _token_rows(self, end: int) -> torch.Tensor:
        """[B * end] page rows (block * block_size + offset) of positions 0..end-1 of every row;
        the same for every layer of the call, so computed once."""
        if self._rows is None or self._rows[0] != end:
            bs = self.runner.block_size
            pos = torch.arange(end, device=self.tables.device)
            self._rows = end, (self.tables[:, pos // bs] * bs + pos % bs).reshape(-1)
        return self._rows[1]


class ModelRunner:
    def __init__(self, model: BambaLM, plan: PoolPlan, block_size: int,
                 state_dtype: torch.dtype):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        dtype, device = model.dtype, model.device
        # Head-major pages: one gather of token rows yields [Hkv, B, T, D] for attention.
        kv_shape = (cfg.num_key_value_heads, plan.num_blocks, block_size, cfg.head_dim)
        # Zeros, not empty: padded rows read unused pages, which must hold finite numbers.
        self.keys = {i: torch.zeros(kv_shape, dtype=dtype, device=device)
                     for i in cfg.attn_layer_indices}
        self.values = {i: torch.zeros(kv_shape, dtype=dtype, device=device)
                       for i in cfg.attn_layer_indices}
        conv_shape = (plan.num_slots, cfg.mamba_d_conv - 1, cfg.conv_dim)
        ssm_shape = (plan.num_slots, cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state)
        self.conv = {i: torch.zeros(conv_shape, dtype=dtype, device=device)
                     for i in cfg.mamba_layer_indices}
        self.ssm = {i: torch.zeros(ssm_shape, dtype=state_dtype, device=device)
                    for i in cfg.mamba_layer_indices}
        self._scratch: tuple[torch.Tensor, ...] | None = None

    def scratch(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Two contiguous buffers (gathered keys, values) of this shape, carved from storage that
        is kept between steps and grown by a quarter when too small."""
        numel = math.prod(shape)
        if self._scratch is None or self._scratch[0].numel() < numel or \
                self._scratch[0].dtype != dtype:
            self._scratch = tuple(torch.empty(numel + numel // 4, dtype=dtype,
                                              device=self.model.device) for _ in range(2))
        return tuple(buf[:numel].view(shape) for buf in self._scratch)

    def copy_state(self, src: int, dst: int) -> None:
        for i in self.conv:
            self.conv[i][dst] = self.conv[i][src]
            self.ssm[i][dst] = self.ssm[i][src]

    def zero_state(self, slot: int) -> None:
        for i in self.conv:
            self.conv[i][slot] = 0
            self.ssm[i][slot] = 0

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> dict[int, torch.Tensor]:
        """Run one step; the last-position logits [V] (float32) of every chunk that samples."""
        for chunk in chunks:
            if chunk.restore_from is not None:
                self.copy_state(chunk.restore_from, chunk.slot)
            elif chunk.reset_state:
                self.zero_state(chunk.slot)
        groups: dict[int, list[ScheduledChunk]] = {}  # rows of one model call share a length
        for chunk in sorted(chunks, key=lambda c: c.slot):
            groups.setdefault(len(chunk.token_ids), []).append(chunk)
        logits: dict[int, torch.Tensor] = {}
        for rows in groups.values():
            logits.update(self._forward(rows))
        for chunk in chunks:
            if chunk.snapshot_to is not None:
                self.copy_state(chunk.slot, chunk.snapshot_to)
        return {c.seq_id: logits[c.seq_id] for c in chunks if c.sample}

    def _forward(self, rows: list[ScheduledChunk]) -> dict[int, torch.Tensor]:
        """One model call for rows of equal length."""
        device = self.model.device
        ids = torch.tensor([c.token_ids for c in rows], dtype=torch.long, device=device)
        length = ids.shape[1]
        positions = torch.tensor([[c.start + j for j in range(length)] for c in rows],
                                 dtype=torch.long, device=device)
        cache = PagedBatchCache(self, [c.slot for c in rows], [c.block_ids for c in rows])
        out = self.model(ids, positions=positions, cache=cache, logits_to_keep=1)  # [B, 1, V]
        return {c.seq_id: out[j, -1].float() for j, c in enumerate(rows)}
